"""Real two-process runs of torch.distributed (gloo, CPU).

Each test spawns 2 processes that join a gloo process group on a free local TCP port, run a
loss for a few training steps on their share of a batch and write what they saw (losses,
gradients, statistics) to ``tmp_path`` with ``torch.save``. The parent process (which never
joins a process group) compares the ranks with each other, with the golden 2-process file and
with one process running the whole batch.

The rule under test (DESIGN.md, ``eqlosses.distributed``): exactly one SUM all-reduce of the
increments per training forward on every rank, so the statistics are identical everywhere and
equal to the statistics of one process seeing the concatenated batch.
"""

import os
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eqlosses import EqualizedFocalLoss, SeesawLoss, SigmoidEQLLoss, SoftmaxEQLLoss
from eqlosses.distributed import mean_across_processes, rank, world_size
from eqlosses.functional import seesaw_loss
from tests.dist_utils import free_port, spawn_and_wait

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden"
WORLD = 2
JOIN_TIMEOUT_S = 90.0  # the parent gives up (and fails the test) after this long
COLLECTIVE_TIMEOUT = timedelta(seconds=30)  # a collective missing on one rank errors out


# --------------------------------------------------------------------------------------------
# Spawning machinery (children run module-level functions, so everything here is picklable)
# --------------------------------------------------------------------------------------------



