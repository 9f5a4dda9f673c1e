"""The console script, end to end on tiny runs."""

import subprocess
import sys

import pytest

from eqlosses.cli import main

TINY = ["--set", "model.width=4", "--set", "data.batch_size=256", "--set", "optim.epochs=1",
        "--set", "progress=false", "--set", "tensorboard=false"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    for loss in ("ce", "softmax_eql"):
        code = main(["train", "cls", *TINY, "--set", f"output_dir={out}", "--set",
                     f"name={loss}", "--set", f"loss.name={loss}"])
        assert code == 0
    return out


def test_train_writes_a_report(two_runs, capsys):
    run = two_runs / "softmax_eql"
    assert (run / "report.html").is_file()
    assert (run / "plots" / "gradient_ratio.png").is_file()
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "softmax_eql" in html


def test_compare_plot_and_eval(two_runs, capsys, tmp_path):
    assert main(["compare", str(two_runs / "ce"), str(two_runs / "softmax_eql"), "--out",
                 str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "many" in out and "few" in out and "softmax_eql" in out
    assert (tmp_path / "cmp" / "report.html").is_file()
    assert main(["plot", str(two_runs / "ce")]) == 0
    assert main(["eval", "--checkpoint", str(two_runs / "ce" / "checkpoint.pt"), "--json",
                 str(tmp_path / "m.json")]) == 0
    assert (tmp_path / "m.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["train", "cls", "--set", "optim.lrr=1"], "unknown key 'lrr'"),
    (["train", "cls", "--set", "loss.name=nope"], "unknown loss 'nope'"),
    (["train", "cls", "--config", "/nonexistent.yaml"], "does not exist"),
    (["eval", "--checkpoint", "/nonexistent.pt"], "does not exist"),
    (["compare", "/nonexistent-run"], "no metrics.json"),
    (["train", "cls", "--set", "data.name=fashion_mnist", "--set",
      "data.root=/nonexistent-dir"], "nonexistent-dir"),
])
def test_errors_are_one_clear_line(argv, message, capsys, tmp_path):
    assert main(argv + (["--set", f"output_dir={tmp_path}"] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "eqlosses.cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout


def test_detection_and_segmentation_from_the_command_line(tmp_path, capsys):
    det_root, seg_root = tmp_path / "det", tmp_path / "seg"
    small = ["--n-max", "8", "--imbalance", "8", "--val-per-class", "1", "--size", "64"]
    assert main(["data", "make-detection", "--out", str(det_root), *small]) == 2
    assert "frequent" in capsys.readouterr().err  # the LVIS groups are checked by default
    assert main(["data", "make-detection", "--out", str(det_root), *small,
                 "--allow-empty-groups"]) == 0
    assert (det_root / "annotations" / "lvis_v1_train.json").is_file()
    assert main(["data", "make-segmentation", "--out", str(seg_root), *small]) == 0
    assert main(["data", "make-segmentation", "--out", str(seg_root), *small]) == 2
    assert "not empty" in capsys.readouterr().err

    common = ["--set", f"output_dir={tmp_path / 'runs'}", "--set", "optim.epochs=1", "--set",
              "progress=false", "--set", "tensorboard=false"]
    assert main(["train", "det", *common, "--set", f"data.root={det_root}", "--set",
                 "model.arch=retinanet", "--set", "model.backbone=tiny", "--set",
                 "model.min_size=64", "--set", "model.max_size=64", "--set", "loss.name=efl",
                 "--set", "data.max_val_images=4", "--set", "name=efl"]) == 0
    out = capsys.readouterr().out
    assert "APr" in out and "rare 1-10" in out
    html = (tmp_path / "runs" / "efl" / "report.html").read_text()
    assert "per class ap" in html and "gradient ratio" in html
    for loss in ("ce", "softmax_eql"):
        assert main(["train", "seg", *common, "--set", f"data.root={seg_root}", "--set",
                     "model.arch=tiny_deeplab", "--set", "model.backbone=null", "--set",
                     "model.options.width=8", "--set", "data.crop_size=48", "--set",
                     f"loss.name={loss}", "--set", f"name={loss}"]) == 0
    assert main(["compare", str(tmp_path / "runs" / "ce"), str(tmp_path / "runs" / "softmax_eql"),
                 "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "tail" in out and "training pixel share" in out
    assert (tmp_path / "cmp" / "per_class_iou.png").is_file()
    assert main(["compare", str(tmp_path / "runs" / "ce"), str(tmp_path / "runs" / "efl"),
                 "--out", str(tmp_path / "cmp2")]) == 2  # different tasks
    assert main(["eval", "--checkpoint", str(tmp_path / "runs" / "efl" / "checkpoint.pt")]) == 0
    assert "APr" in capsys.readouterr().out
