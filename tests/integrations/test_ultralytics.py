"""eqlosses.integrations.ultralytics: the classification term, YOLO's criterion, trainers.

The term is tested on hand-made tensors (no ultralytics needed); the criterion against
ultralytics' own ``v8DetectionLoss`` on a randomly initialised ``yolo11n.yaml`` (no weights are
downloaded); training, checkpoints, resume and the offline run are slow tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.nn.functional as F

from eqlosses.functional import equalized_focal_loss, equalized_quality_focal_loss
from eqlosses.integrations.ultralytics import (DETECTION_LOSSES, EQLClassificationLoss,
                                                YOLOClassificationTerm, yolo_targets)
from eqlosses.stats import GradientStatistics

C = 5


def _targets(b=2, a=30, c=C, seed=0):
    """YOLO-like assigned soft targets: some anchors with one non-zero score."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(b, a, c)
    fg = torch.rand(b, a, generator=g) < 0.3
    cls = torch.randint(0, c, (b, a), generator=g)
    score = torch.rand(b, a, generator=g) * 0.9 + 0.05
    t[fg, cls[fg]] = score[fg]
    return t, fg, cls, score


def test_yolo_targets_maps_soft_scores_to_labels_quality_and_normaliser():
    t, fg, cls, score = _targets()
    labels, quality, norm = yolo_targets(t)
    assert torch.equal(labels, torch.where(fg, cls, torch.full_like(cls, C)).reshape(-1))
    assert torch.allclose(quality, torch.where(fg, score, torch.zeros_like(score)).reshape(-1))
    assert float(norm) == pytest.approx(max(float(score[fg].sum()), 1.0), rel=1e-6)
    _, _, norm0 = yolo_targets(torch.zeros(1, 4, C))
    assert float(norm0) == 1.0  # clamped, as YOLO does


def test_bce_term_is_yolos_bce_with_closed_form_statistics():
    t, fg, cls, _ = _targets()
    z = torch.randn(2, 30, C, requires_grad=True)
    stats = GradientStatistics(C)
    term = YOLOClassificationTerm("bce", C, stats)
    out = term(z, t)
    norm = max(float(t.sum()), 1.0)
    expected = F.binary_cross_entropy_with_logits(z, t, reduction="none")
    assert torch.allclose(out / norm, expected.sum() / norm, rtol=1e-6)  # YOLO's sum / norm
    (grad,) = torch.autograd.grad(out / norm, z)
    g_ref = (torch.sigmoid(z) - t).detach() / norm
    assert torch.allclose(grad, g_ref, atol=1e-7)
    onehot = torch.zeros_like(t, dtype=torch.bool)
    onehot[fg, cls[fg]] = True
    pos = torch.where(onehot, g_ref.abs(), 0).sum((0, 1))
    neg = torch.where(onehot, 0, g_ref.abs()).sum((0, 1))
    assert torch.allclose(stats.pos_grad.float(), pos, atol=1e-6)
    assert torch.allclose(stats.neg_grad.float(), neg, atol=1e-6)
    assert int(stats.num_updates) == 1


def test_eqfl_and_efl_terms_follow_the_mapping():
    t, fg, cls, score = _targets(seed=1)
    z = torch.randn(2, 30, C)
    labels = torch.where(fg, cls, torch.full_like(cls, C)).reshape(-1)
    quality = torch.where(fg, score, torch.zeros_like(score)).reshape(-1)
    norm = max(float(t.sum()), 1.0)
    ones = torch.ones(C)
    eqfl = YOLOClassificationTerm("eqfl", C, GradientStatistics(C))(z, t) / norm
    ref = equalized_quality_focal_loss(z.reshape(-1, C), labels, quality, ones, normalizer=norm)
    assert torch.allclose(eqfl, ref, rtol=1e-5)
    efl = YOLOClassificationTerm("efl", C, GradientStatistics(C))(z, t) / norm
    ref = equalized_focal_loss(z.reshape(-1, C), labels, ones, normalizer=float(fg.sum()))
    assert torch.allclose(efl, ref, rtol=1e-5)  # hard labels: normalised by the positives


