"""The hot path: with ``validate=False`` a training step never synchronises with the host and
every loss compiles into one graph (``torch.compile(fullgraph=True)``) with eager's results.

Host synchronisations are counted two ways at once: Python-level reads of a tensor's value
(``item``, ``bool``, ``int``, ``float``, ``index``, ``tolist``, ``numpy``, ``cpu``, patched with
counters), and aten ops whose output depends on tensor values (``_local_scalar_dense``, which
every scalar read ends in, ``nonzero``, boolean indexing, ``bincount``, ...), seen by a
``TorchDispatchMode``, which also sees the backward pass.
"""

from __future__ import annotations

import collections
import contextlib
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eqlosses import GradientStatistics
from eqlosses.losses import SoftmaxEQLVariantLoss
from eqlosses.losses import (LOSSES, BalancedSoftmaxLoss, BCELoss, CrossEntropyLoss, EQLLoss,
                             EQLSoftmaxLoss, EqualizedFocalLoss, EqualizedQualityFocalLoss,
                             FederatedLoss, FocalLoss, SeesawLoss, SigmoidEQLLoss, SoftmaxEQLLoss)

C = 4
N = 12

# --------------------------------------------------------------------------------------------
# Counting host synchronisations
# --------------------------------------------------------------------------------------------

_PY_READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu")
_VALUE_DEPENDENT_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "bincount",
                        "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
                        "repeat_interleave", "equal", "is_nonzero", "allclose")


