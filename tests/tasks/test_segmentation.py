"""The segmentation pipeline end to end on a tiny generated canvas benchmark (seconds)."""

import json

import pytest
import torch

pytest.importorskip("torchvision")

from eqlosses.config import load_config  # noqa: E402
from eqlosses.monitor.recorder import read_stats  # noqa: E402
from eqlosses.data.canvas import make_segmentation  # noqa: E402
from eqlosses.tasks import segmentation as seg  # noqa: E402
from eqlosses.tasks.common import Progress, load_checkpoint  # noqa: E402

#: pipeline tests (they train models): outside the quick loop, run by CI
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def canvas(tmp_path_factory):
    root = tmp_path_factory.mktemp("canvas-seg")
    make_segmentation(root, overwrite=True, n_max=8, imbalance=8, val_per_class=1, size=64,
                      max_scale=1.5)
    return root


def _cfg(tmp_path, canvas, *overrides, name="run"):
    return load_config(None, [f"output_dir={tmp_path}", f"name={name}", f"data.root={canvas}",
                              "model.arch=tiny_deeplab", "model.backbone=null",
                              "model.options.width=8", "data.crop_size=48", "optim.epochs=1",
                              "progress=false", "tensorboard=false", *overrides], task="seg")


@pytest.mark.parametrize("loss", ["ce", "balanced_softmax", "softmax_eql", "focal"])
def test_each_loss_trains_and_reports_group_miou(tmp_path, canvas, loss):
    result = seg.train(_cfg(tmp_path, canvas, f"loss.name={loss}", "stats_every=1", name=loss))
    m = result["metrics"]
    assert 0 <= m["miou"] <= 1 and len(m["per_class_iou"]) == 61
    assert set(m["groups"]) == {"head", "body", "tail"}
    meta = json.loads((canvas / "classes.json").read_text())
    assert result["train_counts"] == meta["train_pixel_counts"]  # counted from the files
    if loss == "softmax_eql":
        # statistics per class over pixels: the background class dominates the positives
        pos = read_stats(tmp_path / loss).pos_grad[-1].tolist()
        assert len(pos) == 61 and pos[0] == max(pos) > 0


def test_resume_after_ctrl_c_is_exact(tmp_path, canvas, monkeypatch):
    args = ("optim.epochs=2", "loss.name=softmax_eql", "data.batch_size=4")
    seg.train(_cfg(tmp_path, canvas, *args, name="straight"))
    original = Progress.update
    calls = {"n": 0}

    def stop_at_step_5(self, done, samples, **values):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, done, samples, **values)

    monkeypatch.setattr(Progress, "update", stop_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        seg.train(_cfg(tmp_path, canvas, *args, name="stopped"))
    monkeypatch.setattr(Progress, "update", original)
    assert load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")["step"] == 5
    seg.train(_cfg(tmp_path, canvas, *args, name="stopped"), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["criterion"]["stats.pos_grad"], b["criterion"]["stats.pos_grad"])


def test_eval_checkpoint_and_clear_errors(tmp_path, canvas):
    seg.train(_cfg(tmp_path, canvas, "loss.name=ce", name="ce"))
    metrics, cfg = seg.evaluate_checkpoint(tmp_path / "ce" / "checkpoint.pt", device="cpu")
    assert cfg.loss.name == "ce" and "miou" in metrics
    with pytest.raises(ValueError,
                       match="does not fit the seg head.*losses that fit: balanced_softmax, ce"):
        seg.train(_cfg(tmp_path, canvas, "loss.name=sigmoid_eql", name="bad"))
    with pytest.raises(FileNotFoundError):
        seg.train(_cfg(tmp_path, canvas, "data.name=ade20k", f"data.root={tmp_path}/none",
                       name="bad2"))
    with pytest.raises(ValueError, match="not an eqlosses 'seg' checkpoint"):
        seg.evaluate_checkpoint(_cls_checkpoint(tmp_path), device="cpu")


def _cls_checkpoint(tmp_path):
    path = tmp_path / "cls.pt"
    torch.save({"format": "eqlosses-cls-1"}, path)
    return path