@pytest.mark.parametrize("loss", ["focal", "efl", "eqfl"])
def test_term_statistics_are_the_gradient_split_by_target(loss):
    """The statistics of a step are |d term / d z| summed per class over the positive and the
    negative entries (focal's come from its closed-form tracking, EFL's and EQFL's are theirs;
    checked against autograd)."""
    t, fg, cls, _ = _targets(seed=2)
    z = torch.randn(2, 30, C, requires_grad=True)
    stats = GradientStatistics(C)
    norm = yolo_targets(t)[2]
    (YOLOClassificationTerm(loss, C, stats)(z, t) / norm).backward()
    onehot = torch.zeros_like(t, dtype=torch.bool)
    onehot[fg, cls[fg]] = True
    g = z.grad.abs()
    torch.testing.assert_close(stats.pos_grad.float(), torch.where(onehot, g, 0).sum((0, 1)),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.neg_grad.float(), torch.where(onehot, 0, g).sum((0, 1)),
                               rtol=1e-5, atol=1e-7)
    assert int(stats.num_updates) == 1


@pytest.mark.parametrize("loss", DETECTION_LOSSES)
def test_one_statistics_update_per_training_step_and_none_without_grad(loss):
    t, *_ = _targets()
    stats = GradientStatistics(C)
    term = YOLOClassificationTerm(loss, C, stats)
    z = torch.randn(2, 30, C, requires_grad=True)
    out = term(z, t)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()
    assert int(stats.num_updates) == 1 and float(stats.neg_grad.sum()) > 0
    with torch.no_grad():
        term(z, t)
    assert int(stats.num_updates) == 1
    reader = YOLOClassificationTerm(loss, C, stats, updates_statistics=False)
    reader(z, t).backward()
    assert int(stats.num_updates) == 1


def test_tail_ratio_falls_below_the_head_ratio_on_long_tailed_labels():
    torch.manual_seed(0)
    stats = GradientStatistics(C)
    term = YOLOClassificationTerm("eqfl", C, stats)
    head = torch.nn.Linear(8, C)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    probs = torch.tensor([0.6, 0.25, 0.1, 0.04, 0.01])  # class 0 head, class 4 tail
    for _ in range(25):
        x = torch.randn(1, 300, 8)
        t = torch.zeros(1, 300, C)
        fg = torch.rand(300) < 0.2
        cls = torch.multinomial(probs, 300, replacement=True)
        t[0, fg, cls[fg]] = 0.5 + 0.5 * torch.rand(int(fg.sum()))
        loss = term(head(x), t) / t.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ratio = stats.ratio(1.0)
    assert int(stats.num_updates) == 25
    assert float(ratio[4]) < float(ratio[0])


def test_bad_losses_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="eqfl, efl, focal, bce.*objectness"):
        YOLOClassificationTerm("sigmoid_eql", C, GradientStatistics(C))
    with pytest.raises(ValueError, match="statistics are for 3 classes"):
        YOLOClassificationTerm("eqfl", C, GradientStatistics(3))
    with pytest.raises(ValueError, match="scale_factor"):
        YOLOClassificationTerm("efl", C, GradientStatistics(C), scale_factor=-1.0)
    with pytest.raises(ValueError, match="softmax_eql, balanced_softmax, ce"):
        EQLClassificationLoss("efl", C)


def test_classification_loss_balanced_softmax_needs_and_uses_counts():
    from eqlosses.losses import ClassStatistics

    with pytest.raises(ValueError, match="class_counts"):
        EQLClassificationLoss("balanced_softmax", 3)
    stats = ClassStatistics(torch.tensor([90, 9, 1]), total=100)
    crit = EQLClassificationLoss("balanced_softmax", 3, stats)
    loss, items = crit(torch.zeros(1, 3), {"cls": torch.tensor([2])})
    # balanced softmax at zero logits: -log(n_2 / sum n) = -log(0.01)
    assert float(loss) == pytest.approx(-torch.log(torch.tensor(0.01)).item(), rel=1e-5)
    assert float(items["loss"]) == float(loss)


# -- several processes: each rank normalises by its own batch, the statistics are summed -----