def _worker(r, scenario, port, out_dir, payload):
    """Entry point of a spawned process: join the group, run ``scenario``, save its result."""
    torch.set_num_threads(1)  # 2 processes on 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r,
                            world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    try:
        assert world_size() == WORLD and rank() == r
        result = scenario(r, payload)
        torch.save(result, os.path.join(out_dir, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(scenario, payload, out_dir: Path):
    """Run ``scenario(rank, payload)`` on 2 gloo ranks; return the ranks' results."""
    spawn_and_wait(_worker, (scenario, free_port(), str(out_dir), payload), WORLD,
                   JOIN_TIMEOUT_S, f"{scenario.__name__}: the 2-process run")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _half(x, r):
    """Rank r's share (along dim 0) of a full batch; the whole batch for ``r=None``."""
    x = torch.as_tensor(x)
    if r is None:
        return x
    h = x.shape[0] // WORLD
    return x[r * h:(r + 1) * h]


def _close(actual, expected, rtol, atol=0.0, msg=""):
    np.testing.assert_allclose(torch.as_tensor(actual).numpy(), torch.as_tensor(expected).numpy(),
                               rtol=rtol, atol=atol, err_msg=msg)


def _assert_identical_on_ranks(res, keys, where=""):
    for key in keys:
        assert torch.equal(res[0][key], res[1][key]), \
            f"{where}{key} differs between the ranks:\n{res[0][key]}\n{res[1][key]}"


def _long_tail_labels(gen, n, c, bg_frac=0.0, background=None):
    """``n`` labels, class k drawn with probability ~ (k+1)^-1.5; background with bg_frac."""
    probs = torch.arange(1, c + 1, dtype=torch.float64).pow(-1.5)
    labels = torch.multinomial(probs, n, replacement=True, generator=gen)
    if bg_frac:
        labels[torch.rand(n, generator=gen) < bg_frac] = background
    return labels


def _stats_record(crit, loss, logits):
    return {"loss": loss.detach().clone(), "pos_grad": crit.stats.pos_grad.clone(),
            "neg_grad": crit.stats.neg_grad.clone(), "num_updates": crit.stats.num_updates.clone(),
            "num_skipped": crit.stats.num_skipped.clone(), "grad": logits.grad.clone()}


def _stack(records):
    return {k: torch.stack([rec[k] for rec in records]) for k in records[0]}


# --------------------------------------------------------------------------------------------
# Test 1: the golden 2-process run of the reference EQL v2
# --------------------------------------------------------------------------------------------

def _golden_scenario(r, path):
    g = np.load(path)
    crit = SigmoidEQLLoss(num_classes=20)  # defaults: gamma 12, mu 0.8, alpha 4, init 100
    rows = slice(32 * r, 32 * r + 32)
    records = []
    for s in range(g["logits"].shape[0]):
        logits = torch.tensor(g["logits"][s][rows], dtype=torch.float64, requires_grad=True)
        loss = crit(logits, torch.tensor(g["labels"][s][rows]))
        loss.backward()
        rec = _stats_record(crit, loss, logits)
        rec["ratio"] = crit.stats.ratio(crit.init_ratio)
        records.append(rec)
    return _stack(records)


def test_sigmoid_eql_two_processes_match_reference_dist2(tmp_path):
    g = dict(np.load(GOLDEN / "eqlv2_dist2.npz"))
    assert int(g["world_size"]) == WORLD
    res = _spawn(_golden_scenario, str(GOLDEN / "eqlv2.npz"), tmp_path)
    _assert_identical_on_ranks(res, ["pos_grad", "neg_grad", "num_updates"])
    for r in range(WORLD):
        for s in range(5):
            where = f"rank {r}, step {s}: "
            _close(res[r]["loss"][s], g["loss"][r, s], 1e-6, 1e-12, where + "loss")
            _close(res[r]["grad"][s], g["grad"][r, s], 1e-6, 1e-12, where + "grad")
            _close(res[r]["pos_grad"][s], g["pos_grad"][r, s], 1e-6, 1e-12, where + "pos_grad")
            _close(res[r]["neg_grad"][s], g["neg_grad"][r, s], 1e-6, 1e-12, where + "neg_grad")
            _close(res[r]["ratio"][s], g["pos_neg"][r, s], 1e-6, 1e-12, where + "ratio")
        assert res[r]["num_updates"].tolist() == [1, 2, 3, 4, 5]
    # ... and, as the reference's, equal to the single-process statistics of eqlv2.npz.
    single = np.load(GOLDEN / "eqlv2.npz")
    _close(res[0]["pos_grad"], single["pos_grad"], 1e-12, 1e-15, "pos_grad vs 1 process")
    _close(res[0]["neg_grad"], single["neg_grad"], 1e-12, 1e-15, "neg_grad vs 1 process")


# --------------------------------------------------------------------------------------------
# Test 2: two halves on two ranks == the whole batch in one process
# --------------------------------------------------------------------------------------------

C, C_SEG, N, STEPS = 20, 6, 64, 3


def _make_equivalence_data():
    gen = torch.Generator().manual_seed(1234)
    data = {name: [] for name in ("sigmoid_eql", "efl", "softmax_eql", "softmax_eql_seg")}
    for _ in range(STEPS):
        # Sigmoid-EQL: C + 1 columns, 25 % background (label C), 3 ignored rows.
        t = _long_tail_labels(gen, N, C, 0.25, C)
        t[torch.randperm(N, generator=gen)[:3]] = -100
        data["sigmoid_eql"].append((torch.randn(N, C + 1, generator=gen, dtype=torch.float64)
                                    * 2, t))
        # EFL: C columns, 50 % background anchors, 4 ignored rows, mostly negative logits.
        t = _long_tail_labels(gen, N, C, 0.5, C)
        t[torch.randperm(N, generator=gen)[:4]] = -100
        data["efl"].append((torch.randn(N, C, generator=gen, dtype=torch.float64) * 2 - 2, t))
        # Softmax-EQL classification: labels in [0, C), 2 ignored rows.
        t = _long_tail_labels(gen, N, C)
        t[torch.randperm(N, generator=gen)[:2]] = -100
        data["softmax_eql"].append((torch.randn(N, C, generator=gen, dtype=torch.float64) * 2, t))
        # Softmax-EQL segmentation: [B, C, H, W] with ~15 % ignored pixels (255).
        t = _long_tail_labels(gen, 4 * 8 * 8, C_SEG).reshape(4, 8, 8)
        t[torch.rand(4, 8, 8, generator=gen) < 0.15] = 255
        data["softmax_eql_seg"].append(
            (torch.randn(4, C_SEG, 8, 8, generator=gen, dtype=torch.float64) * 2, t))
    return {k: [(x.numpy(), y.numpy()) for x, y in v] for k, v in data.items()}


def _equivalence_run(r, data):
    """All four losses on rank r's half (``r=None``: the whole batch, no process group)."""
    crits = {
        "sigmoid_eql": SigmoidEQLLoss(C),
        "efl": EqualizedFocalLoss(C),
        "softmax_eql": SoftmaxEQLLoss(C, reduction="sum"),
        "softmax_eql_seg": SoftmaxEQLLoss(C_SEG, ignore_index=255, reduction="sum"),
    }
    out = {}
    for name, crit in crits.items():
        records = []
        for logits_np, targets_np in data[name]:
            logits = _half(logits_np, r).clone().requires_grad_(True)
            targets = _half(targets_np, r)
            if name == "efl":
                # The number of positive rows averaged over processes (global count / world).
                positives = ((targets >= 0) & (targets < C)).sum()
                normalizer = mean_across_processes(positives)
                loss = crit(logits, targets, normalizer=normalizer)
            else:
                normalizer = torch.tensor(0.0)
                loss = crit(logits, targets)
            loss.backward()
            rec = _stats_record(crit, loss, logits)
            rec["ratio"] = crit.stats.ratio(getattr(crit, "init_ratio", 1.0))
            rec["normalizer"] = normalizer.detach().clone()
            records.append(rec)
        out[name] = _stack(records)
        del out[name]["grad"]
    return out


def test_two_halves_equal_one_process_on_the_whole_batch(tmp_path):
    data = _make_equivalence_data()
    single = _equivalence_run(None, data)  # no process group in the parent
    res = _spawn(_equivalence_run, data, tmp_path)

    for name in single:
        ranks = [res[0][name], res[1][name]]
        _assert_identical_on_ranks(ranks, ["pos_grad", "neg_grad", "num_updates"], f"{name}: ")
        one = single[name]
        # The statistics must be real: non-zero and moving from step to step.
        assert (one["pos_grad"][-1] > 0).any() and (one["neg_grad"][-1] > 0).all()
        assert not torch.equal(one["pos_grad"][0], one["pos_grad"][-1])
        assert ranks[0]["num_updates"].tolist() == list(range(1, STEPS + 1))
        # EFL: each rank divides by (global positives / 2), so its increments are 2x the
        # single-process ones; the other losses' statistics are not normalised per rank.
        factor = 2.0 if name == "efl" else 1.0
        for key in ("pos_grad", "neg_grad"):
            _close(ranks[0][key], factor * one[key], 1e-9, 1e-15, f"{name} {key}")
        _close(ranks[0]["ratio"], one["ratio"], 1e-8, 1e-15, f"{name} ratio")

    # EFL's normaliser is the global positive count over the world size on each rank.
    efl_rank_norm = res[0]["efl"]["normalizer"]
    assert torch.equal(efl_rank_norm, res[1]["efl"]["normalizer"])
    _close(efl_rank_norm.double() * WORLD, single["efl"]["normalizer"], 0, 0, "EFL normalizer")
    assert (single["efl"]["normalizer"] > 0).all()

    # The rank losses add up to the single-process loss (the same weights were in force).
    loss = {name: res[0][name]["loss"] + res[1][name]["loss"] for name in single}
    _close(loss["softmax_eql"], single["softmax_eql"]["loss"], 1e-12, 0, "softmax loss")
    _close(loss["softmax_eql_seg"], single["softmax_eql_seg"]["loss"], 1e-12, 0, "seg loss")
    # (EFL's ratio is scale invariant only up to its 1e-10 eps, hence the looser tolerance.)
    _close(loss["efl"], 2 * single["efl"]["loss"], 1e-8, 0, "EFL loss")
    # Sigmoid-EQL's mean is over the local non-ignored rows: reweight to the global mean.
    valid = torch.stack([torch.stack([(_half(t, r) != -100).sum() for _, t in
                                      data["sigmoid_eql"]]) for r in range(WORLD)]).double()
    weighted = (res[0]["sigmoid_eql"]["loss"] * valid[0] + res[1]["sigmoid_eql"]["loss"]
                * valid[1]) / valid.sum(0)
    _close(weighted, single["sigmoid_eql"]["loss"], 1e-12, 0, "sigmoid loss")


# --------------------------------------------------------------------------------------------
# Test 3: an empty batch on one rank still joins the one collective
# --------------------------------------------------------------------------------------------

C_EMPTY = 5
EMPTY_CASES = [("sigmoid_eql", "mean"), ("sigmoid_eql", "sum"), ("softmax_eql", "mean")]


def _empty_case_loss(name, reduction):
    if name == "sigmoid_eql":
        return SigmoidEQLLoss(C_EMPTY, reduction=reduction), C_EMPTY + 1
    return SoftmaxEQLLoss(C_EMPTY, reduction=reduction), C_EMPTY


def _make_rank1_batches():
    """Two steps of 8 rows for rank 1, wide enough for both losses (sliced to their columns)."""
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(8, C_EMPTY + 1, generator=gen, dtype=torch.float64).numpy(),
             _long_tail_labels(gen, 8, C_EMPTY, 0.25, C_EMPTY).numpy()) for _ in range(2)]


