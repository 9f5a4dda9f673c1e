"""The detection pipeline end to end on a tiny generated canvas benchmark (seconds)."""

import json

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("faster_coco_eval")

from eqlosses.config import ConfigError, load_config  # noqa: E402
from eqlosses.data.canvas import make_detection  # noqa: E402
from eqlosses.tasks import detection as det  # noqa: E402
from eqlosses.tasks.common import Progress, load_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def canvas(tmp_path_factory):
    root = tmp_path_factory.mktemp("canvas-det")
    make_detection(root, overwrite=True, n_max=8, imbalance=8, val_per_class=1, size=64,
                   max_scale=1.5, check_groups=False)
    return root


def _cfg(tmp_path, canvas, *overrides, name="run"):
    return load_config(None, [f"output_dir={tmp_path}", f"name={name}", f"data.root={canvas}",
                              "model.backbone=tiny", "model.min_size=64", "model.max_size=64",
                              "optim.epochs=1", "data.batch_size=8", "progress=false",
                              "tensorboard=false", "data.max_val_images=4",
                              "eval.detections_per_img=50", *overrides],
                       task="det")


RCNN_SMALL = ("model.options.box_batch_size_per_image=32",
              "model.options.rpn_post_nms_top_n_train=100",
              "model.options.rpn_post_nms_top_n_test=100")


def test_sigmoid_eql_faster_rcnn_trains_and_reports_lvis_ap(tmp_path, canvas):
    result = det.train(_cfg(tmp_path, canvas, "stats_every=1", *RCNN_SMALL))
    m = result["metrics"]
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert key in m and key in m["bbox"]
    assert len(m["per_class_ap"]) == 60
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["kind"] == "step"]
    assert {"loss_classifier", "loss_box_reg", "loss_objectness"} <= set(steps[0])
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert stats and len(stats[-1]["pos_grad"]) == 60 and sum(stats[-1]["pos_grad"]) > 0
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["format"] == "eqlosses-det-1"
    assert torch.equal(ckpt["criterion"]["stats.pos_grad"],
                       ckpt["model"]["roi_heads.box_loss.stats.pos_grad"])


def test_retinanet_efl_and_mask_rcnn_train(tmp_path, canvas):
    r = det.train(_cfg(tmp_path, canvas, "model.arch=retinanet", "loss.name=efl", name="efl"))
    assert "APr" in r["metrics"]
    m = det.train(_cfg(tmp_path, canvas, "model.arch=mask_rcnn", "loss.name=sigmoid_eql",
                       *RCNN_SMALL, name="mask"))["metrics"]
    assert "segm" in m and "APr" in m["segm"]


def test_resume_after_ctrl_c_is_exact(tmp_path, canvas, monkeypatch):
    args = ("optim.epochs=2", "checkpoint_every_steps=2", "data.sampler=rfs",
            "data.rfs_threshold=0.3", *RCNN_SMALL)
    det.train(_cfg(tmp_path, canvas, *args, name="straight"))
    original = Progress.update
    calls = {"n": 0}

    def stop_at_step_3(self, done, samples, **values):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, done, samples, **values)

    monkeypatch.setattr(Progress, "update", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        det.train(_cfg(tmp_path, canvas, *args, name="stopped"))
    monkeypatch.setattr(Progress, "update", original)
    assert load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")["step"] == 3  # Ctrl-C saves
    det.train(_cfg(tmp_path, canvas, *args, name="stopped"), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_eval_checkpoint_and_clear_errors(tmp_path, canvas):
    det.train(_cfg(tmp_path, canvas, "loss.name=ce", *RCNN_SMALL, name="ce"))
    metrics, cfg = det.evaluate_checkpoint(tmp_path / "ce" / "checkpoint.pt", device="cpu")
    assert cfg.loss.name == "ce" and "APr" in metrics
    with pytest.raises(ValueError, match="does not fit model.arch=retinanet"):
        det.train(_cfg(tmp_path, canvas, "model.arch=retinanet", "loss.name=sigmoid_eql",
                       name="bad"))
    with pytest.raises(ValueError, match="does not fit model.arch=faster_rcnn"):
        det.train(_cfg(tmp_path, canvas, "loss.name=softmax_eql", name="bad2"))
    with pytest.raises(ValueError, match="data.train_ann"):
        det.train(_cfg(tmp_path, canvas, "data.name=lvis", name="bad3"))
    with pytest.raises(ValueError, match="loss.name 'ce' in the checkpoint"):
        det.train(_cfg(tmp_path, canvas, "loss.name=bce", name="ce"), resume=True)
    with pytest.raises(ConfigError, match="task is fixed"):
        _cfg(tmp_path, canvas, "task=seg")
