"""Behaviour of the loss modules: statistics, state, modes, precision, errors."""

import copy
import io
import warnings

import pytest
import torch

import eqlosses
from eqlosses import (BalancedSoftmaxLoss, BCELoss, CrossEntropyLoss, EQLLoss, EQLSoftmaxLoss,
                      EqualizedFocalLoss, EqualizedQualityFocalLoss, FederatedLoss, FocalLoss,
                      GradientStatistics, SeesawLoss, SigmoidEQLLoss, SoftmaxEQLLoss, build_loss)
from eqlosses.functional import (equalized_focal_loss, equalized_quality_focal_loss,
                                 sigmoid_eql_loss, softmax_eql_loss)

C = 5


def _batch(kind, n=24, seed=0, dtype=torch.float64):
    """Logits and targets in the conventions of each stateful loss."""
    g = torch.Generator().manual_seed(seed)
    w = torch.arange(1, C + 2, dtype=torch.float64) ** -1.5
    if kind == "sigmoid_eql":
        t = torch.multinomial(w, n, replacement=True, generator=g)  # C = background
        z = torch.randn(n, C + 1, generator=g, dtype=dtype) * 2
    elif kind in ("efl", "eqfl"):
        t = torch.multinomial(w, n, replacement=True, generator=g)
        t[t < C][::3] = C
        t[0] = -100
        z = torch.randn(n, C, generator=g, dtype=dtype) * 2
    else:  # softmax_eql
        t = torch.multinomial(w[:C], n, replacement=True, generator=g)
        z = torch.randn(n, C, generator=g, dtype=dtype) * 2
    return z.requires_grad_(), t


STATEFUL = {
    "sigmoid_eql": lambda **kw: SigmoidEQLLoss(C, **kw),
    "efl": lambda **kw: EqualizedFocalLoss(C, **kw),
    "eqfl": lambda **kw: EqualizedQualityFocalLoss(C, **kw),
    "softmax_eql": lambda **kw: SoftmaxEQLLoss(C, **kw),
}


def _call(kind, crit, z, t):
    if kind == "eqfl":
        q = torch.linspace(0.3, 0.9, t.numel(), dtype=z.dtype)
        return crit(z, t, quality=q)
    return crit(z, t)


def _train(kind, crit, steps, start=0):
    for s in range(start, start + steps):
        z, t = _batch(kind, seed=s)
        _call(kind, crit, z, t).backward()


@pytest.mark.parametrize("kind", list(STATEFUL))
def test_closed_form_statistics_equal_autograd_split_by_target(kind):
    crit = STATEFUL[kind]()
    _train(kind, crit, 2)  # a non-trivial state
    before = crit.stats.pos_grad.clone(), crit.stats.neg_grad.clone()
    z, t = _batch(kind, seed=7)
    _call(kind, crit, z, t).backward()
    grad = z.grad[:, :C].abs()
    valid = t != -100
    if kind == "sigmoid_eql":
        grad = grad * valid.sum()  # EQL v2's statistic is not divided by N
    onehot = torch.zeros_like(grad)
    fg = valid & (t < C)
    onehot[fg.nonzero().squeeze(1), t[fg]] = 1
    pos = (grad * onehot).sum(0)
    neg = (grad * (1 - onehot) * valid[:, None]).sum(0)
    torch.testing.assert_close(crit.stats.pos_grad - before[0], pos)
    torch.testing.assert_close(crit.stats.neg_grad - before[1], neg)


@pytest.mark.parametrize("kind", ["sigmoid_eql", "efl", "eqfl"])
def test_module_and_functional_forms_agree(kind):
    crit = STATEFUL[kind]()
    _train(kind, crit, 3)
    z, t = _batch(kind, seed=11)
    stats = crit.stats
    if kind == "sigmoid_eql":
        f = sigmoid_eql_loss(z, t, stats.ratio(100.0))
    elif kind == "efl":
        f = equalized_focal_loss(z, t, stats.ratio(1.0).clamp(0, 1))
    else:
        f = equalized_quality_focal_loss(z, t, torch.linspace(0.3, 0.9, t.numel(),
                                                              dtype=z.dtype),
                                         stats.ratio(1.0).clamp(0, 1))
    torch.testing.assert_close(_call(kind, crit, z, t), f)