def _yolo_term_rank(r, port, out_dir, world):
    """A spawned rank: one YOLO training step per loss on this rank's half of the anchors,
    normalised as YOLO does (``sum / max(sum t, 1)`` of the rank's own targets)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r,
                            world_size=world)
    try:
        out = {}
        for loss in DETECTION_LOSSES:
            t, z = _rank_batch(r)
            stats = GradientStatistics(C)
            term = YOLOClassificationTerm(loss, C, stats)
            (term(z, t) / yolo_targets(t)[2]).backward()
            out[loss] = stats.state_dict()
        torch.save(out, os.path.join(out_dir, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


def _rank_batch(r):
    t, *_ = _targets(b=2, a=40, seed=10 + r)  # the ranks' batches differ
    z = torch.randn(2, 40, C, generator=torch.Generator().manual_seed(20 + r))
    return t, z.requires_grad_(True)


@pytest.mark.slow
def test_two_ranks_hold_the_sum_of_their_own_normalised_statistics(tmp_path):
    from tests.dist_utils import free_port, spawn_and_wait

    world = 2
    spawn_and_wait(_yolo_term_rank, (free_port(), str(tmp_path), world), world, 90.0,
                   "the two-rank YOLO term run")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for loss in DETECTION_LOSSES:
        alone = []  # each rank's step in this process (no process group): its own increments
        for r in range(world):
            t, z = _rank_batch(r)
            stats = GradientStatistics(C)
            (YOLOClassificationTerm(loss, C, stats)(z, t) / yolo_targets(t)[2]).backward()
            alone.append(stats)
        for key in ("pos_grad", "neg_grad", "num_updates"):
            assert torch.equal(ranks[0][loss][key], ranks[1][loss][key]), (loss, key)
        assert int(ranks[0][loss]["num_updates"]) == 1  # one all-reduced update per step
        for key in ("pos_grad", "neg_grad"):
            summed = getattr(alone[0], key) + getattr(alone[1], key)
            assert (summed > 0).any()
            torch.testing.assert_close(ranks[0][loss][key], summed, rtol=1e-6, atol=1e-9,
                                       msg=f"{loss} {key}")


# -- with ultralytics ---------------------------------------------------------------------

def _import_ultralytics():
    if "ultralytics" not in sys.modules:  # keep its settings out of the user's home
        os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo_cfg_"))
        os.environ.setdefault("YOLO_OFFLINE", "1")
    return pytest.importorskip("ultralytics")


def _yolo(cfg="yolo11n.yaml", nc=C):
    _import_ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=nc, verbose=False)
    model.args = get_cfg(DEFAULT_CFG)
    return model


def _batch(seed, n_img=2, per=4, nc=C):
    g = torch.Generator().manual_seed(seed)
    n = n_img * per
    return {"batch_idx": torch.arange(n_img).repeat_interleave(per).float(),
            "cls": torch.randint(0, nc, (n, 1), generator=g).float(),
            "bboxes": torch.rand(n, 4, generator=g) * torch.tensor([.5, .5, .3, .3])
            + torch.tensor([.25, .25, .1, .1])}


@pytest.fixture(scope="module")
def yolo11n():
    return _yolo()


def test_bce_equals_stock_ultralytics_loss(yolo11n):
    from ultralytics.utils.loss import v8DetectionLoss

    from eqlosses.integrations.ultralytics import EQLDetectionLoss, build_criterion

    model = yolo11n
    stock = v8DetectionLoss(model)
    ours = build_criterion(model, "bce")
    assert isinstance(ours, EQLDetectionLoss) and isinstance(ours, v8DetectionLoss)
    for seed in range(3):
        torch.manual_seed(seed)
        preds = model(torch.rand(2, 3, 64, 64))
        (l0, i0), (l1, i1) = stock(preds, _batch(seed)), ours(preds, _batch(seed))
        assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-5)
        assert i0.keys() == i1.keys()
        for k in i0:
            assert torch.allclose(i0[k], i1[k], rtol=1e-5, atol=1e-5), k
    assert int(ours.stats.num_updates) == 3
    assert getattr(model, "eqlosses_stats") is ours.stats


@pytest.mark.parametrize("loss", ["eqfl", "efl"])
def test_eqlosses_terms_in_yolos_criterion_are_finite_with_one_update(yolo11n, loss):
    from eqlosses.integrations.ultralytics import build_criterion

    crit = build_criterion(yolo11n, loss)
    before = int(crit.stats.num_updates)
    preds = yolo11n(torch.rand(2, 3, 64, 64))
    total, items = crit(preds, _batch(5))
    total.sum().backward()
    grads = [p.grad for p in yolo11n.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(total).all() and set(items) == {"box_loss", "cls_loss", "dfl_loss"}
    assert int(crit.stats.num_updates) == before + 1
    yolo11n.zero_grad()


def test_class_weights_are_refused(yolo11n):
    from eqlosses.integrations.ultralytics import build_criterion

    yolo11n.class_weights = torch.ones(C)
    try:
        with pytest.raises(ValueError, match="cls_pw=0"):
            build_criterion(yolo11n, "eqfl")
    finally:
        yolo11n.class_weights = None


@pytest.mark.slow
def test_end_to_end_head_branches_share_statistics_with_one_update():
    from eqlosses.integrations.ultralytics import build_criterion

    model = _yolo("yolo26n.yaml")
    crit = build_criterion(model, "eqfl")
    assert crit.one2many.stats is crit.one2one.stats is model.eqlosses_stats
    model.train()
    total, items = crit(model(torch.rand(2, 3, 64, 64)), _batch(1))
    total.sum().backward()
    assert torch.isfinite(total).all()
    assert int(model.eqlosses_stats.num_updates) == 1


def test_statistics_keep_float64_through_half_and_deepcopy(yolo11n):
    import copy

    from eqlosses.integrations.ultralytics import statistics_of

    stats = statistics_of(yolo11n)
    stats.pos_grad.fill_(1 / 3)
    copied = copy.deepcopy(yolo11n).half()
    assert copied.eqlosses_stats.pos_grad.dtype == torch.float64
    assert torch.equal(copied.eqlosses_stats.pos_grad, stats.pos_grad)


_TRAIN_SCRIPT = textwrap.dedent("""
    import json, socket, sys, pathlib
    root = pathlib.Path(sys.argv[1])
    from eqlosses.integrations.ultralytics import offline_environment
    offline_environment(root / "cfg", runs_dir=root / "runs")
    import torch
    torch.set_num_threads(1)
    from ultralytics import YOLO
    import eqlosses.integrations.ultralytics as U
    from eqlosses.data.yolo import make_detection_yolo, evaluate_yolo
    s = make_detection_yolo(root / "data", n_max=4, imbalance=2, val_per_class=1,
                            check_groups=False)
    saved = {}

    def on_save(trainer):  # the live statistics when last.pt is written, then stop
        saved["live"] = trainer.model.eqlosses_stats.state_dict()
        saved["ema"] = trainer.ema.ema.eqlosses_stats.state_dict()
        if sys.argv[2] == "stop":
            raise KeyboardInterrupt

    model = YOLO("yolo11n.yaml")
    model.add_callback("on_model_save", on_save)
    try:
        model.train(data=s["data_yaml"], trainer=U.detection_trainer("eqfl", scale_factor=4.0),
                    epochs=2 if sys.argv[2] == "stop" else 1, imgsz=64, batch=8, workers=0, device="cpu", plots=False,
                    val=False, amp=False, verbose=False, project=str(root / "runs"), name="r")
    except KeyboardInterrupt:
        pass
    last = root / "runs" / "r" / "weights" / "last.pt"
    ck = torch.load(last, weights_only=False)
    st = (ck["ema"] or ck["model"]).eqlosses_stats
    out = {"dtype": str(st.pos_grad.dtype), "updates": int(st.num_updates),
           "equal_live": all(torch.equal(v.cpu(), saved["live"][k].cpu())
                             for k, v in st.state_dict().items()),
           "equal_ema": all(torch.equal(v.cpu(), saved["ema"][k].cpu())
                            for k, v in st.state_dict().items()),
           "loss": (ck["ema"] or ck["model"]).eqlosses_loss}
    if sys.argv[2] == "stop":
        restored = {}

        def after_resume(trainer):
            restored["live"] = {k: v.clone() for k, v in
                                trainer.model.eqlosses_stats.state_dict().items()}

        m2 = YOLO(str(last))
        m2.add_callback("on_pretrain_routine_end", after_resume)
        m2.train(resume=True, trainer=U.detection_trainer("eqfl", scale_factor=4.0))
        out["resumed_equal"] = all(torch.equal(restored["live"][k].cpu(), v.cpu())
                                   for k, v in st.state_dict().items())
    else:
        out["ap"] = evaluate_yolo(model, s["data_yaml"], imgsz=64)["AP"]
    (root / "out.json").write_text(json.dumps(out))