def _empty_targets(name, targets_np):
    t = torch.tensor(targets_np)
    if name == "softmax_eql":  # no background class for softmax: relabel it as class 0
        t[t == C_EMPTY] = 0
    return t


def _empty_batch_scenario(r, batches):
    out = {}
    for name, reduction in EMPTY_CASES:
        crit, channels = _empty_case_loss(name, reduction)
        records = []
        for logits_np, targets_np in batches:
            if r == 0:
                logits = torch.zeros(0, channels, dtype=torch.float64, requires_grad=True)
                targets = torch.zeros(0, dtype=torch.int64)
            else:
                logits = torch.tensor(logits_np[:, :channels], requires_grad=True)
                targets = _empty_targets(name, targets_np)
            loss = crit(logits, targets)
            loss.backward()
            records.append(_stats_record(crit, loss, logits))
        rec = {k: torch.stack([x[k] for x in records]) for k in records[0] if k != "grad"}
        rec["grad_shapes"] = torch.tensor([list(x["grad"].shape) for x in records])
        rec["grads_finite"] = torch.tensor([bool(torch.isfinite(x["grad"]).all())
                                            for x in records])
        out[f"{name}/{reduction}"] = rec
    return out


def test_empty_batch_on_one_rank_joins_the_collective(tmp_path):
    batches = _make_rank1_batches()
    res = _spawn(_empty_batch_scenario, batches, tmp_path)
    for name, reduction in EMPTY_CASES:
        case = f"{name}/{reduction}"
        ranks = [res[0][case], res[1][case]]
        _assert_identical_on_ranks(ranks, ["pos_grad", "neg_grad", "num_updates", "num_skipped"],
                                   f"{case}: ")
        assert ranks[0]["num_updates"].tolist() == [1, 2], case
        # Rank 0: loss 0, and backward gave a [0, channels] gradient.
        crit, channels = _empty_case_loss(name, reduction)
        assert torch.equal(ranks[0]["loss"], torch.zeros(2, dtype=torch.float64)), case
        assert ranks[0]["grad_shapes"].tolist() == [[0, channels]] * 2, case
        assert ranks[1]["grad_shapes"].tolist() == [[8, channels]] * 2, case
        assert ranks[1]["grads_finite"].all(), case
        # The statistics are rank 1's alone, as one process on rank 1's batches has them.
        for s, (logits_np, targets_np) in enumerate(batches):
            logits = torch.tensor(logits_np[:, :channels], requires_grad=True)
            loss = crit(logits, _empty_targets(name, targets_np))
            loss.backward()
            _close(ranks[1]["loss"][s], loss.detach(), 1e-12, 0, f"{case} step {s} rank-1 loss")
            _close(ranks[0]["pos_grad"][s], crit.stats.pos_grad, 1e-12, 0, f"{case} pos_grad")
            _close(ranks[0]["neg_grad"][s], crit.stats.neg_grad, 1e-12, 0, f"{case} neg_grad")
        assert (crit.stats.pos_grad > 0).any(), case


