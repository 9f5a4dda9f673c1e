"""track_statistics=True on the baselines: the gradient-driven losses' statistics, in closed
form, with the loss and its gradient unchanged; off in the bare classes, on in the hosts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eqlosses import GradientStatistics
from eqlosses.losses import (LOSSES, BalancedSoftmaxLoss, BCELoss, CrossEntropyLoss, EQLLoss,
                             EQLSoftmaxLoss, FederatedLoss, FocalLoss, LossTraits, build_loss,
                             build_loss_for)
from eqlosses.losses.contract import ClassStatistics
from eqlosses.monitor import StatsRecorder, read_stats

C = 4
COUNTS = torch.tensor([50.0, 20.0, 5.0, 1.0])

# name: (builder(**kw), extra channels, max target (C: background rows), pixel logits)
TRACKED = {
    "ce": (lambda **kw: CrossEntropyLoss(C, **kw), 0, C - 1, False),
    "ce_sum": (lambda **kw: CrossEntropyLoss(C, reduction="sum", **kw), 0, C - 1, False),
    "ce_pixels": (lambda **kw: CrossEntropyLoss(C, **kw), 0, C - 1, True),
    "ce_background": (lambda **kw: CrossEntropyLoss(C, background=True, **kw), 1, C, False),
    "balanced_softmax": (lambda **kw: BalancedSoftmaxLoss(C, COUNTS, tau=1.5, **kw), 0, C - 1,
                         False),
    "bce": (lambda **kw: BCELoss(C, **kw), 0, C, False),
    "bce_objectness": (lambda **kw: BCELoss(C, objectness=True, **kw), 1, C, False),
    "focal": (lambda **kw: FocalLoss(C, **kw), 0, C, False),
    "eql": (lambda **kw: EQLLoss(C, COUNTS / 100, lambda_=0.03, **kw), 0, C, False),
    "federated": (lambda **kw: FederatedLoss(C, COUNTS, num_sampled=2, **kw), 0, C, False),
    "eql_softmax": (lambda **kw: EQLSoftmaxLoss(C, COUNTS / 100, lambda_=0.1, gamma=0.5, **kw),
                    0, C - 1, False),
    "eql_softmax_background": (lambda **kw: EQLSoftmaxLoss(C, COUNTS / 100, lambda_=0.1,
                                                           background=True, **kw), 1, C, False),
}


def _batch(name, seed=0):
    _, extra, high, pixels = TRACKED[name]
    g = torch.Generator().manual_seed(seed)
    shape = (2, C + extra, 3, 2) if pixels else (10, C + extra)
    z = torch.randn(shape, generator=g) * 2
    t = torch.randint(0, high + 1, (shape[0],) + shape[2:], generator=g)
    t.view(-1)[: high + 1] = torch.arange(high + 1)
    t.view(-1)[-1] = -100
    return z, t


def _split(grad, t):
    """(pos [C], neg [C]) of |grad| by autograd's gradient: rows of class j to pos_j, the other
    non-ignored rows (other classes, background) to neg_j; extra columns dropped."""
    k = grad.shape[1]
    g = grad.movedim(1, -1).reshape(-1, k)[:, :C].abs().double()
    t = t.reshape(-1)
    valid = (t != -100).double()[:, None]
    onehot = F.one_hot(t.clamp(0, k), k + 1)[:, :C].double() * valid
    return (g * onehot).sum(0), (g * (valid - onehot)).sum(0)


@pytest.mark.parametrize("name", list(TRACKED))
def test_statistics_are_the_loss_own_gradient_and_the_loss_is_unchanged(name):
    builder = TRACKED[name][0]
    torch.manual_seed(0)
    plain = builder()
    torch.manual_seed(0)
    tracked = builder(track_statistics=True)
    assert not hasattr(plain, "stats") and isinstance(tracked.stats, GradientStatistics)
    pos = torch.zeros(C, dtype=torch.float64)
    neg = torch.zeros(C, dtype=torch.float64)
    for step in range(3):
        z, t = _batch(name, seed=step)
        results = []
        for crit in (plain, tracked):
            if isinstance(crit, (FederatedLoss, EQLSoftmaxLoss)):  # the same random draws
                crit.generator = torch.Generator().manual_seed(step)
            x = z.clone().requires_grad_()
            loss = crit(x, t)
            loss.backward()
            results.append((loss.detach(), x.grad))
        assert torch.equal(results[0][0], results[1][0]), "the loss changed"
        assert torch.equal(results[0][1], results[1][1]), "the gradient changed"
        p, n = _split(results[0][1], t)  # autograd's gradient of the plain loss
        pos, neg = pos + p, neg + n
    torch.testing.assert_close(tracked.stats.pos_grad, pos, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(tracked.stats.neg_grad, neg, rtol=1e-5, atol=1e-8)
    assert int(tracked.stats.num_updates) == 3
    assert float(neg.sum()) > 0


def test_no_update_in_eval_mode_or_without_grad():
    crit = CrossEntropyLoss(C, track_statistics=True)
    z, t = _batch("ce")
    crit.eval()(z, t)
    with torch.no_grad():
        crit.train()(z, t)
    assert int(crit.stats.num_updates) == 0 and float(crit.stats.pos_grad.sum()) == 0


@pytest.mark.filterwarnings("ignore:EQL. no class")
def test_off_in_the_bare_classes_on_in_the_hosts():
    stats = ClassStatistics(COUNTS.long(), total=76)
    for name, cls in LOSSES.items():
        traits: LossTraits = cls.traits
        if not traits.track_statistics:
            continue
        assert "track_statistics" in traits.all_params(), name
        head = traits.heads[0]
        assert hasattr(build_loss_for(head, name, C, stats), "stats"), name
        assert not hasattr(build_loss_for(head, name, C, stats, track_statistics=False),
                           "stats"), name
    assert {n for n, c in LOSSES.items() if c.traits.track_statistics} >= {
        "ce", "balanced_softmax", "bce", "focal", "eql", "federated", "eql_softmax"}
    assert not hasattr(CrossEntropyLoss(C), "stats")
    assert "track_statistics=True" in repr(build_loss("ce", C, track_statistics=True))
    assert "track_statistics" not in repr(CrossEntropyLoss(C))
    with pytest.raises(ValueError, match="track_statistics must be true or false"):
        build_loss("ce", C, track_statistics="yes")
    with pytest.raises(ValueError, match="track_statistics is for losses"):
        LossTraits(activation="softmax", backgrounds={"none": {}}, heads=("cls",),
                   gradient_statistics=True, track_statistics=True)


def test_statistics_are_checkpointed_and_resumed_exactly(tmp_path):
    crit = BalancedSoftmaxLoss(C, COUNTS, track_statistics=True)
    for step in range(2):
        z, t = _batch("balanced_softmax", seed=step)
        crit(z.requires_grad_(), t).backward()
    torch.save(crit.state_dict(), tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt")
    assert {"stats.pos_grad", "stats.neg_grad", "stats.num_updates"} <= set(state)
    resumed = BalancedSoftmaxLoss(C, COUNTS, track_statistics=True)
    resumed.load_state_dict(state)
    for name, buf in crit.stats.state_dict().items():
        assert torch.equal(resumed.stats.state_dict()[name], buf), name
    # tracking off: the statistics of a checkpoint are dropped, nothing else changes
    untracked = BalancedSoftmaxLoss(C, COUNTS)
    untracked.load_state_dict(state)
    assert not hasattr(untracked, "stats")
    # an older checkpoint without statistics resumes, the statistics starting from zero
    old = BalancedSoftmaxLoss(C, COUNTS).state_dict()
    fresh = BalancedSoftmaxLoss(C, COUNTS, track_statistics=True)
    with pytest.warns(RuntimeWarning, match="no gradient statistics"):
        fresh.load_state_dict(old)
    assert float(fresh.stats.pos_grad.sum()) == 0
    # nested in a model (the keys carry the submodule's prefix)
    model = torch.nn.Module()
    model.criterion = CrossEntropyLoss(C, track_statistics=True)
    model.criterion(*_batch("ce"))
    other = torch.nn.Module()
    other.criterion = CrossEntropyLoss(C, track_statistics=True)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.criterion.stats.neg_grad, model.criterion.stats.neg_grad)


def test_the_recorder_records_a_tracked_baseline(tmp_path):
    crit = CrossEntropyLoss(C, track_statistics=True)
    rec = StatsRecorder(tmp_path / "stats.bin", crit)
    z, t = _batch("ce")
    crit(z.requires_grad_(), t).backward()
    rec.record(step=1, epoch=0)
    history = read_stats(tmp_path / "stats.bin")
    assert history.ratio is not None and history.ratio.shape == (1, C)
    expected = crit.stats.ratio(init=1.0).float().numpy()
    assert history.ratio[0].tolist() == pytest.approx(expected.tolist(), rel=1e-6)