@pytest.mark.parametrize("indicator", ["pos", "neg"])
@pytest.mark.parametrize("layout", ["rows", "pixels"])
def test_softmax_eql_module_equals_functional_with_its_state(indicator, layout):
    """The module's loss and gradient are the functional loss at the indicator the module
    held before the step (tau and the indicator choice passed through), and its statistics
    grow by the functional loss's |d loss / d z|, split into the target class (positive) and
    the others (negative), ignored pixels excluded."""
    crit = SoftmaxEQLLoss(C, tau=1.5, indicator=indicator, ignore_index=255)
    g = torch.Generator().manual_seed(5)
    shape = (24,) if layout == "rows" else (2, 3, 4)
    for step in range(4):
        z = (torch.randn(shape[0], C, *shape[1:], generator=g, dtype=torch.float64) * 2)
        t = torch.multinomial(torch.arange(1, C + 1, dtype=torch.float64) ** -1.5,
                              int(torch.tensor(shape).prod()), replacement=True,
                              generator=g).view(shape)
        t.view(-1)[::7] = 255
        before = crit.stats.pos_grad.clone(), crit.stats.neg_grad.clone()
        state = before[0] if indicator == "pos" else before[1]
        z_module, z_func = z.clone().requires_grad_(), z.clone().requires_grad_()
        module_loss = crit(z_module, t)
        module_loss.backward()
        func_loss = softmax_eql_loss(z_func, t, state, tau=1.5, ignore_index=255)
        func_loss.backward()
        torch.testing.assert_close(module_loss, func_loss)
        torch.testing.assert_close(z_module.grad, z_func.grad)
        grad = z_func.grad.abs().movedim(1, -1).reshape(-1, C)  # rows of |d loss / d z|
        rows_t = t.reshape(-1)
        valid = rows_t != 255
        onehot = torch.nn.functional.one_hot(rows_t.clamp(max=C - 1), C).to(grad.dtype)
        onehot = onehot * valid[:, None]
        torch.testing.assert_close(crit.stats.pos_grad - before[0], (grad * onehot).sum(0))
        torch.testing.assert_close(crit.stats.neg_grad - before[1],
                                   (grad * (1 - onehot) * valid[:, None]).sum(0))
        if step:  # a state that is not all zeros: the margins matter from step 1 on
            assert not torch.allclose(func_loss, torch.nn.functional.cross_entropy(
                z, t, ignore_index=255))


@pytest.mark.parametrize("kind", list(STATEFUL))
def test_eval_mode_and_no_grad_do_not_update(kind):
    crit = STATEFUL[kind]()
    _train(kind, crit, 1)
    snapshot = copy.deepcopy(crit.state_dict())
    z, t = _batch(kind, seed=3)
    crit.eval()
    _call(kind, crit, z, t)
    crit.train()
    with torch.no_grad():
        _call(kind, crit, z, t)
    for key, value in crit.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    _call(kind, crit, z, t)
    assert int(crit.stats.num_updates) == 2