# --------------------------------------------------------------------------------------------
# Test 4: Seesaw counts are summed over processes
# --------------------------------------------------------------------------------------------

C_SEESAW = 5


def _make_seesaw_batches():
    """Per rank, per step: (logits [12, C + 2], labels); the ranks' labels differ."""
    gen = torch.Generator().manual_seed(11)
    batches = []
    for r in range(WORLD):
        steps = []
        for _ in range(3):
            # Rank 0 mostly sees classes 0-1 and background, rank 1 mostly classes 2-4.
            labels = torch.randint(0, 2, (12,), generator=gen) if r == 0 else \
                torch.randint(2, C_SEESAW, (12,), generator=gen)
            labels[torch.rand(12, generator=gen) < 0.25] = C_SEESAW  # background
            labels[0] = -100  # one ignored row
            logits = torch.randn(12, C_SEESAW + 2, generator=gen, dtype=torch.float64)
            steps.append((logits.numpy(), labels.numpy()))
        batches.append(steps)
    return batches


def _seesaw_scenario(r, batches):
    crit = SeesawLoss(num_classes=C_SEESAW)
    counts, losses = [], []
    for logits_np, labels_np in batches[r]:
        logits = torch.tensor(logits_np, requires_grad=True)
        loss = crit(logits, torch.tensor(labels_np))
        loss.backward()
        counts.append(crit.cum_samples.clone())
        losses.append(loss.detach())
    return {"cum_samples": torch.stack(counts), "loss": torch.stack(losses)}


