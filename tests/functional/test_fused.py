"""The optional fused CPU kernel (eqlosses.functional.fused) against the eager kernel.

The kernel is C++ built on first use (about 30 s on the development machine, then cached), so
the tests that need it are marked slow and skip without a C++ compiler; the switch's own
behaviour (errors, the environment variable) is tested without building anything.
"""

import math
import os

import pytest
import torch

from eqlosses import SoftmaxEQLLoss
from eqlosses.functional import (cross_entropy_gradients, fused, fused_cpu_kernel_enabled,
                                 softmax_eql_loss)
from eqlosses.functional.softmax import _adjusted_cross_entropy
from tests.losses.test_hot_path import CASES, _batch, _step

# the softmax losses whose adjustment is a [C] vector, on rows and on pixels; EQL's softmax
# form (entries dropped per row) and Seesaw (a per-row adjustment of column slices) keep the
# eager kernel
SERVED = ["softmax_eql", "softmax_eql_seg", "softmax_eql_x", "balanced_softmax", "ce",
          "ce_tracked", "ce_seg_tracked", "ce_bg_tracked"]


def _tolerances(dtype):
    return ({"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64
            else {"rtol": 1e-5, "atol": 1e-6})


def _spy(monkeypatch):
    """Count the calls the fused kernel serves."""
    calls = []
    real = fused.kernel_for

    def spy(*args):
        kernel = real(*args)
        calls.append(kernel is not None)
        return kernel

    monkeypatch.setattr(fused, "kernel_for", spy)
    return calls


def _both(fn):
    """fn() with the eager kernel, then with the fused one (left enabled as found)."""
    fused.disable_fused_cpu_kernel()
    eager = fn()
    fused.enable_fused_cpu_kernel()
    return eager, fn()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("shape", [(300, 37), (3, 37, 5, 7), (4, 37, 30, 30)])
def test_loss_and_gradient_equal_the_eager_kernel(fused_kernel, dtype, reduction, validate,
                                                  ignored, shape):
    """Rows, and pixels in blocks of vector lanes (35 pixels: two full blocks of 16 floats
    and a partial one; 4 x 900 pixels: two chunks)."""
    torch.set_num_threads(2)  # several chunks, each with its own accumulators
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(shape, generator=g, dtype=dtype) * 4)
    t = torch.randint(0, 37, (shape[0],) + shape[2:], generator=g)
    if ignored == "some":
        t.view(-1)[::7] = -100
    elif ignored == "all":
        t[:] = -100
    indicator = torch.rand(37, generator=g, dtype=torch.float64) ** 4  # margins up to ~37 nats

    def run():
        x = z.clone().requires_grad_()
        loss = softmax_eql_loss(x, t, indicator, tau=2.0, reduction=reduction, validate=validate)
        loss.sum().backward()
        with torch.no_grad():  # no gradient buffer: the kernel's scratch rows
            plain = softmax_eql_loss(z, t, indicator, tau=2.0, reduction=reduction,
                                     validate=validate)
        return loss.detach(), x.grad, plain

    eager, fast = _both(run)
    torch.testing.assert_close(fast, eager, **_tolerances(dtype))
    if ignored == "all":
        assert fast[1].abs().sum() == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", SERVED)