class _CountValueDependentOps(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if name in _VALUE_DEPENDENT_OPS:
            self.counter["aten." + name] += 1
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.counter["aten." + name + "(bool mask)"] += 1
        elif name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device", src.device)
            if src.device.type != "cpu" and torch.device(dst).type == "cpu":
                self.counter["aten." + name + "(to host)"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs():
    """A Counter of the host synchronisations (by kind) made inside the block."""
    counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _PY_READS}

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            counter["Tensor." + name] += 1
            return original(self, *args, **kwargs)
        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        with _CountValueDependentOps(counter):
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def host_syncs(counter) -> int:
    """The number of synchronisations in a :func:`count_host_syncs` counter: every
    value-dependent aten op (scalar reads included), plus ``tolist`` / ``numpy``, which read a
    CPU tensor without an aten op (``bool``, ``item``, ... end in ``_local_scalar_dense``)."""
    return sum(v for k, v in counter.items() if k.startswith("aten.")) + \
        counter["Tensor.tolist"] + counter["Tensor.numpy"]


def test_the_counter_sees_each_kind_of_sync():
    x = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    with count_host_syncs() as n:
        assert bool((x > 1).any())
        x.detach()[x.detach() > 0].sum()
        torch.bincount(torch.tensor([0, 2]))
    assert n["Tensor.__bool__"] == 1 and n["aten._local_scalar_dense"] == 1
    assert n["aten.index(bool mask)"] == 1 and n["aten.bincount"] == 1
    assert host_syncs(n) == 3
    with count_host_syncs() as n:  # the backward pass is seen too
        (x * x).sum().backward(inputs=[x])
        y = x.detach().clone().requires_grad_()
        y.masked_fill(y > 1, 0.0).nonzero()
    assert n["aten.nonzero"] == 1 and sum(n.values()) == 1
    assert torch.Tensor.item is not None and "wrapper" not in repr(torch.Tensor.item)


# --------------------------------------------------------------------------------------------
# One case per loss: a builder and a training batch in its conventions
# --------------------------------------------------------------------------------------------

def _counts():
    return torch.tensor([50.0, 20.0, 5.0, 1.0])


CASES = {
    # name: (builder(**kw), channels beyond C, max target, pixels, extra forward kwargs)
    "sigmoid_eql": (lambda **kw: SigmoidEQLLoss(C, **kw), 1, C, False, {}),
    "efl": (lambda **kw: EqualizedFocalLoss(C, **kw), 0, C, False, {}),
    "eqfl": (lambda **kw: EqualizedQualityFocalLoss(C, **kw), 0, C, False, {"quality": True}),
    "focal": (lambda **kw: FocalLoss(C, **kw), 0, C, False, {}),
    "softmax_eql": (lambda **kw: SoftmaxEQLLoss(C, **kw), 0, C - 1, False, {}),
    "softmax_eql_seg": (lambda **kw: SoftmaxEQLLoss(C, **kw), 0, C - 1, True, {}),
    "softmax_eql_x": (lambda **kw: SoftmaxEQLVariantLoss(C, source="raw", decay=0.9,
                                                         tau_warmup=3, **kw), 0, C - 1, False,
                      {}),
    "balanced_softmax": (lambda **kw: BalancedSoftmaxLoss(C, _counts(), **kw), 0, C - 1, False,
                         {}),
    "ce": (lambda **kw: CrossEntropyLoss(C, **kw), 0, C - 1, False, {}),
    "eql_softmax": (lambda **kw: EQLSoftmaxLoss(C, _counts() / 100, lambda_=0.03, **kw), 0,
                    C - 1, False, {}),
    "eql": (lambda **kw: EQLLoss(C, _counts() / 100, lambda_=0.03, **kw), 0, C, False, {}),
    "federated": (lambda **kw: FederatedLoss(C, _counts(), num_sampled=2, **kw), 0, C, False,
                  {}),
    "bce": (lambda **kw: BCELoss(C, **kw), 0, C, False, {}),
    "seesaw": (lambda **kw: SeesawLoss(C, **kw), 2, C, False, {}),
    # the baselines recording their gradient statistics (track_statistics=True)
    "ce_tracked": (lambda **kw: CrossEntropyLoss(C, track_statistics=True, **kw), 0, C - 1,
                   False, {}),
    "ce_seg_tracked": (lambda **kw: CrossEntropyLoss(C, track_statistics=True, **kw), 0,
                       C - 1, True, {}),
    "ce_bg_tracked": (lambda **kw: CrossEntropyLoss(C, background=True, track_statistics=True,
                                                    **kw), 1, C, False, {}),
    "balanced_softmax_tracked": (lambda **kw: BalancedSoftmaxLoss(
        C, _counts(), track_statistics=True, **kw), 0, C - 1, False, {}),
    "bce_tracked": (lambda **kw: BCELoss(C, objectness=True, track_statistics=True, **kw), 1, C,
                    False, {}),
    "focal_tracked": (lambda **kw: FocalLoss(C, track_statistics=True, **kw), 0, C, False, {}),
    "eql_tracked": (lambda **kw: EQLLoss(C, _counts() / 100, lambda_=0.03,
                                         track_statistics=True, **kw), 0, C, False, {}),
    "federated_tracked": (lambda **kw: FederatedLoss(C, _counts(), num_sampled=2,
                                                     track_statistics=True, **kw), 0, C, False,
                          {}),
    "eql_softmax_tracked": (lambda **kw: EQLSoftmaxLoss(C, _counts() / 100, lambda_=0.03,
                                                        track_statistics=True, **kw), 0, C - 1,
                            False, {}),
}


def test_every_registered_loss_has_a_case():
    built = {type(builder()) for builder, *_ in CASES.values()}
    assert built == set(LOSSES.values())


def _batch(name, seed=0, ignored=True):
    """Logits (float32, requires grad), targets (some ignored rows) and forward kwargs."""
    _, extra, high, pixels, kw = CASES[name]
    g = torch.Generator().manual_seed(seed)
    shape = (2, C + extra, 2, 3) if pixels else (N, C + extra)
    z = (torch.randn(shape, generator=g) * 2).requires_grad_()
    t = torch.randint(0, high + 1, (shape[0],) + shape[2:], generator=g)
    t.view(-1)[: high + 1] = torch.arange(high + 1)  # every class (and background) present
    if ignored:
        t.view(-1)[-1] = -100
    kwargs = {}
    if kw.get("quality"):
        kwargs["quality"] = torch.rand(t.shape, generator=g)
    return z, t, kwargs


def _step(crit, z, t, kwargs):
    """One training step: forward (statistics update included) and backward."""
    loss = crit(z, t, **kwargs)
    loss.backward()
    return loss


# --------------------------------------------------------------------------------------------
# No host synchronisation with validate=False; a known number with validate=True
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_training_step_without_validation_never_syncs(name):
    crit = CASES[name][0](validate=False).train()
    for ignored in (True, False):
        z, t, kwargs = _batch(name, ignored=ignored)
        with count_host_syncs() as syncs:
            _step(crit, z, t, kwargs)
        assert dict(syncs) == {}, name
        assert z.grad is not None and torch.isfinite(z.grad).all()
    crit.eval()
    with count_host_syncs() as syncs:
        crit(z, t, **kwargs)
    assert dict(syncs) == {}


# Host synchronisations of one training forward + backward with validation on (the default),
# without / with ignored rows; the LongTailLoss docstring states these numbers.
SYNCS_WITH_VALIDATION = {
    "sigmoid_eql": (2, 3), "efl": (2, 3), "eqfl": (2, 3), "softmax_eql": (3, 4),
    "softmax_eql_seg": (2, 3), "focal": (1, 2), "balanced_softmax": (2, 3), "ce": (2, 3),
    "eql_softmax": (2, 3), "eql": (1, 2), "federated": (1, 2), "bce": (1, 2), "seesaw": (4, 5),
    "softmax_eql_x": (4, 5),  # raw statistics: one more underflow check than softmax_eql
    # track_statistics=True: one more, the statistics update's "skipped" warning
    "ce_tracked": (3, 4), "ce_seg_tracked": (2, 3), "ce_bg_tracked": (3, 4),
    "balanced_softmax_tracked": (3, 4), "bce_tracked": (2, 3), "focal_tracked": (2, 3),
    "eql_tracked": (2, 3), "federated_tracked": (2, 3), "eql_softmax_tracked": (3, 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_training_step_with_validation_syncs_a_known_number_of_times(name):
    crit = CASES[name][0]().train()
    got = []
    for ignored in (False, True):
        z, t, kwargs = _batch(name, ignored=ignored)
        with count_host_syncs() as syncs:
            _step(crit, z, t, kwargs)
        got.append(host_syncs(syncs))
    assert tuple(got) == SYNCS_WITH_VALIDATION[name], dict(syncs)


@pytest.mark.parametrize("name", list(CASES))
def test_validation_off_agrees_with_validation_on(name):
    """The sync-free (masked) paths equal the validated ones to rounding, over several steps
    (so the weights of later steps come from the statistics of earlier ones)."""
    torch.manual_seed(0)
    on = CASES[name][0]()
    torch.manual_seed(0)
    off = CASES[name][0](validate=False)
    for crit in (on, off):
        if hasattr(crit, "generator"):
            crit.generator = torch.Generator().manual_seed(3)
    for step in range(3):
        results = []
        for crit in (on, off):
            z, t, kwargs = _batch(name, seed=step, ignored=step != 1)
            loss = _step(crit, z, t, kwargs)
            results.append((loss.detach(), z.grad))
        torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(off.state_dict(), on.state_dict(), rtol=1e-6, atol=1e-9)


def test_validation_off_reads_no_target_value_and_still_checks_metadata():
    crit = SigmoidEQLLoss(C, validate=False)
    z = torch.zeros(3, C + 1)
    crit(z, torch.tensor([0, 99, -100]))  # out of range: not detected (the caller's job)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        SigmoidEQLLoss(C)(z, torch.tensor([0, 99, -100]))
    with pytest.raises(ValueError, match="shape"):
        crit(z, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        crit(z, torch.zeros(3))
    with pytest.raises(ValueError, match="channels"):
        crit(torch.zeros(3, C), torch.zeros(3, dtype=torch.long))


def test_validate_is_a_declared_checked_parameter_shown_when_off():
    from eqlosses.losses import build_loss

    for cls in LOSSES.values():
        assert cls.traits.all_params()["validate"].kind is bool
    crit = build_loss("softmax_eql", C, validate=False)
    assert crit.validate is False and "validate=False" in repr(crit)
    assert "validate" not in repr(SoftmaxEQLLoss(C))
    with pytest.raises(ValueError, match="validate must be true or false"):
        SoftmaxEQLLoss(C, validate="no")
    with pytest.raises(ValueError, match="validate must be true or false"):
        build_loss("focal", C, validate=0)


def test_federated_draw_samples_successive_draws_without_replacement():
    """The sync-free Gumbel-top-k draw has the inclusion probabilities of drawing 2 classes
    one after the other, without replacement, proportional to the weights."""
    import itertools

    from eqlosses.functional import sample_federated_classes

    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    exact = torch.zeros(4)
    for i, j in itertools.permutations(range(4), 2):
        exact[[i, j]] += w[i] / w.sum() * w[j] / (w.sum() - w[i])
    g = torch.Generator().manual_seed(0)
    none = torch.tensor([4])  # a background row: no class present
    draws = torch.stack([sample_federated_classes(none, w, 2, g) for _ in range(3000)])
    assert (draws.sum(1) == 2).all()
    torch.testing.assert_close(draws.double().mean(0), exact.double(), rtol=0, atol=0.03)


# --------------------------------------------------------------------------------------------
# The statistics update decides on the device
# --------------------------------------------------------------------------------------------

def test_statistics_update_skips_non_finite_increments_on_the_device():
    stats = GradientStatistics(2)
    with count_host_syncs() as syncs:
        applied = stats.update(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), warn=False)
        skipped = stats.update(torch.tensor([float("nan"), 2.0]), torch.ones(2), warn=False)
        stats.update(torch.ones(2), torch.tensor([0.0, float("inf")]), warn=False)
    assert dict(syncs) == {}
    assert applied.dtype == torch.bool and applied.shape == () and bool(applied)
    assert not bool(skipped)
    assert stats.pos_grad.tolist() == [1.0, 2.0] and stats.neg_grad.tolist() == [3.0, 4.0]
    assert int(stats.num_updates) == 1 and int(stats.num_skipped) == 2


def test_loss_without_validation_counts_skips_silently():
    crit = SigmoidEQLLoss(C, validate=False)
    z, t, _ = _batch("sigmoid_eql")
    z = z.detach().clone()
    z[2, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing read on the host
        crit(z.requires_grad_(), t).backward()
    assert int(crit.stats.num_skipped) == 1 and int(crit.stats.num_updates) == 0
    assert crit.stats.pos_grad.abs().sum() == 0
    loud = SigmoidEQLLoss(C)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        loud(z, t)
    assert int(loud.stats.num_skipped) == 1


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------

def _compile_and_compare(name, backend):
    """Train two copies of a loss for 2 steps, one eager and one compiled (one graph), and
    compare loss, gradient and state (statistics, counts) after each step."""
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = CASES[name][0](validate=False).train()
    compiled_crit = CASES[name][0](validate=False).train()
    compiled = torch.compile(compiled_crit, fullgraph=True, backend=backend, dynamic=False)
    # Stochastic losses draw from the global RNG: the compiled graph must draw as eager does.
    with torch._inductor.config.patch(fallback_random=True):
        for step in range(2):
            results = []
            for crit in (eager, compiled):
                z, t, kwargs = _batch(name, seed=step, ignored=step == 0)
                torch.manual_seed(step)
                loss = _step(crit, z, t, kwargs)
                results.append((loss.detach(), z.grad))
            torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(compiled_crit.state_dict(), eager.state_dict(),
                                       rtol=1e-5, atol=1e-7)
    if hasattr(eager, "stats"):
        assert int(compiled_crit.stats.num_updates) == 2
    assert counters["stats"]["unique_graphs"] == 1  # one graph, not recompiled at step 2


@pytest.mark.slow  # importing torch._dynamo alone takes seconds
def test_sigmoid_eql_training_step_is_one_graph_without_validation():
    """The whole path (checks, kernel, closed-form autograd node, statistics update) in one
    dynamo graph; the ``eager`` backend skips AOTAutograd and code generation (seconds)."""
    _compile_and_compare("sigmoid_eql", "eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_loss_is_one_graph_without_validation(name):
    """dynamo captures the forward (statistics update included) in one graph and AOTAutograd
    its backward; ``aot_eager`` runs them without inductor's code generation."""
    _compile_and_compare(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_loss_compiles_with_inductor_without_validation(name):
    """The default ``torch.compile`` (inductor, C++ code generated on the CPU)."""
    _compile_and_compare(name, "inductor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_training_step_without_validation_never_syncs(name):
    crit = CASES[name][0](validate=False).cuda().train()
    z, t, kwargs = _batch(name)
    z = z.detach().cuda().requires_grad_()
    t = t.cuda()
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    _step(crit, z, t, kwargs)  # warm up (lazy initialisation may synchronise)
    z.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(crit, z, t, kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------
# The closed-form gradient is scaled in place only when the graph is freed
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_backward_through_a_kept_graph_gives_the_same_gradient_each_time(name):
    """Backward scales the closed-form gradient in place when the graph is freed after it; a
    graph kept with retain_graph=True must give the same gradient on every pass (k passes
    accumulate k times it), also under an upstream factor."""
    builder = CASES[name][0]
    z, t, kwargs = _batch(name, seed=3)
    torch.manual_seed(0)
    once = torch.autograd.grad(3.0 * builder().train()(z, t, **kwargs), z)[0]
    torch.manual_seed(0)
    loss = 3.0 * builder().train()(z, t, **kwargs)
    for k in (1, 2, 3):
        loss.backward(retain_graph=k < 3)
        torch.testing.assert_close(z.grad, k * once)
    assert bool(once.abs().sum() > 0)


# --------------------------------------------------------------------------------------------
# The kernels reuse their own buffers, never the caller's logits
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_a_training_step_leaves_the_logits_as_they_were(name):
    """The softmax kernels write their softmax into the adjusted logits' buffer when it is
    theirs; a view of the caller's logits (no adjustment, same dtype) must stay untouched, for
    every dtype, with and without ignored rows and validation."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for validate in (True, False):
            for ignored in (True, False):
                z, t, kwargs = _batch(name, ignored=ignored)
                z = z.detach().to(dtype).requires_grad_()
                before = z.detach().clone()
                crit = CASES[name][0](validate=validate).train()
                _step(crit, z, t, kwargs)
                crit.eval()(z, t, **kwargs)
                assert torch.equal(z.detach(), before), (name, dtype, validate, ignored)