""")


def _run_offline(tmp_path, mode, script_text=None):
    """Run a script (default: the detection training script) in a fresh process with the
    network cut where ``unshare -n`` works and an empty HOME; return its ``out.json``."""
    _import_ultralytics()
    script = tmp_path / "script.py"
    script.write_text(_TRAIN_SCRIPT if script_text is None else script_text)
    env = dict(os.environ, HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    env.pop("YOLO_CONFIG_DIR", None)
    cmd = [sys.executable, str(script), str(tmp_path), mode]
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"]).returncode == 0:
        cmd = ["unshare", "-n"] + cmd  # no network at all
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    assert not (tmp_path / "home").exists()  # nothing written to the user's home
    return json.loads((tmp_path / "out.json").read_text())


@pytest.mark.slow
def test_one_epoch_training_offline_saves_statistics_and_evaluates(tmp_path):
    out = _run_offline(tmp_path, "full")
    assert out["dtype"] == "torch.float64" and out["updates"] > 0
    assert out["equal_live"] and out["equal_ema"]  # saved = live statistics, exactly
    assert out["loss"] == {"loss": "eqfl", "kwargs": {"scale_factor": 4.0}}
    assert 0.0 <= out["ap"] <= 1.0


@pytest.mark.slow
def test_resume_restores_statistics_exactly(tmp_path):
    out = _run_offline(tmp_path, "stop")
    assert out["equal_live"] and out["equal_ema"] and out["updates"] > 0
    assert out["resumed_equal"]


# -- classification trainer ------------------------------------------------------------------

_CLS_SCRIPT = textwrap.dedent("""
    import json, sys, pathlib
    root, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
    from eqlosses.integrations.ultralytics import offline_environment
    offline_environment(root / "cfg", runs_dir=root / "runs")
    import numpy as np, torch
    from PIL import Image
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for split, counts in (("train", (12, 4, 2)), ("val", (2, 2, 2))):  # long-tailed train
        for c, n in enumerate(counts):
            d = root / "data" / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.full((16, 16, 3), 40 + 80 * c, np.uint8)
                img += rng.integers(0, 30, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    from ultralytics import YOLO
    import eqlosses.integrations.ultralytics as U
    seen = {}

    def on_save(trainer):  # the live statistics when last.pt is written
        model = trainer.model
        seen["counts"] = trainer.class_statistics.counts.tolist()
        seen["criterion"] = type(model.criterion.loss).__name__
        if hasattr(model, "eqlosses_stats"):
            seen["live"] = {k: v.clone() for k, v in model.eqlosses_stats.state_dict().items()}
            seen["ema"] = {k: v.clone() for k, v in
                           trainer.ema.ema.eqlosses_stats.state_dict().items()}
        if mode == "stop":
            raise KeyboardInterrupt

    trainer = U.classification_trainer("balanced_softmax") if mode == "balanced" else \\
        U.EQLClassificationTrainer
    model = YOLO("yolo11n-cls.yaml")
    model.add_callback("on_model_save", on_save)
    try:
        model.train(data=str(root / "data"), trainer=trainer, epochs=2 if mode == "stop" else 1,
                    imgsz=32, batch=6, workers=0, device="cpu", plots=False, val=False,
                    amp=False, verbose=False, project=str(root / "runs"), name="r")
    except KeyboardInterrupt:
        pass
    last = root / "runs" / "r" / "weights" / "last.pt"
    ck = torch.load(last, weights_only=False)
    saved = ck["ema"] or ck["model"]
    out = {"counts": seen["counts"], "criterion": seen["criterion"],
           "loss": saved.eqlosses_loss, "has_stats": hasattr(saved, "eqlosses_stats")}
    if out["has_stats"]:
        st = saved.eqlosses_stats.state_dict()
        out.update(dtype=str(st["pos_grad"].dtype), updates=int(st["num_updates"]),
                   pos=st["pos_grad"].tolist(),
                   equal_live=all(torch.equal(v, seen["live"][k]) for k, v in st.items()),
                   equal_ema=all(torch.equal(v, seen["ema"][k]) for k, v in st.items()))
    if mode == "stop":
        restored = {}

        def after_resume(trainer):
            restored.update({k: v.clone() for k, v in
                             trainer.model.eqlosses_stats.state_dict().items()})

        try:  # another loss cannot resume these statistics
            YOLO(str(last)).train(resume=True, trainer=U.classification_trainer("ce"))
            out["other_loss"] = "accepted"
        except ValueError as err:
            out["other_loss"] = str(err)
        m2 = YOLO(str(last))
        m2.add_callback("on_pretrain_routine_end", after_resume)
        m2.train(resume=True, trainer=U.EQLClassificationTrainer)
        out["resumed_equal"] = all(torch.equal(restored[k], v) for k, v in st.items())
    (root / "out.json").write_text(json.dumps(out))
""")


@pytest.mark.slow
def test_classification_trainer_softmax_eql_saves_and_resumes_statistics_offline(tmp_path):
    out = _run_offline(tmp_path, "stop", _CLS_SCRIPT)
    assert out["criterion"] == "SoftmaxEQLLoss" and out["counts"] == [12, 4, 2]
    assert out["loss"] == {"loss": "softmax_eql", "kwargs": {}}
    assert out["dtype"] == "torch.float64" and out["updates"] == 3  # 18 images, batch 6
    assert out["equal_live"] and out["equal_ema"]  # saved = live statistics, exactly
    # 'pos' sums 1 - p_y over each class's images: the 12-image class gathers the most
    assert out["pos"][0] > out["pos"][1] > out["pos"][2] > 0
    assert "resume with the same loss" in out["other_loss"]
    assert out["resumed_equal"]


@pytest.mark.slow
def test_classification_trainer_balanced_softmax_uses_the_training_counts(tmp_path):
    out = _run_offline(tmp_path, "balanced", _CLS_SCRIPT)
    assert out["criterion"] == "BalancedSoftmaxLoss" and out["counts"] == [12, 4, 2]
    assert out["loss"] == {"loss": "balanced_softmax", "kwargs": {}}
    assert not out["has_stats"]  # balanced softmax keeps no statistics


# -- YOLO's DDP launcher ---------------------------------------------------------------------

_DDP_SCRIPT = textwrap.dedent("""
    import json, os, pathlib, subprocess, sys
    root = pathlib.Path(sys.argv[1])
    from eqlosses.integrations.ultralytics import offline_environment
    offline_environment(root / "cfg", runs_dir=root / "runs")
    from PIL import Image
    from ultralytics.utils.dist import generate_ddp_file
    import eqlosses.integrations.ultralytics as U
    from eqlosses.data.yolo import make_detection_yolo
    s = make_detection_yolo(root / "data", n_max=4, imbalance=2, val_per_class=1,
                            check_groups=False)
    worker = (  # what a DDP worker does first: load the trainer class from the state file
        "import sys, json; from ultralytics.utils.patches import torch_load; "
        "c = torch_load(sys.argv[1], map_location='cpu')['trainer']; "
        "print(json.dumps([c.__module__, c.__name__, c.eql_loss, dict(c.eql_loss_kwargs)]))")
    out = []
    for trainer in (U.EQLDetectionTrainer, U.detection_trainer("efl", scale_factor=4.0),
                    U.classification_trainer("balanced_softmax")):
        data = str(root / "data" / "yolo" / "data.yaml") if "Detection" in trainer.__name__ \\
            else str(root / "cls")
        model = "yolo11n.yaml"
        if "Classification" in trainer.__name__:
            model = "yolo11n-cls.yaml"
            for split in ("train", "val"):
                for c in range(2):
                    (root / "cls" / split / f"c{c}").mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (8, 8), (60 * c, 0, 0)).save(root / "cls" / split /
                                                                  f"c{c}" / "0.png")
        t = trainer(overrides={"data": data, "model": model, "device": "cpu",
                               "project": str(root / "runs"), "name": "d", "plots": False})
        state = pathlib.Path(generate_ddp_file(t)).with_suffix(".pt")
        proc = subprocess.run([sys.executable, "-c", worker, str(state)], capture_output=True,
                              text=True, env=os.environ)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    (root / "out.json").write_text(json.dumps(out))
""")


@pytest.mark.slow
def test_ddp_launcher_state_file_rebuilds_each_trainer_in_a_fresh_process(tmp_path):
    """YOLO's DDP launcher pickles the trainer class (cloudpickle) into a file that each worker
    loads; a fresh process must get the same class and loss arguments back (offline: the
    launcher would try to install cloudpickle if it were missing)."""
    out = _run_offline(tmp_path, "-", _DDP_SCRIPT)
    module = "eqlosses.integrations.ultralytics"
    assert out == [
        [module, "EQLDetectionTrainer", "eqfl", {}],
        [module, "EQLDetectionTrainer_efl", "efl", {"scale_factor": 4.0}],
        [module, "EQLClassificationTrainer_balanced_softmax", "balanced_softmax", {}],
    ]
