"""Probability targets ([N, C], rows summing to 1: mixup, CutMix, label smoothing) for
cross-entropy, balanced softmax and Softmax-EQL: the soft cross-entropy on the adjusted logits,
and statistics under which one-hot targets equal integer targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eqlosses.functional.gradients import cross_entropy_gradients
from eqlosses.functional.softmax import balanced_softmax_adjustment, softmax_eql_adjustment
from eqlosses.losses import BalancedSoftmaxLoss, CrossEntropyLoss, SoftmaxEQLLoss

C = 4
COUNTS = torch.tensor([50.0, 20.0, 5.0, 1.0])

BUILDERS = {
    "ce": lambda **kw: CrossEntropyLoss(C, track_statistics=True, **kw),
    "balanced_softmax": lambda **kw: BalancedSoftmaxLoss(C, COUNTS, tau=1.5,
                                                         track_statistics=True, **kw),
    "softmax_eql": lambda **kw: SoftmaxEQLLoss(C, tau=1.5, **kw),
}


def _batch(seed, dtype=torch.float32, pixels=False):
    g = torch.Generator().manual_seed(seed)
    shape = (2, C, 3, 2) if pixels else (9, C)
    z = (torch.randn(shape, generator=g) * 3).to(dtype)
    y = torch.randint(0, C, (shape[0],) + shape[2:], generator=g)
    y.view(-1)[:C] = torch.arange(C)
    return z, y


def _one_hot(y, dtype):
    return F.one_hot(y, C).movedim(-1, 1).to(dtype)


def _step(crit, z, t):
    x = z.clone().requires_grad_()
    loss = crit(x, t)
    loss.sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("dtype,pixels,reduction", [(torch.float32, False, "mean"),
                                                    (torch.float64, False, "sum"),
                                                    (torch.float64, False, "none"),
                                                    (torch.float32, True, "mean")])
def test_one_hot_probability_targets_equal_integer_targets(name, dtype, pixels, reduction):
    """Loss, gradient and statistics, over three steps (Softmax-EQL's margins then come from
    the statistics of the earlier steps, so they must agree too)."""
    hard, soft = BUILDERS[name](reduction=reduction), BUILDERS[name](reduction=reduction)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for step in range(3):
        z, y = _batch(step, dtype, pixels)
        loss_h, grad_h = _step(hard, z, y)
        loss_s, grad_s = _step(soft, z, _one_hot(y, dtype))
        torch.testing.assert_close(loss_s, loss_h, **tol)
        torch.testing.assert_close(grad_s, grad_h, **tol)
        torch.testing.assert_close(soft.stats.pos_grad, hard.stats.pos_grad, **tol)
        torch.testing.assert_close(soft.stats.neg_grad, hard.stats.neg_grad, **tol)
    assert int(soft.stats.num_updates) == 3 and float(soft.stats.pos_grad.sum()) > 0


def _soft_targets(seed, n=9):
    """Mixup of two one-hot rows with label smoothing 0.1: rows summing to 1."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, C, (2, n), generator=g)
    lam = torch.rand(n, 1, generator=g, dtype=torch.float64)
    q = lam * F.one_hot(a, C) + (1 - lam) * F.one_hot(b, C)
    return 0.9 * q + 0.1 / C


