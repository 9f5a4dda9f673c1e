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


@pytest.mark.slow
def test_train_writes_a_report(two_runs, capsys):
    run = two_runs / "softmax_eql"
    assert (run / "report.html").is_file()
    assert (run / "plots" / "gradient_ratio.png").is_file()
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "softmax_eql" in html


@pytest.mark.slow
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


@pytest.mark.slow  # a fresh interpreter: seconds
def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "eqlosses.cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout


@pytest.mark.slow
def test_detection_and_segmentation_from_the_command_line(tmp_path, capsys):
    det_root, seg_root = tmp_path / "det", tmp_path / "seg"
    small = ["--n-max", "8", "--imbalance", "8", "--val-per-class", "1", "--size", "64"]
    assert main(["data", "make-detection", "--out", str(det_root), *small]) == 2
    assert "frequent" in capsys.readouterr().err  # the LVIS groups are checked by default
    assert main(["data", "make-detection", "--out", str(det_root), *small,
                 "--allow-empty-groups"]) == 0
    assert (det_root / "annotations" / "lvis_v1_train.json").is_file()
    assert not (det_root / "annotations" / "lvis_v1_dev.json").exists()
    dev_root = tmp_path / "det-dev"
    assert main(["data", "make-detection", "--out", str(dev_root), *small,
                 "--allow-empty-groups", "--dev-per-class", "1"]) == 0
    assert "development" in capsys.readouterr().out
    assert (dev_root / "annotations" / "lvis_v1_dev.json").is_file()
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
    html = (tmp_path / "runs" / "efl" / "report.html").read_text().lower()
    assert "per-class box ap" in html and "gradient ratio" in html
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


# --------------------------------------------------------------------------------------------
# Help texts and messages
# --------------------------------------------------------------------------------------------

