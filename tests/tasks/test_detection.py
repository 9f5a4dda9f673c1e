"""The detection pipeline end to end on a tiny generated canvas benchmark (seconds)."""

import json
import os

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("faster_coco_eval")

from eqlosses.config import ConfigError, load_config  # noqa: E402
from eqlosses.monitor.recorder import read_stats  # noqa: E402
from eqlosses.data.canvas import make_detection  # noqa: E402
from eqlosses.tasks import detection as det  # noqa: E402
from eqlosses.tasks.common import Progress, load_checkpoint  # noqa: E402
from tests.dist_utils import free_port, spawn_and_wait  # noqa: E402

#: pipeline tests (they train models): outside the quick loop, run by CI
pytestmark = pytest.mark.slow


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
    pos = read_stats(run).pos_grad[-1]
    assert len(pos) == 60 and pos.sum() > 0
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
    with pytest.raises(ValueError,
                       match=r"model.arch=retinanet\).*does not fit the dense head"):
        det.train(_cfg(tmp_path, canvas, "model.arch=retinanet", "loss.name=sigmoid_eql",
                       name="bad"))
    with pytest.raises(ValueError, match=r"model.arch=faster_rcnn\).*does not fit the roi head"):
        det.train(_cfg(tmp_path, canvas, "loss.name=softmax_eql", name="bad2"))
    with pytest.raises(ValueError, match="data.train_ann"):
        det.train(_cfg(tmp_path, canvas, "data.name=lvis", name="bad3"))
    with pytest.raises(ValueError, match="loss.name 'ce' in the checkpoint"):
        det.train(_cfg(tmp_path, canvas, "loss.name=bce", name="ce"), resume=True)
    with pytest.raises(ConfigError, match="task is fixed"):
        _cfg(tmp_path, canvas, "task=seg")


def _ddp_worker(rank, port, out_dir, canvas):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from eqlosses.metrics import detection as metrics_det

    seen = []
    original = metrics_det.LVISEvaluator.update

    def spy(self, outputs, image_ids):  # which images this rank evaluates
        image_ids = list(image_ids)
        seen.extend(image_ids)
        return original(self, outputs, image_ids)

    metrics_det.LVISEvaluator.update = spy
    built = []
    build_criterion = det.build_criterion
    det.build_criterion = lambda *a, **k: built.append(build_criterion(*a, **k)) or built[-1]
    cfg = _cfg(out_dir, canvas, "model.arch=retinanet", "loss.name=efl", "data.batch_size=4",
               "data.max_val_images=null", name="ddp")
    result = det.train(cfg)
    stats = built[0].stats
    torch.save({"metrics": result["metrics"], "seen": seen, "pos_grad": stats.pos_grad.clone(),
                "neg_grad": stats.neg_grad.clone()}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_share_statistics_and_evaluate_every_image_once(tmp_path, canvas):
    spawn_and_wait(_ddp_worker, (free_port(), str(tmp_path), str(canvas)), 2, 300,
                   "2-process detection training")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    num_val = len(json.loads((canvas / "annotations" / "lvis_v1_val.json").read_text())
                  ["images"])
    assert sorted(r0["seen"] + r1["seen"]) == sorted(set(r0["seen"] + r1["seen"]))
    assert len(r0["seen"]) + len(r1["seen"]) == num_val  # every image once, no padding
    assert "APr" in r0["metrics"] and r1["metrics"] == {}  # rank 0 gathers and computes
    assert r0["metrics"]["bbox"]["num_images"] == num_val
    # EFL statistics: one all-reduce per step, identical on both ranks
    assert torch.equal(r0["pos_grad"], r1["pos_grad"]) and r0["pos_grad"].sum() > 0
    assert torch.equal(r0["neg_grad"], r1["neg_grad"])


def test_eval_split_dev_evaluates_the_development_canvases(tmp_path, canvas):
    import json as _json

    root = tmp_path / "with-dev"
    make_detection(root, n_max=8, imbalance=8, val_per_class=1, dev_per_class=1, size=64,
                   max_scale=1.5, check_groups=False)
    data = det.build_data(_cfg(tmp_path, root, "data.eval_split=dev",
                               "data.max_val_images=null"))
    dev = _json.loads((root / "annotations" / "lvis_v1_dev.json").read_text())
    assert data.val_ann == root / "annotations" / "lvis_v1_dev.json"
    assert len(data.val) == len(dev["images"])
    plain = det.build_data(_cfg(tmp_path, root, "data.max_val_images=null"))
    assert plain.val_ann.name == "lvis_v1_val.json"
    assert len(plain.train) == len(data.train)  # the same training canvases either way
    # choose on dev, then evaluate the checkpoint on the validation (test) canvases once
    det.train(_cfg(tmp_path, root, "data.eval_split=dev", "loss.name=ce", *RCNN_SMALL,
                   name="dev"))
    _, cfg = det.evaluate_checkpoint(tmp_path / "dev" / "checkpoint.pt", device="cpu",
                                     overrides=["data.eval_split=val"])
    assert cfg.data.eval_split == "val"
    with pytest.raises(ValueError, match="no development split.*--dev-per-class"):
        det.build_data(_cfg(tmp_path, canvas, "data.eval_split=dev"))
    with pytest.raises(ValueError, match="must be val or dev"):
        det.build_data(_cfg(tmp_path, canvas, "data.eval_split=test"))
    with pytest.raises(ValueError, match="development annotations as data.val_ann"):
        det.build_data(_cfg(tmp_path, canvas, "data.name=lvis", "data.eval_split=dev"))