def test_seesaw_counts_are_summed_over_processes(tmp_path):
    batches = _make_seesaw_batches()
    res = _spawn(_seesaw_scenario, batches, tmp_path)
    _assert_identical_on_ranks(res, ["cum_samples"])
    expected = torch.zeros(C_SEESAW + 1, dtype=torch.float64)
    for s in range(3):
        for r in range(WORLD):
            labels = torch.tensor(batches[r][s][1])
            expected += torch.bincount(labels[labels != -100], minlength=C_SEESAW + 1)
        assert torch.equal(res[0]["cum_samples"][s], expected), (s, res[0]["cum_samples"][s])
        # Each rank's loss used the global counts (updated with this step's batches first).
        for r in range(WORLD):
            logits, labels = (torch.tensor(a) for a in batches[r][s])
            ref = seesaw_loss(logits, labels, class_counts=expected[:C_SEESAW])
            _close(res[r]["loss"][s], ref, 1e-12, 0, f"rank {r} step {s} loss")
    # Both ranks' labels are in the counts: neither rank's local counts would match.
    assert (expected[:2] > 0).all() and (expected[2:C_SEESAW] > 0).all()


# --------------------------------------------------------------------------------------------
# Test 5: a non-finite increment on one rank makes every rank skip the update
# --------------------------------------------------------------------------------------------

C_NAN, N_NAN, NAN_STEP = 8, 16, 1


def _make_nan_batches():
    gen = torch.Generator().manual_seed(5)
    batches = []
    for s in range(4):
        logits = torch.randn(N_NAN, C_NAN + 1, generator=gen, dtype=torch.float64)
        if s == NAN_STEP:
            logits[N_NAN // 2 + 3, 2] = float("nan")  # a row of rank 1's half
        batches.append((logits.numpy(), _long_tail_labels(gen, N_NAN, C_NAN, 0.25,
                                                          C_NAN).numpy()))
    return batches


def _nan_run(r, batches):
    crit = SigmoidEQLLoss(C_NAN)
    records = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for logits_np, targets_np in batches:
            logits = _half(logits_np, r).clone().requires_grad_(True)
            loss = crit(logits, _half(targets_np, r))
            loss.backward()
            records.append(_stats_record(crit, loss, logits))
    out = _stack(records)
    del out["grad"]
    out["runtime_warnings"] = torch.tensor(
        sum(issubclass(w.category, RuntimeWarning) and "non-finite" in str(w.message)
            for w in caught))
    return out


def test_non_finite_logits_on_one_rank_skip_the_update_everywhere(tmp_path):
    batches = _make_nan_batches()
    res = _spawn(_nan_run, batches, tmp_path)
    _assert_identical_on_ranks(res, ["pos_grad", "neg_grad", "num_updates", "num_skipped"])
    for r in range(WORLD):
        assert res[r]["num_skipped"].tolist() == [0, 1, 1, 1]
        assert res[r]["num_updates"].tolist() == [1, 1, 2, 3]
        assert int(res[r]["runtime_warnings"]) == 1
        assert torch.isfinite(res[r]["pos_grad"]).all() and torch.isfinite(res[r]["neg_grad"]).all()
    assert torch.isfinite(res[0]["loss"]).all()  # rank 0's own data was finite
    assert torch.isnan(res[1]["loss"][NAN_STEP])
    got = res[0]
    # The skipped step left the statistics exactly as they were; later steps moved them.
    assert torch.equal(got["pos_grad"][NAN_STEP], got["pos_grad"][NAN_STEP - 1])
    assert torch.equal(got["neg_grad"][NAN_STEP], got["neg_grad"][NAN_STEP - 1])
    assert not torch.equal(got["neg_grad"][NAN_STEP + 1], got["neg_grad"][NAN_STEP])
    # ... exactly as one process on the whole batches (which skips the same step).
    single = _nan_run(None, batches)
    assert single["num_updates"].tolist() == [1, 1, 2, 3]
    for key in ("pos_grad", "neg_grad"):
        _close(got[key], single[key], 1e-9, 1e-15, key)