def _help(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv + ["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_every_option_has_help_and_no_rest_markup(capsys):
    import argparse

    from eqlosses.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"demo", "data", "train", "eval", "compare", "plot"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"eqlosses {name} {action.dest}: no help text"
        assert "``" not in _help([name], capsys), name
    assert "``" not in _help([], capsys)


def test_train_help_lists_the_losses_of_each_task_and_where_runs_go(capsys):
    import eqlosses.losses

    text = _help(["train"], capsys)
    lines = {}
    for task in ("cls", "det", "seg"):  # "  cls: ce, bce, ..." possibly wrapped onto more lines
        first, *rest = text.split(f"\n  {task}: ", 1)[1].splitlines()
        indent = " " * (len(task) + 4)
        for line in rest:
            if not line.startswith(indent) or line[len(indent)] == " ":
                break
            first += " " + line
        lines[task] = set(first.replace(",", " ").split())
    for task in lines:
        assert set(eqlosses.losses.losses_for(task)) <= lines[task], task
    assert {"softmax_eql", "balanced_softmax", "ce"} <= lines["cls"]
    assert {"sigmoid_eql", "efl", "eqfl", "seesaw"} <= lines["det"]
    assert "softmax_eql" in lines["seg"] and not {"seesaw", "eqfl"} & lines["seg"]
    flat = " ".join(text.split())
    for words in ("output_dir/name", "runs/<auto name>", "config.yaml", "checkpoint.pt",
                  "--resume --run runs/NAME", "data.num_workers"):
        assert words in flat, words


def test_fashion_mnist_not_found_says_how_to_point_to_it(tmp_path, capsys):
    assert main(["train", "cls", "--set", "data.name=fashion_mnist", "--set",
                 f"data.root={tmp_path / 'nowhere'}", "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "nowhere") in err
    for words in ("--set data.root=DIR", "apt-get install dataset-fashion-mnist",
                  "/usr/share/datasets/fashion-mnist", "$EQLOSSES_FASHION_MNIST",
                  "data.name=embedded"):
        assert words in err, words


# --------------------------------------------------------------------------------------------
# Resume, --run and Ctrl-C (the training itself replaced: what the command hands it)
# --------------------------------------------------------------------------------------------

class _Started(Exception):
    """Raised by the stand-in for the training function once it has been handed a run."""


@pytest.fixture
def handed(monkeypatch):
    """Replace classification.train; record what the command passes it."""
    from eqlosses.tasks import classification

    calls = []

    def fake_train(cfg, resume=False, overwrite=False):
        calls.append({"cfg": cfg, "resume": resume, "overwrite": overwrite,
                      "run_dir": classification.run_dir_for(cfg)})
        raise _Started

    monkeypatch.setattr(classification, "train", fake_train)
    return calls


def _stopped_run(run_dir, *overrides, checkpoint=True):
    """A run directory as a run started with ``overrides`` leaves it when stopped."""
    from eqlosses.config import load_config, save_config

    cfg = load_config(None, ["optim.epochs=2", "data.batch_size=512", "loss.name=ce",
                             f"output_dir={run_dir.parent}", f"name={run_dir.name}",
                             *overrides])
    save_config(cfg, run_dir / "config.yaml")
    if checkpoint:
        (run_dir / "checkpoint.pt").write_bytes(b"")  # the command only checks it is there
    return cfg


def test_resume_continues_with_the_saved_configuration(tmp_path, handed):
    run = tmp_path / "runs" / "r"
    _stopped_run(run)
    with pytest.raises(_Started):
        main(["train", "cls", "--resume", "--run", str(run)])
    call = handed[-1]
    cfg = call["cfg"]
    assert call["resume"] and not call["overwrite"] and call["run_dir"] == run
    assert (cfg.optim.epochs, cfg.data.batch_size, cfg.loss.name) == (2, 512, "ce")
    # located by output_dir/name instead, agreeing settings and allowed changes accepted
    with pytest.raises(_Started):
        main(["train", "cls", "--resume", "--set", f"output_dir={run.parent}", "--set",
              "name=r", "--set", "optim.epochs=2", "--set", "device=cpu", "--set",
              "data.num_workers=1"])
    cfg = handed[-1]["cfg"]
    assert handed[-1]["run_dir"] == run and cfg.optim.epochs == 2 and cfg.device == "cpu"
    assert cfg.data.num_workers == 1
    # an argument of the run's loss given again (not one the default loss takes)
    other = tmp_path / "runs" / "eqls"
    _stopped_run(other, "loss.name=eql_softmax", "loss.lambda_=0.05")
    with pytest.raises(_Started):
        main(["train", "cls", "--resume", "--run", str(other), "--set", "loss.lambda_=0.05"])
    assert handed[-1]["cfg"].loss.kwargs == {"lambda_": 0.05}


def test_resume_follows_a_moved_run(tmp_path, handed):
    run = tmp_path / "moved" / "r2"
    _stopped_run(run, "output_dir=elsewhere", "name=r")  # saved where it was first trained
    with pytest.raises(_Started):
        main(["train", "cls", "--resume", "--run", str(run)])
    assert handed[-1]["run_dir"] == run and handed[-1]["cfg"].optim.epochs == 2


def test_resume_refusals_are_one_line_and_say_how_to_proceed(tmp_path, handed, capsys):
    run = tmp_path / "runs" / "r"
    _stopped_run(run)
    assert main(["train", "cls", "--resume", "--run", str(run), "--set", "optim.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "optim.epochs=3" in err and "the run has optim.epochs=2" in err
    assert "drop this setting" in err and "--overwrite" in err
    assert main(["train", "cls", "--resume", "--run", str(tmp_path / "runs" / "x")]) == 2
    err = capsys.readouterr().err
    assert f"no run to resume in {tmp_path / 'runs' / 'x'}" in err and "runs in" in err
    assert ": r)" in err  # the runs that are there
    _stopped_run(tmp_path / "runs" / "early", checkpoint=False)
    assert main(["train", "cls", "--resume", "--run", str(tmp_path / "runs" / "early")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume" in err and "--overwrite" in err
    assert f"--config {tmp_path / 'runs' / 'early' / 'config.yaml'}" in err
    assert not handed  # nothing was trained
    with pytest.raises(SystemExit):
        main(["train", "cls", "--resume", "--overwrite", "--run", str(run)])
    assert "not allowed with" in capsys.readouterr().err


def test_run_option_names_the_run_directory_of_a_new_run(tmp_path, handed, capsys):
    with pytest.raises(_Started):
        main(["train", "cls", "--run", str(tmp_path / "a" / "b"), "--set", "optim.epochs=2"])
    assert handed[-1]["run_dir"] == tmp_path / "a" / "b" and not handed[-1]["resume"]
    for resume in ([], ["--resume"]):
        assert main(["train", "cls", *resume, "--run", str(tmp_path / "a" / "b"), "--set",
                     "name=c"]) == 2
        assert "different run directories" in capsys.readouterr().err
    assert len(handed) == 1


def test_ctrl_c_prints_the_checkpoint_and_the_resume_command(tmp_path, monkeypatch, capsys):
    from eqlosses.tasks import classification

    def interrupted(cfg, resume=False, overwrite=False):
        run_dir = classification.run_dir_for(cfg)
        if cfg.seed == 0:  # stopped after its first checkpoint
            run_dir.mkdir(parents=True)
            (run_dir / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(classification, "train", interrupted)
    run = tmp_path / "my runs" / "r"
    assert main(["train", "cls", "--run", str(run)]) == 130
    err = capsys.readouterr().err
    assert f"the checkpoint is {run / 'checkpoint.pt'}" in err
    command = err.split("continue the run with: ")[1].splitlines()[0]
    assert command == f"eqlosses train cls --resume --run '{run}'"  # quoted: a space
    assert main(["train", "cls", "--set", "seed=1", "--set", f"output_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err
    assert "before the run's first checkpoint" in err and "--resume" not in err
    assert main(["demo", "--out", str(tmp_path / "demo"), "--losses", "ce"]) == 130
    err = capsys.readouterr().err
    assert f"eqlosses train cls --resume --run {tmp_path / 'demo' / 'ce'}" in err


# --------------------------------------------------------------------------------------------
# The real thing: a run stopped by Ctrl-C, resumed by the printed command
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_then_the_printed_command_finishes_the_run_as_configured(tmp_path, monkeypatch,
                                                                        capsys):
    import os
    import shlex
    import signal

    import torch

    from eqlosses.tasks.common import load_checkpoint

    small = ["--set", "optim.epochs=2", "--set", "data.batch_size=512", "--set",
             "model.width=4", "--set", "eval.every_epochs=2", "--set", "progress=false",
             "--set", "tensorboard=false", "--set", "loss.name=softmax_eql"]
    assert main(["train", "cls", *small, "--run", str(tmp_path / "straight")]) == 0
    original = torch.optim.SGD.zero_grad
    calls = {"n": 0}

    def ctrl_c_in_step_3(self, *args, **kwargs):  # a real SIGINT, in the middle of epoch 0
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "zero_grad", ctrl_c_in_step_3)
    capsys.readouterr()
    assert main(["train", "cls", *small, "--set", f"output_dir={tmp_path}", "--set",
                 "name=stopped"]) == 130
    monkeypatch.setattr(torch.optim.SGD, "zero_grad", original)
    err = capsys.readouterr().err
    stopped = tmp_path / "stopped"
    assert f"the checkpoint is {stopped / 'checkpoint.pt'}" in err
    assert load_checkpoint(stopped / "checkpoint.pt")["step"] == 3
    command = shlex.split(err.split("continue the run with: ")[1].splitlines()[0])
    assert command[:5] == ["eqlosses", "train", "cls", "--resume", "--run"]
    # another number of epochs is refused, naming both; the printed command, with a setting
    # that agrees and one that may change, finishes the run
    assert main(command[1:] + ["--set", "optim.epochs=3"]) == 2
    assert "optim.epochs=3" in capsys.readouterr().err
    assert main(command[1:] + ["--set", "data.batch_size=512", "--set", "log_every=1"]) == 0
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight",
                                                                             "stopped"))
    assert b["epoch"] == 2 and b["step"] == a["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert "log_every: 1" in (stopped / "config.yaml").read_text()


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README runs as it stands (each in a fresh namespace)."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # the examples write files
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("rank", [0, 1])
def test_train_prints_its_results_on_the_first_process_only(tmp_path, monkeypatch, capsys, rank):
    """Under torchrun every process runs the command; the results table and the output
    directory are printed by rank 0 alone (the run itself is stubbed out here)."""
    from eqlosses import distributed
    from eqlosses.tasks import classification, reporting

    result = {"name": "r", "loss": "ce", "metrics": {"top1": 0.5, "groups": {}}}
    monkeypatch.setattr(classification, "train", lambda cfg, **kw: result)
    monkeypatch.setattr(reporting, "format_table", lambda rows: "RESULTS TABLE")
    monkeypatch.setattr(reporting, "report_run", lambda run_dir: run_dir / "report.html")
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    assert main(["train", "cls", "--run", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    if rank == 0:
        assert "RESULTS TABLE" in out and f"outputs in {tmp_path / 'r'}" in out
    else:
        assert out == ""


def test_fused_kernel_that_cannot_be_built_is_one_clear_line(monkeypatch, capsys, tmp_path):
    from eqlosses.functional import fused

    def no_compiler(verbose):
        raise OSError("c++: not found")

    monkeypatch.setattr(fused, "_built", None)
    monkeypatch.setattr(fused, "_build", no_compiler)
    monkeypatch.setenv("EQLOSSES_FUSED_CPU", "1")
    assert main(["train", "cls", *TINY, "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "EQLOSSES_FUSED_CPU=1: eqlosses could not build its fused CPU kernel" in err
    assert "Traceback" not in err and not fused.fused_cpu_kernel_enabled()


@pytest.mark.slow
def test_train_on_the_fused_kernel_from_the_environment(fused_kernel, monkeypatch, capsys,
                                                        tmp_path):
    served = []
    real = fused_kernel.kernel_for
    monkeypatch.setattr(fused_kernel, "kernel_for",
                        lambda *a: served.append(real(*a) is not None) or real(*a))
    fused_kernel.disable_fused_cpu_kernel()  # the environment turns it on
    monkeypatch.setenv("EQLOSSES_FUSED_CPU", "1")
    assert main(["train", "cls", *TINY, "--set", f"output_dir={tmp_path}", "--set",
                 "loss.name=softmax_eql"]) == 0
    assert "use the fused CPU kernel" in capsys.readouterr().err
    assert served and all(served)  # every training step (and evaluation) on the kernel