@pytest.mark.parametrize("validate", [True, False])
def test_every_softmax_loss_trains_as_with_the_eager_kernel(fused_kernel, monkeypatch, name,
                                                            validate):
    """Two training steps of each softmax loss the kernel serves (some rows or pixels
    ignored in the first): loss, gradient and the whole state (statistics, counts) as with
    the eager kernel."""
    calls = _spy(monkeypatch)

    def run():
        crit = CASES[name][0](validate=validate).train()
        out = []
        for step in range(2):
            z, t, kwargs = _batch(name, seed=step, ignored=step == 0)
            torch.manual_seed(step)
            loss = _step(crit, z, t, kwargs)
            out.append((loss.detach(), z.grad))
        return out, crit.state_dict()

    eager, fast = _both(run)
    assert any(calls)  # the kernel served this loss
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(128,), (4, 30, 30)])
def test_statistics_over_a_long_tailed_stream_equal_the_eager_kernel(fused_kernel, shape):
    """Twenty steps of Softmax-EQL on long-tailed labels (classes not yet seen sit at the eps
    clamp, so some target probabilities underflow: the eager kernel's exact fallback), on
    rows and on pixels; with 2 threads both split into two chunks with their own sums."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    c = 200 if len(shape) == 1 else 37
    weights = torch.arange(1, c + 1, dtype=torch.float64) ** -1.5
    n = math.prod(shape)
    batches = [(torch.randn((shape[0], c) + shape[1:], generator=g) * 3,
                torch.multinomial(weights, n, replacement=True, generator=g).view(shape))
               for _ in range(20)]

    def run():
        crit = SoftmaxEQLLoss(c, tau=2.0).train()
        losses = []
        for z, t in batches:
            x = z.clone().requires_grad_()
            loss = crit(x, t)
            loss.backward()
            losses.append((loss.detach(), x.grad))
        return losses, crit.state_dict()

    eager, fast = _both(run)
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(fast[1]["stats.pos_grad"]).all()


@pytest.mark.slow
def test_extreme_logits_as_the_eager_kernel(fused_kernel):
    """Margins of thousands of nats (the target probability underflows: the loss is still
    exact), infinite and NaN logits (NaN rows, as in eager; the statistics skip the step)."""
    z = torch.zeros(6, 5, dtype=torch.float64)
    z[0, 1] = 1e4                 # target 0 has p_t = 0 in floating point: loss 1e4
    z[1, 2] = -1e4                # target 2: loss 1e4 + log 4
    z[2, 3] = float("-inf")       # a masked class
    z[3, 0] = float("inf")
    z[4, 4] = float("nan")
    t = torch.tensor([0, 2, 1, 1, 0, 3])

    def run():
        x = z.clone().requires_grad_()
        loss = softmax_eql_loss(x, t, torch.ones(5), reduction="none")
        loss.sum().backward()
        return loss.detach(), x.grad

    eager, fast = _both(run)
    torch.testing.assert_close(fast, eager, equal_nan=True)
    assert fast[0][0] == pytest.approx(1e4) and fast[0][1] == pytest.approx(1e4 + math.log(4))

    def stats():
        crit = SoftmaxEQLLoss(5).train()
        with pytest.warns(RuntimeWarning, match="non-finite"):
            crit(z.clone().requires_grad_(), t)
        return crit.state_dict()

    eager, fast = _both(stats)
    torch.testing.assert_close(fast, eager)
    assert int(fast["stats.num_skipped"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("pixels", [False, True])
def test_a_small_loss_beside_large_logits_keeps_its_precision(fused_kernel, pixels):
    """Logits near 2,650 in float32 (a rounding unit of 2.4e-4) whose target is the largest,
    7.0 above the next: the loss, log(1 + e^-7) = 9.3e-4, is log s + (m - z_t) with m - z_t
    exactly 0, good to the float32 rounding of s = 1 + 9.3e-4 (1e-4 relative); summed as
    (log s + m) - z_t it came out in whole rounding units of 2,650 (with the hostile-input
    test's adjustment, 7.3e-4 for 8.0e-4)."""
    row = torch.tensor([2645.330322265625, -2712.519775390625, -8456.3291015625,
                        2652.30517578125])
    z = row.view(1, 4, 1, 1).repeat(2, 1, 3, 5) if pixels else row.repeat(3, 1)
    t = torch.full((2, 3, 5) if pixels else (3,), 3)
    loss = softmax_eql_loss(z, t, torch.ones(4), reduction="none")
    exact = torch.logsumexp(row.double(), 0) - row.double()[3]
    torch.testing.assert_close(loss.double(), exact.expand(t.shape), rtol=1e-4, atol=0)


@pytest.mark.slow
def test_the_kernel_serves_only_the_calls_it_can(fused_kernel, monkeypatch):
    calls = _spy(monkeypatch)
    t = torch.tensor([0, 2, 1])
    ind = torch.ones(4)
    softmax_eql_loss(torch.randn(3, 4), t, ind)
    assert calls == [True]
    calls.clear()
    softmax_eql_loss(torch.randn(3, 4, 2, 2), torch.zeros(3, 2, 2, dtype=torch.long), ind)
    assert calls == [True]  # pixels too
    calls.clear()
    softmax_eql_loss(torch.randn(3, 4, dtype=torch.float16), t, ind)   # half precision
    softmax_eql_loss(torch.randn(4, 3).t(), t, ind)                     # not contiguous
    softmax_eql_loss(torch.randn(3, 4, 2, 2).to(memory_format=torch.channels_last),
                     torch.zeros(3, 2, 2, dtype=torch.long), ind)        # channels-last
    _adjusted_cross_entropy(torch.randn(3, 4), t, None, -100, "mean", False,  # (Seesaw's)
                            return_grad=True)
    assert calls == [False] * 4
    cross_entropy_gradients(torch.randn(3, 4), t)  # statistics only: served
    assert calls[-1] is True
    fused.disable_fused_cpu_kernel()
    softmax_eql_loss(torch.randn(3, 4), t, ind)
    assert calls[-1] is False


@pytest.mark.slow
def test_backward_with_a_kept_graph_and_a_scaled_loss(fused_kernel):
    z = torch.randn(8, 5, requires_grad=True)
    t = torch.randint(0, 5, (8,))
    loss = softmax_eql_loss(z, t, torch.ones(5))
    loss.backward(retain_graph=True)
    once = z.grad.clone()
    loss.backward()  # the kept graph still holds the gradient intact
    torch.testing.assert_close(z.grad, 2 * once)
    z.grad = None
    (3 * softmax_eql_loss(z, t, torch.ones(5))).backward()
    torch.testing.assert_close(z.grad, 3 * once)


@pytest.mark.slow
def test_out_of_range_target_without_validation_is_an_error(fused_kernel):
    with pytest.raises(RuntimeError, match="target 5 of row 1 is not a class"):
        softmax_eql_loss(torch.randn(3, 5), torch.tensor([0, 5, 1]), torch.ones(5),
                         validate=False)
    t = torch.zeros(2, 3, 4, dtype=torch.long)
    t[1, 0, 3] = -3
    with pytest.raises(RuntimeError, match=r"target -3 of row 1 \(pixel 3\) is not a class"):
        softmax_eql_loss(torch.randn(2, 5, 3, 4), t, torch.ones(5), validate=False)


@pytest.mark.slow
def test_one_graph_under_torch_compile_with_the_kernel_enabled(fused_kernel):
    """While dynamo traces, the loss takes the eager kernel (the fused one is opaque to it):
    still one graph, with the results of the fused kernel run eagerly."""
    from tests.losses.test_hot_path import _compile_and_compare

    _compile_and_compare("softmax_eql", "aot_eager")


def test_a_failed_build_says_why_and_keeps_the_eager_kernel(monkeypatch):
    def no_compiler(verbose):
        raise OSError("c++: not found")

    monkeypatch.setattr(fused, "_built", None)
    monkeypatch.setattr(fused, "_kernel", None)
    monkeypatch.setattr(fused, "_build", no_compiler)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler.*OSError: c\\+\\+: not found"):
        fused.enable_fused_cpu_kernel()
    assert not fused_cpu_kernel_enabled()


def test_environment_switch(monkeypatch):
    enabled = []
    monkeypatch.setattr(fused, "enable_fused_cpu_kernel", lambda: enabled.append(True))
    monkeypatch.setenv("EQLOSSES_FUSED_CPU", "yes")
    with pytest.raises(ValueError, match="EQLOSSES_FUSED_CPU must be 0 or 1, got 'yes'"):
        fused.enable_from_environment()
    monkeypatch.setenv("EQLOSSES_FUSED_CPU", "0")
    fused.enable_from_environment()
    monkeypatch.setenv("EQLOSSES_FUSED_CPU", "1")
    fused.enable_from_environment()
    assert enabled == [True]


@pytest.mark.slow
def test_hostile_inputs_as_the_eager_kernel(fused_kernel):
    """Random shapes (empty, one row, one class, pixels), dtypes, ignore patterns, logit scales up to
    1e4 and sprinkled infinities and NaNs: loss and gradient as with the eager kernel (NaN
    where it has NaN), for each reduction; the eager kernel is the property tests' subject."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    # 60 derandomised cases per CI run; EQLOSSES_HYPOTHESIS=thorough: 3,000 random ones
    thorough = os.environ.get("EQLOSSES_HYPOTHESIS") == "thorough"

    @hypothesis.given(n=st.integers(0, 40), c=st.integers(1, 20),
                      spatial=st.sampled_from([(), (1,), (3,), (2, 9), (0, 4)]),
                      dtype=st.sampled_from([torch.float32, torch.float64]),
                      ignore=st.sampled_from(["none", "some", "all"]),
                      scale=st.sampled_from([1.0, 30.0, 1e4]),
                      special=st.sampled_from([None, float("inf"), float("-inf"), float("nan")]),
                      reduction=st.sampled_from(["mean", "sum", "none"]),
                      validate=st.booleans(), seed=st.integers(0, 2**16))
    @hypothesis.settings(max_examples=3000 if thorough else 60, deadline=None,
                         derandomize=not thorough, database=None)
    def check(n, c, spatial, dtype, ignore, scale, special, reduction, validate, seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((n, c) + spatial, generator=g, dtype=dtype) * scale
        if special is not None and z.numel():
            z.view(-1)[torch.randint(0, z.numel(), (max(1, n // 4),), generator=g)] = special
        t = torch.randint(0, c, (n,) + spatial, generator=g)
        if ignore == "some":
            t.view(-1)[::3] = -100
        elif ignore == "all":
            t[:] = -100
        indicator = torch.rand(c, generator=g, dtype=torch.float64)

        def run():
            x = z.clone().requires_grad_()
            loss = softmax_eql_loss(x, t, indicator, reduction=reduction, validate=validate)
            loss.sum().backward()
            return loss.detach(), x.grad

        eager, fast = _both(run)
        # a loss near 0 (p_t near 1) is known to about one rounding unit of 1 per row in
        # either kernel (the log of a sum that rounds near 1): 6e-8 in float32, so that sums
        # of 40 rows may differ by a few 1e-6, and 1e-16 in float64
        tol = ({"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64
               else {"rtol": 1e-5, "atol": 1e-5})
        torch.testing.assert_close(fast, eager, equal_nan=True, **tol)

    check()