@pytest.mark.parametrize("kind", list(STATEFUL))
def test_resume_equals_uninterrupted_run(kind):
    straight = STATEFUL[kind]()
    _train(kind, straight, 5)
    first = STATEFUL[kind]()
    _train(kind, first, 3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = STATEFUL[kind]()
    resumed.load_state_dict(torch.load(buffer))
    _train(kind, resumed, 2, start=3)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    z, t = _batch(kind, seed=99)
    assert torch.equal(_call(kind, straight, z, t), _call(kind, resumed, z, t))


def test_state_dict_with_wrong_class_count_is_a_clear_error():
    state = SigmoidEQLLoss(5).state_dict()
    with pytest.raises(ValueError, match="num_classes=7"):
        SigmoidEQLLoss(7).load_state_dict(state)


def test_statistics_survive_half_precision_models():
    model = torch.nn.Sequential(torch.nn.Linear(3, C))
    model.crit = SoftmaxEQLLoss(C)
    model.half()
    assert model[0].weight.dtype == torch.float16
    assert model.crit.stats.pos_grad.dtype == torch.float64
    model.to(torch.float32)
    assert model.crit.stats.pos_grad.dtype == torch.float64
    seesaw = SeesawLoss(3).half()
    assert seesaw.cum_samples.dtype == torch.float64


def test_statistics_are_unaffected_by_loss_scaling_and_autocast():
    a, b = SoftmaxEQLLoss(C), SoftmaxEQLLoss(C)
    for s in range(3):
        z, t = _batch("softmax_eql", seed=s, dtype=torch.float32)
        a(z, t).backward()
        z2 = z.detach().clone().requires_grad_()
        (b(z2, t) * 65536.0).backward()  # what GradScaler does to the loss
    assert torch.equal(a.stats.pos_grad, b.stats.pos_grad)
    # bfloat16 logits (autocast on CPU): computed in float32, statistics stay finite float64
    crit = SigmoidEQLLoss(C)
    model = torch.nn.Linear(4, C + 1)
    x = torch.randn(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = crit(logits, torch.randint(0, C + 1, (16,)))
    loss.backward()
    assert loss.dtype == torch.float32 and model.weight.grad.dtype == torch.float32
    assert crit.stats.pos_grad.dtype == torch.float64 and torch.isfinite(crit.stats.neg_grad).all()


def test_non_finite_logits_do_not_poison_the_statistics():
    crit = SigmoidEQLLoss(C)
    _train("sigmoid_eql", crit, 2)
    before = crit.stats.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    z, t = _batch("sigmoid_eql", seed=5)
    bad = z.detach().clone()
    bad[3, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        crit(bad, t)
    assert torch.equal(crit.stats.pos_grad, before["pos_grad"])
    assert int(crit.stats.num_skipped) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        bad[0, 0] = float("inf")
        crit(bad, t)
    assert int(crit.stats.num_skipped) == 2
    crit(z, t)
    assert int(crit.stats.num_updates) == int(before["num_updates"]) + 1


@pytest.mark.parametrize("kind", list(STATEFUL))
def test_empty_batch_gives_zero_loss_that_backpropagates(kind):
    crit = STATEFUL[kind]()
    z, t = _batch(kind)
    z = z[:0].detach().requires_grad_()
    loss = _call(kind, crit, z, t[:0])
    loss.backward()
    assert loss.item() == 0.0 and z.grad.shape == z.shape
    assert int(crit.stats.num_updates) == 1  # the collective still ran


def test_shared_statistics_accumulate_from_both_losses():
    stats = GradientStatistics(C)
    a, b = SoftmaxEQLLoss(C, stats=stats), SoftmaxEQLLoss(C, tau=2.0, stats=stats)
    z, t = _batch("softmax_eql")
    a(z, t)
    b(z, t)
    assert int(stats.num_updates) == 2 and a.stats is b.stats
    with pytest.raises(ValueError, match="3 classes"):
        SoftmaxEQLLoss(C, stats=GradientStatistics(3))


def test_gradient_accumulation_counts_every_micro_batch():
    crit = SoftmaxEQLLoss(C)
    z, t = _batch("softmax_eql")
    crit(z[:12], t[:12]).backward()
    crit(z[12:], t[12:]).backward()
    assert int(crit.stats.num_updates) == 2


def test_wrong_device_is_a_clear_error():
    crit = SigmoidEQLLoss(C)
    z = torch.empty(4, C + 1, device="meta")
    with pytest.raises(ValueError, match="move the loss"):
        crit(z, torch.zeros(4, dtype=torch.long, device="meta"))


def test_scores_and_channels():
    z = torch.randn(3, C + 2)
    s = SigmoidEQLLoss(C).scores(z[:, : C + 1])
    torch.testing.assert_close(s, torch.sigmoid(z[:, :C]) * (1 - torch.sigmoid(z[:, C:C + 1])))
    assert SeesawLoss(C).scores(z).shape == (3, C)
    assert CrossEntropyLoss(C, background=True).scores(z[:, : C + 1]).shape == (3, C)
    torch.testing.assert_close(SoftmaxEQLLoss(C).scores(z[:, :C]), torch.softmax(z[:, :C], 1))
    assert EqualizedFocalLoss(C).num_channels == C
    assert SigmoidEQLLoss(C).num_channels == C + 1
    assert SeesawLoss(C).num_channels == C + 2
    assert BCELoss(C, objectness=True).num_channels == C + 1


def test_every_registered_loss_builds_and_runs():
    counts = torch.tensor([100, 40, 10, 3, 1])
    extra = {"balanced_softmax": {"class_counts": counts},
             "eql": {"class_frequency": counts / 200},
             "eql_softmax": {"class_frequency": counts / 200},
             "federated": {"class_image_counts": counts, "num_sampled": 3}}
    for name in eqlosses.LOSSES:
        crit = build_loss(name, C, **extra.get(name, {}))
        z = torch.randn(8, crit.num_channels, requires_grad=True)
        high = C if crit.num_channels > C or name in ("efl", "eqfl", "focal", "eql",
                                                       "federated", "bce") else C - 1
        t = torch.randint(0, high + 1, (8,))
        if name == "eqfl":
            loss = crit(z, t, quality=torch.rand(8))
        else:
            loss = crit(z, t)
        loss.backward()
        assert torch.isfinite(loss) and z.grad is not None, name
        assert crit.scores(z.detach()).shape == (8, C), name
    with pytest.raises(ValueError, match="unknown loss 'eqlv3'"):
        build_loss("eqlv3", C)
    with pytest.raises(ValueError, match="takes no argument .taus.; its arguments: eps"):
        build_loss("softmax_eql", C, taus=1.0)


def test_baseline_modules_match_torch():
    z = torch.randn(8, C + 1, dtype=torch.float64)
    t = torch.randint(0, C + 1, (8,))
    torch.testing.assert_close(CrossEntropyLoss(C, background=True)(z, t),
                               torch.nn.functional.cross_entropy(z, t))
    y = torch.nn.functional.one_hot(t, C + 1).double()
    torch.testing.assert_close(BCELoss(C, objectness=True)(z, t),
                               torch.nn.functional.binary_cross_entropy_with_logits(
                                   z, y, reduction="sum") / 8)
    torch.testing.assert_close(BCELoss(C)(z[:, :C], t),
                               torch.nn.functional.binary_cross_entropy_with_logits(
                                   z[:, :C], y[:, :C], reduction="sum") / 8)
    torch.testing.assert_close(FocalLoss(C)(z[:, :C], t), FocalLoss(C)(z[:, :C], t))
    assert EQLLoss(C, class_frequency=torch.ones(C))(z[:, :C], t) == BCELoss(C)(z[:, :C], t)
    torch.testing.assert_close(
        BalancedSoftmaxLoss(C, class_counts=torch.ones(C))(z[:, :C], t.clamp(max=C - 1)),
        torch.nn.functional.cross_entropy(z[:, :C], t.clamp(max=C - 1)))


def test_eql_softmax_is_deterministic_in_eval():
    crit = EQLSoftmaxLoss(C, class_frequency=torch.tensor([0.5, 0.2, 1e-4, 1e-5, 1e-5]),
                          lambda_=1e-3)
    z = torch.randn(8, C)
    t = torch.randint(0, C, (8,))
    crit.eval()
    torch.testing.assert_close(crit(z, t), torch.nn.functional.cross_entropy(z, t))


def test_federated_uses_all_classes_in_eval():
    crit = FederatedLoss(C, class_image_counts=torch.ones(C), num_sampled=1).eval()
    z = torch.randn(8, C, dtype=torch.float64)
    t = torch.randint(0, C + 1, (8,))
    torch.testing.assert_close(crit(z, t), BCELoss(C)(z, t))


def test_seesaw_counts_update_in_training_only():
    crit = SeesawLoss(3)
    z = torch.randn(4, 5)
    crit(z, torch.tensor([0, 3, 3, -100]))
    assert crit.cum_samples.tolist() == [1.0, 0.0, 0.0, 2.0]
    crit.eval()(z, torch.tensor([1, 1, 1, 1]))
    assert crit.cum_samples.tolist() == [1.0, 0.0, 0.0, 2.0]


def test_softmax_eql_negative_indicator():
    crit = SoftmaxEQLLoss(C, indicator="neg")
    _train("softmax_eql", crit, 3)
    terms = crit.class_terms()
    assert torch.equal(terms["indicator"], crit.stats.neg_grad)
    z, t = _batch("softmax_eql", seed=21)
    expected = softmax_eql_loss(z, t, crit.stats.neg_grad)  # before the module's update
    torch.testing.assert_close(crit(z, t), expected)
    with pytest.raises(ValueError, match="indicator"):
        SoftmaxEQLLoss(C, indicator="both")


def test_sigmoid_eql_without_objectness_column():
    crit = SigmoidEQLLoss(C, objectness=False)
    assert crit.num_channels == C
    z = torch.randn(12, C, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, C, (12,))
    # initial state: all weights 1, plain BCE over C columns
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        z, torch.nn.functional.one_hot(t, C).double(), reduction="sum") / 12
    torch.testing.assert_close(crit(z, t), expected)
    # statistics as with the objectness column, on the same foreground logits
    with_bg = SigmoidEQLLoss(C)
    with_bg(torch.cat([z.detach(), torch.zeros(12, 1, dtype=torch.float64)], 1), t)
    torch.testing.assert_close(crit.stats.pos_grad, with_bg.stats.pos_grad)
    torch.testing.assert_close(crit.stats.neg_grad, with_bg.stats.neg_grad)
    torch.testing.assert_close(crit.scores(z), torch.sigmoid(z))


def test_argument_and_state_errors():
    with pytest.raises(ValueError, match="expects 5"):
        FocalLoss(5)(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes=3"):
        SeesawLoss(3).load_state_dict(SeesawLoss(4).state_dict())
    with pytest.raises(ValueError, match="eps must be > 0"):
        softmax_eql_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.zeros(3), eps=0.0)
    with pytest.raises(ValueError, match="focal_gamma"):
        equalized_focal_loss(torch.randn(2, 3), torch.tensor([0, 3]), torch.ones(3),
                             focal_gamma=0.0)
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        equalized_focal_loss(torch.randn(2, 3), torch.tensor([0, 3]), torch.ones(3),
                             normalizer=0.0)
    with pytest.warns(UserWarning, match="no class has a frequency below"):
        EQLLoss(3, class_frequency=torch.tensor([0.5, 0.3, 0.2]))


def test_eql_softmax_with_an_ignore_label_above_the_classes():
    crit = EQLSoftmaxLoss(3, class_frequency=torch.tensor([0.5, 1e-4, 1e-4]), lambda_=1e-3,
                          gamma=1.0, ignore_index=255)
    z = torch.randn(4, 3, requires_grad=True)
    loss = crit(z, torch.tensor([0, 255, 1, 255]))
    loss.backward()
    assert torch.isfinite(loss) and (z.grad[[1, 3]] == 0).all()


def test_mean_across_processes_keeps_the_device():
    from eqlosses.distributed import mean_across_processes

    assert mean_across_processes(torch.tensor(3, device="meta")).device.type == "meta"
    assert mean_across_processes(2, device="meta").device.type == "meta"
