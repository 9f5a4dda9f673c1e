"""Gradient diagnosis for any loss: closed-form statistics against autograd, group ratios,
the monitor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eqlosses import GradientStatistics
from eqlosses.data.frequency import FrequencyGroups, lvis_groups
from eqlosses.functional.gradients import bce_gradients, cross_entropy_gradients, focal_gradients
from eqlosses.monitor import StatsRecorder, read_stats
from eqlosses.monitor.diagnosis import GradientMonitor, class_ratios, group_ratios


def autograd_split(loss_fn, logits, targets, ignore_index=-100):
    """(pos [K], neg [K]) of |d loss / d z| by autograd: rows of class j add to pos_j, valid
    rows of another class (or background) to neg_j."""
    z = logits.detach().clone().double().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(z), z)
    k = grad.shape[1]
    grad = grad.movedim(1, -1).reshape(-1, k).abs()
    t = targets.reshape(-1)
    valid = t != ignore_index
    onehot = F.one_hot(t.clamp(0, k), k + 1)[:, :k].double() * valid[:, None]
    neg_mask = (1 - onehot) * valid[:, None]
    return (grad * onehot).sum(0), (grad * neg_mask).sum(0)


def close(inc, ref):
    torch.testing.assert_close(inc.pos.double(), ref[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(inc.neg.double(), ref[1], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Closed forms against autograd
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_gradients_match_autograd(reduction):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 5, generator=g) * 3
    y = torch.tensor([0, 1, 1, 4, -100, 2, 0, -100, 3])
    ref = autograd_split(lambda z: F.cross_entropy(z, y, reduction=reduction), z, y)
    close(cross_entropy_gradients(z, y, reduction=reduction), ref)
    close(cross_entropy_gradients(z, y, reduction=reduction, validate=False), ref)


def test_cross_entropy_gradients_with_adjustment_and_pixels():
    g = torch.Generator().manual_seed(1)
    a = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    z = torch.randn(2, 3, 4, 5, generator=g)
    y = torch.randint(0, 3, (2, 4, 5), generator=g)
    y[0, 0, :2] = 255
    ref = autograd_split(lambda z: F.cross_entropy(z + a.view(1, 3, 1, 1).double(), y,
                                                   ignore_index=255), z, y, ignore_index=255)
    close(cross_entropy_gradients(z, y, a, ignore_index=255), ref)


def test_bce_gradients_match_autograd_with_background_and_ignored_rows():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 4, generator=g) * 2
    y = torch.tensor([0, 4, 4, 1, -1, 3, 2, 4])  # 4 = background, -1 ignored

    def bce(z):
        valid = y != -1
        target = F.one_hot(y.clamp(0, 4), 5)[:, :4].double()
        per_row = F.binary_cross_entropy_with_logits(z, target, reduction="none").sum(1)
        return (per_row * valid).sum() / valid.sum()

    close(bce_gradients(z, y, ignore_index=-1), autograd_split(bce, z, y, ignore_index=-1))


@pytest.mark.parametrize("alpha", [0.25, None])
def test_focal_gradients_match_autograd(alpha):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(7, 3, generator=g) * 2
    y = torch.tensor([0, 3, 1, 3, 3, 2, 0])  # 3 = background

    def focal(z):
        target = F.one_hot(y, 4)[:, :3].double()
        p = torch.sigmoid(z)
        p_t = p * target + (1 - p) * (1 - target)
        ce = F.binary_cross_entropy_with_logits(z, target, reduction="none")
        loss = ce * (1 - p_t) ** 2
        if alpha is not None:
            loss = loss * (alpha * target + (1 - alpha) * (1 - target))
        return loss.sum() / 4.0  # four positive rows

    close(focal_gradients(z, y, alpha=alpha), autograd_split(focal, z, y))


# --------------------------------------------------------------------------------------------
# group_ratios
# --------------------------------------------------------------------------------------------

def _stats(pos, neg):
    stats = GradientStatistics(len(pos))
    stats.update(torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64))
    return stats


def test_group_ratios_is_the_mean_of_the_class_ratios_of_each_group():
    # counts: many (>100): classes 0, 1; medium: 2, 3; few (<20): 4
    stats = _stats([8.0, 3.0, 2.0, 1.0, 0.5], [8.0, 6.0, 4.0, 4.0, 10.0])
    out = group_ratios(stats, [1000, 200, 100, 20, 19])
    assert list(out) == ["many", "medium", "few"]
    assert out["many"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["medium"] == pytest.approx((0.5 + 0.25) / 2)
    assert out["few"] == pytest.approx(0.05)


def test_classes_without_negative_gradient_are_left_out_and_empty_groups_dropped():
    stats = _stats([2.0, 5.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0])
    assert torch.isnan(class_ratios(stats)[1:]).all()
    out = group_ratios(stats, [500, 500, 5, 5])  # no medium class
    assert list(out) == ["many", "few"]
    assert out["many"] == pytest.approx(0.5)  # class 1 (P > 0, N = 0) has no ratio
    assert math.isnan(out["few"])  # nothing seen yet
    empty = group_ratios(GradientStatistics(2), [500, 5])
    assert all(math.isnan(v) for v in empty.values())


def test_lvis_and_custom_groups():
    stats = _stats([1.0, 1.0, 1.0], [1.0, 2.0, 4.0])
    counts = torch.tensor([1000, 50, 3])
    assert group_ratios(stats, counts, "lvis") == pytest.approx(
        {"frequent": 1.0, "common": 0.5, "rare": 0.25})
    assert group_ratios(stats, counts, lvis_groups(counts)) == group_ratios(stats, counts, "lvis")
    custom = FrequencyGroups(masks={"tail": torch.tensor([False, True, True]),
                                    "head": torch.tensor([True, False, False])},
                             bounds={"tail": (0, 100), "head": (100, math.inf)})
    assert group_ratios(stats, counts, custom) == pytest.approx({"head": 1.0, "tail": 0.375})


def test_group_ratios_errors_name_what_was_expected():
    stats = _stats([1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"counts must be a \[C\] vector .*\(C = 2\)"):
        group_ratios(stats, [1, 2, 3])
    with pytest.raises(ValueError, match="groups must be"):
        group_ratios(stats, [1, 2], "imagenet")
    with pytest.raises(ValueError, match="keeps no gradient statistics"):
        group_ratios(torch.nn.Linear(2, 2), [1, 2])
    with pytest.raises(ValueError, match="stats must be"):
        group_ratios([1.0, 2.0], [1, 2])


def test_group_ratios_of_a_recorded_run_match_the_recorded_ratios(tmp_path):
    """The ratio summarised is the one the recorder stores and the figures draw."""
    from eqlosses import SoftmaxEQLLoss

    torch.manual_seed(0)
    loss = SoftmaxEQLLoss(5)
    stats_loss = GradientMonitor(5)  # a monitor is a "loss with statistics" for the recorder
    rec = StatsRecorder(tmp_path / "stats.bin", stats_loss)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 0, 1])
    for step in range(1, 4):
        z = torch.randn(10, 5, requires_grad=True)
        loss(z, y).backward()
        stats_loss.update(z, y)
        rec.record(step, 0)
    history = read_stats(tmp_path / "stats.bin")
    last = history.record()
    counts = [400, 200, 100, 100, 5]
    recorded = torch.as_tensor(last["ratio"], dtype=torch.float64)
    assert group_ratios(last, counts) == pytest.approx(
        {"many": recorded[:2].mean().item(), "medium": recorded[2:4].mean().item(),
         "few": recorded[4].item()}, rel=1e-6)  # class 4: never a target, so ratio 0
    assert group_ratios(last, counts)["few"] == 0.0
    assert group_ratios(stats_loss, counts) == pytest.approx(group_ratios(last, counts),
                                                             rel=1e-6)


# --------------------------------------------------------------------------------------------
# GradientMonitor
# --------------------------------------------------------------------------------------------

def test_monitor_accumulates_the_cross_entropy_gradient_of_each_step():
    g = torch.Generator().manual_seed(4)
    monitor = GradientMonitor(4)
    pos = torch.zeros(4, dtype=torch.float64)
    neg = torch.zeros(4, dtype=torch.float64)
    for _ in range(3):
        z = torch.randn(6, 4, generator=g, requires_grad=True)
        y = torch.randint(0, 4, (6,), generator=g)
        p, n = autograd_split(lambda z: F.cross_entropy(z, y), z, y)
        pos, neg = pos + p, neg + n
        monitor.update(z, y)
        assert z.grad is None  # nothing flows into the graph
    torch.testing.assert_close(monitor.stats.pos_grad, pos)
    torch.testing.assert_close(monitor.stats.neg_grad, neg)
    assert int(monitor.stats.num_updates) == 3


def test_monitor_sigmoid_and_background_column():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 3, generator=g)
    y = torch.tensor([0, 3, 3, 1, 2, 3])
    sig = GradientMonitor(3, "sigmoid")
    sig.update(z, y)
    ref = bce_gradients(z, y)
    torch.testing.assert_close(sig.stats.pos_grad, ref.pos.double())
    assert float(sig.stats.pos_grad.sum()) > 0 and float(sig.stats.neg_grad.sum()) > 0

    soft = GradientMonitor(2, background=True)  # 3 channels, target 2 = background column
    soft.update(z, y.clamp(max=2))
    full = cross_entropy_gradients(z, y.clamp(max=2))
    torch.testing.assert_close(soft.stats.neg_grad, full.neg[:2].double())
    with pytest.raises(ValueError, match="expects logits with 2 channels"):
        GradientMonitor(2).update(z, y)
    with pytest.raises(ValueError, match="activation must be"):
        GradientMonitor(2, "relu")
    with pytest.raises(ValueError, match="expects targets in"):
        GradientMonitor(3).update(z, torch.tensor([0, 1, 2, 3, 0, 0]))


def test_monitor_state_dict_and_record_feed_the_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from eqlosses.monitor import plot_gradient_ratio

    monitor = GradientMonitor(3)
    monitor.update(torch.zeros(4, 3), torch.tensor([0, 0, 0, 1]))
    other = GradientMonitor(3)
    other.load_state_dict(monitor.state_dict())
    torch.testing.assert_close(other.stats.pos_grad, monitor.stats.pos_grad)
    record = monitor.record()
    assert record["step"] == 1 and record["ratio"][2] == 0.0
    fig = plot_gradient_ratio(record, [300, 100, 5], out_png=tmp_path / "ratio.png")
    assert (tmp_path / "ratio.png").stat().st_size > 1000
    assert fig is not None


def test_monitor_without_validation_never_syncs():
    from tests.losses.test_hot_path import count_host_syncs

    monitor = GradientMonitor(4, validate=False)
    sig = GradientMonitor(4, "sigmoid", validate=False)
    z = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, -100, 1])
    with count_host_syncs() as syncs:
        monitor.update(z, y)
        sig.update(z, y.clamp(max=4))
    assert dict(syncs) == {}


# --------------------------------------------------------------------------------------------
# Two processes: one all-reduce per update, identical statistics on every rank
# --------------------------------------------------------------------------------------------

def _two_rank_scenario(r, data):
    from eqlosses.losses import CrossEntropyLoss
    from tests.test_distributed import _half

    crit = CrossEntropyLoss(5, reduction="sum", track_statistics=True)
    monitor = GradientMonitor(5)
    for z, y in data:
        z, y = _half(torch.tensor(z), r), _half(torch.tensor(y), r)
        crit(z.clone().requires_grad_(), y).backward()
        monitor.update(z, y)
    return {"ce": crit.stats.state_dict(), "monitor": monitor.stats.state_dict()}


@pytest.mark.slow
def test_two_processes_hold_the_statistics_of_the_whole_batch(tmp_path):
    from tests.test_distributed import _spawn

    g = torch.Generator().manual_seed(9)
    data = [(torch.randn(8, 5, generator=g, dtype=torch.float64).numpy(),
             torch.randint(0, 5, (8,), generator=g).numpy()) for _ in range(2)]
    ranks = _spawn(_two_rank_scenario, data, tmp_path)
    single = _two_rank_scenario(None, data)
    for key in ("ce", "monitor"):
        for name in ("pos_grad", "neg_grad", "num_updates"):
            assert torch.equal(ranks[0][key][name], ranks[1][key][name]), (key, name)
    # "sum": the ranks' increments add up to the whole batch's
    torch.testing.assert_close(ranks[0]["ce"]["pos_grad"], single["ce"]["pos_grad"])
    torch.testing.assert_close(ranks[0]["ce"]["neg_grad"], single["ce"]["neg_grad"])
    # the monitor's mean is over each rank's 4 rows: twice the whole batch's mean over 8
    torch.testing.assert_close(ranks[0]["monitor"]["neg_grad"], 2 * single["monitor"]["neg_grad"])
    assert int(ranks[0]["monitor"]["num_updates"]) == 2


def test_probability_targets_give_the_mixture_of_the_one_hot_statistics():
    g = torch.Generator().manual_seed(11)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    onehot = F.one_hot(y, 4).double()
    hard, soft = cross_entropy_gradients(z, y), cross_entropy_gradients(z, onehot)
    torch.testing.assert_close(soft.pos, hard.pos)
    torch.testing.assert_close(soft.neg, hard.neg)
    # mixup of rows 0 and 1 with weight 0.3: the mixture of the two rows' statistics
    q = 0.3 * onehot[:1] + 0.7 * onehot[1:2]
    mixed = cross_entropy_gradients(z[:1], q, reduction="sum")
    as0 = cross_entropy_gradients(z[:1], y[1:2] * 0, reduction="sum")
    as1 = cross_entropy_gradients(z[:1], y[1:2], reduction="sum")
    torch.testing.assert_close(mixed.pos, 0.3 * as0.pos + 0.7 * as1.pos)
    torch.testing.assert_close(mixed.neg, 0.3 * as0.neg + 0.7 * as1.neg)
    monitor = GradientMonitor(4)
    monitor.update(z, onehot)
    torch.testing.assert_close(monitor.stats.pos_grad, hard.pos)
    with pytest.raises(ValueError, match="sum to 1"):
        monitor.update(z, onehot * 0.5)