def test_soft_targets_match_torch_soft_cross_entropy_on_the_adjusted_logits():
    z, _ = _batch(0, torch.float64)
    q = _soft_targets(0)
    prior = balanced_softmax_adjustment(COUNTS, 1.5).double()
    for crit, a in [(CrossEntropyLoss(C), torch.zeros(C, dtype=torch.float64)),
                    (BalancedSoftmaxLoss(C, COUNTS, tau=1.5), prior)]:
        x = z.clone().requires_grad_()
        ref_x = z.clone().requires_grad_()
        loss = crit(x, q)
        ref = F.cross_entropy(ref_x + a, q)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(x.grad, ref_x.grad)
    # Softmax-EQL: the margins of the indicator in force
    crit = SoftmaxEQLLoss(C, tau=1.5)
    crit.stats.pos_grad.copy_(torch.tensor([4.0, 1.0, 0.1, 0.0]))
    margins = softmax_eql_adjustment(crit.stats.pos_grad, 1.5, 1e-4)
    x = z.clone().requires_grad_()
    ref_x = z.clone().requires_grad_()
    crit.eval()(x, q).backward()
    F.cross_entropy(ref_x + margins, q).backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_soft_statistics_are_the_mixture_of_the_one_hot_rows():
    z, _ = _batch(1, torch.float64)
    q = _soft_targets(1)
    crit = SoftmaxEQLLoss(C)
    crit.stats.pos_grad.copy_(torch.tensor([4.0, 1.0, 0.1, 0.0]))
    before = crit.stats.pos_grad.clone(), crit.stats.neg_grad.clone()
    a = softmax_eql_adjustment(before[0], 1.0, 1e-4)
    crit(z.clone().requires_grad_(), q)
    # each row n as the q_nk-weighted set of its one-hot rows (label k), summed
    p = torch.softmax(z + a, dim=1)
    pos = torch.zeros(C, dtype=torch.float64)
    neg = torch.zeros(C, dtype=torch.float64)
    for n in range(z.shape[0]):
        for k in range(C):
            e = F.one_hot(torch.tensor(k), C).double()
            pos += q[n, k] * e * (1 - p[n])
            neg += q[n, k] * (1 - e) * p[n]
    torch.testing.assert_close(crit.stats.pos_grad - before[0], pos / z.shape[0])
    torch.testing.assert_close(crit.stats.neg_grad - before[1], neg / z.shape[0])
    inc = cross_entropy_gradients(z, q, a)
    torch.testing.assert_close(inc.pos, pos / z.shape[0])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_invalid_probability_targets_are_clear_errors(name):
    crit = BUILDERS[name]()
    z = torch.zeros(2, C)
    good = torch.full((2, C), 1.0 / C)
    with pytest.raises(ValueError, match=r"must sum to 1 over the classes .* 0.5 \(row 1\)"):
        crit(z, torch.cat([good[:1], good[1:] * 0.5]))
    with pytest.raises(ValueError, match="must be >= 0, found -0.25 at"):
        crit(z, torch.tensor([[1.25, -0.25, 0.0, 0.0]] * 2))
    with pytest.raises(ValueError, match=r"must have the logits' shape \(2, 4\)"):
        crit(z, good[:, :3])
    with pytest.raises(ValueError, match=r"float targets \(dtype torch.float32\) .* integer"):
        crit(z, torch.tensor([0.0, 1.0]))  # class indices as floats
    with pytest.raises(ValueError, match="must be finite"):
        crit(z, torch.tensor([[float("nan"), 0.0, 0.0, 1.0]] * 2))
    crit(z, good)  # fine
    fast = BUILDERS[name](validate=False)  # nothing read: no error, no synchronisation
    fast(z, torch.cat([good[:1], good[1:] * 0.5]))


def test_probability_targets_without_validation_never_sync():
    from tests.losses.test_hot_path import count_host_syncs

    for name, builder in BUILDERS.items():
        crit = builder(validate=False)
        z, y = _batch(2)
        q = _one_hot(y, torch.float32).requires_grad_(False)
        x = z.requires_grad_()
        with count_host_syncs() as syncs:
            crit(x, q).backward()
        assert dict(syncs) == {}, name
        assert int(crit.stats.num_updates) == 1


@pytest.mark.slow
def test_probability_targets_compile_into_one_graph():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = SoftmaxEQLLoss(C, validate=False)
    compiled_crit = SoftmaxEQLLoss(C, validate=False)
    compiled = torch.compile(compiled_crit, fullgraph=True, backend="aot_eager", dynamic=False)
    for step in range(2):
        z, _ = _batch(step)
        q = _soft_targets(step).float()
        results = [_step(crit, z, q) for crit in (eager, compiled)]
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled_crit.state_dict(), eager.state_dict())
    assert counters["stats"]["unique_graphs"] == 1


def test_the_functional_twins_take_probability_targets():
    from eqlosses.functional import balanced_softmax_loss, softmax_eql_loss

    z, y = _batch(3, torch.float64)
    indicator = torch.tensor([4.0, 1.0, 0.1, 0.0])
    for fn, extra in [(softmax_eql_loss, (indicator, 1.5)), (balanced_softmax_loss, (COUNTS,))]:
        for reduction in ("mean", "sum", "none"):
            x_h = z.clone().requires_grad_()
            x_s = z.clone().requires_grad_()
            hard = fn(x_h, y, *extra, reduction=reduction)
            soft = fn(x_s, _one_hot(y, torch.float64), *extra, reduction=reduction)
            hard.sum().backward()
            soft.sum().backward()
            torch.testing.assert_close(soft, hard)
            torch.testing.assert_close(x_s.grad, x_h.grad)
    q = _soft_targets(3)
    a = softmax_eql_adjustment(indicator, 1.5, 1e-4).double()
    torch.testing.assert_close(softmax_eql_loss(z, q, indicator, 1.5),
                               F.cross_entropy(z + a, q))
    with pytest.raises(ValueError, match="Softmax-EQL: probability targets must sum to 1"):
        softmax_eql_loss(z, q * 2, indicator)
    with pytest.raises(ValueError, match="balanced softmax: float targets .* must have"):
        balanced_softmax_loss(z, q[:, :2], COUNTS)
