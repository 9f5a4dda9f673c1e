"""SoftmaxEQLVariantLoss (``softmax_eql_x``): paper-exact by default, and each variant."""

import math

import pytest
import torch

from eqlosses.losses import SoftmaxEQLLoss, SoftmaxEQLVariantLoss, build_loss, losses_for
from eqlosses.losses.registry import loss_class


def _batches(n=6, rows=48, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, c, generator=g) * 2, torch.randint(0, c, (rows,), generator=g))
            for _ in range(n)]


def _step(crit, logits, targets):
    z = logits.clone().requires_grad_()
    loss = crit(z, targets)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("kwargs", [{}, {"tau": 2.0}, {"indicator": "neg"}])
def test_defaults_are_the_papers_loss_bit_for_bit(kwargs):
    paper, variant = SoftmaxEQLLoss(5, **kwargs), SoftmaxEQLVariantLoss(5, **kwargs)
    for logits, targets in _batches():
        a, b = _step(paper, logits, targets), _step(variant, logits, targets)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(paper.stats.pos_grad, variant.stats.pos_grad)
    assert torch.equal(paper.stats.neg_grad, variant.stats.neg_grad)


def test_raw_statistics_are_those_of_plain_cross_entropy():
    crit = SoftmaxEQLVariantLoss(5, source="raw")
    pos = torch.zeros(5, dtype=torch.float64)
    for logits, targets in _batches():
        margin = crit.class_terms()["margin"]
        loss, _ = _step(crit, logits, targets)
        # the loss is CE over the adjusted logits ...
        want = torch.nn.functional.cross_entropy(logits.double() + margin, targets)
        assert math.isclose(loss.item(), want.item(), rel_tol=1e-5)
        # ... while the statistics are (1 - softmax(z)_y) / N at the raw logits
        p = torch.softmax(logits.double(), 1)
        pos += torch.zeros(5, dtype=torch.float64).index_add_(
            0, targets, 1 - p.gather(1, targets[:, None])[:, 0]) / len(targets)
    torch.testing.assert_close(crit.stats.pos_grad, pos)
    assert not torch.equal(crit.stats.pos_grad, _paper_after(_batches()).stats.pos_grad)


def _paper_after(batches):
    paper = SoftmaxEQLLoss(5)
    for logits, targets in batches:
        _step(paper, logits, targets)
    return paper


def test_decaying_sums_and_ratio_indicator():
    decay = 0.5
    crit = SoftmaxEQLVariantLoss(5, source="raw", indicator="ratio", decay=decay)
    ref = SoftmaxEQLVariantLoss(5, source="raw", indicator="ratio")  # cumulative
    s_pos = s_neg = torch.zeros(5, dtype=torch.float64)
    for logits, targets in _batches():
        before = crit.stats.pos_grad.clone(), crit.stats.neg_grad.clone()
        _step(crit, logits, targets)
        s_pos = decay * s_pos + (crit.stats.pos_grad - before[0])
        s_neg = decay * s_neg + (crit.stats.neg_grad - before[1])
        _step(ref, logits, targets)
    torch.testing.assert_close(crit.avg_pos, s_pos)
    torch.testing.assert_close(crit.indicator_values(), s_pos / s_neg)
    # the decaying sums forget: they differ from the cumulative ones
    assert not torch.allclose(crit.indicator_values(), ref.indicator_values())
    assert {"avg_pos", "avg_neg"} <= set(crit.state_dict())


def test_recency_weights_the_sums_the_indicator_is_read_from():
    """recency=1: the pos/neg sums the margins come from weight update t by t; the
    statistics themselves stay the plain cumulative sums; recency=0 is the default loss."""
    crit = SoftmaxEQLVariantLoss(5, source="raw", recency=1.0)
    plain = SoftmaxEQLVariantLoss(5, source="raw", recency=0.0)
    ref = SoftmaxEQLVariantLoss(5, source="raw")
    s_pos = torch.zeros(5, dtype=torch.float64)
    for t, (logits, targets) in enumerate(_batches(), start=1):
        before = crit.stats.pos_grad.clone()
        _step(crit, logits, targets)
        s_pos = s_pos + t * (crit.stats.pos_grad - before)
        torch.testing.assert_close(_step(plain, logits, targets), _step(ref, logits, targets),
                                   rtol=0, atol=0)
    torch.testing.assert_close(crit.avg_pos, s_pos)
    torch.testing.assert_close(crit.indicator_values(), s_pos)
    assert "avg_pos" not in plain.state_dict()
    assert not torch.allclose(crit.indicator_values(), ref.indicator_values())


@pytest.mark.parametrize("indicator", ["pos", "mass"])
def test_a_skipped_step_neither_adds_to_nor_decays_the_loss_sums(indicator):
    crit = SoftmaxEQLVariantLoss(5, source="raw", indicator=indicator, decay=0.5)
    for logits, targets in _batches(n=3):
        _step(crit, logits, targets)
    names = ["avg_pos", "avg_neg"] + (["mass"] if indicator == "mass" else [])
    before = {k: getattr(crit, k).clone() for k in names}
    assert all(v.abs().sum() > 0 for v in before.values())
    logits, targets = _batches(n=1, seed=1)[0]
    logits[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        _step(crit, logits, targets)
    assert int(crit.stats.num_skipped) == 1
    for k in names:
        assert torch.equal(getattr(crit, k), before[k]), k


def test_tau_warmup_ramps_the_margin():
    crit = SoftmaxEQLVariantLoss(5, tau=2.0, tau_warmup=4)
    full = SoftmaxEQLVariantLoss(5, tau=2.0)
    for k, (logits, targets) in enumerate(_batches(n=6)):
        if k:
            log_i = torch.log(crit.stats.pos_grad.clamp(min=1e-4))
            torch.testing.assert_close(crit.class_terms()["margin"], 2.0 * min(k / 4, 1) * log_i)
        _step(crit, logits, targets)
        _step(full, logits, targets)
    assert crit.current_tau().item() == 2.0


def test_evaluation_forwards_update_nothing():
    crit = SoftmaxEQLVariantLoss(5, source="raw", decay=0.9).eval()
    logits, targets = _batches(n=1)[0]
    crit(logits, targets)
    assert crit.stats.num_updates.item() == 0 and crit.avg_pos.abs().sum().item() == 0


def test_registered_without_class_counts_and_checked_arguments():
    assert "softmax_eql_x" in losses_for("cls") and "softmax_eql_x" in losses_for("seg")
    assert loss_class("softmax_eql_x") is SoftmaxEQLVariantLoss
    assert not SoftmaxEQLVariantLoss.traits.statistics  # needs no class prior
    crit = build_loss("softmax_eql_x", 3, source="raw", decay=0.99)
    assert crit.source == "raw" and crit.decay == 0.99
    with pytest.raises(ValueError, match="source must be one of 'adjusted', 'raw'"):
        SoftmaxEQLVariantLoss(3, source="logits")
    with pytest.raises(ValueError, match="decay must be a number > 0 and <= 1"):
        SoftmaxEQLVariantLoss(3, decay=0.0)


def test_segmentation_logits_and_ignored_pixels():
    crit = SoftmaxEQLVariantLoss(3, source="raw", ignore_index=255)
    logits = torch.randn(2, 3, 4, 4)
    targets = torch.randint(0, 3, (2, 4, 4))
    targets[0, 0] = 255
    _step(crit, logits, targets)
    rows = logits.permute(0, 2, 3, 1).reshape(-1, 3)
    flat = targets.reshape(-1)
    keep = flat != 255
    p = torch.softmax(rows[keep].double(), 1)
    want = torch.zeros(3, dtype=torch.float64).index_add_(
        0, flat[keep], 1 - p.gather(1, flat[keep][:, None])[:, 0]) / keep.sum()
    torch.testing.assert_close(crit.stats.pos_grad, want)


@pytest.mark.parametrize("source", ["adjusted", "raw"])
@pytest.mark.parametrize("decay", [1.0, 0.9])
@pytest.mark.parametrize("recency", [0.0, 1.0, 0.5])
def test_mass_indicator_is_the_summed_predicted_probability(source, decay, recency):
    """indicator="mass": M_j accumulates sum_n softmax(.)_nj / N over the non-ignored rows
    (of the adjusted logits at the margins in force, or of the raw ones), summed directly
    here (update t weighted by t ** recency), and sets the margins log M_j."""
    crit = SoftmaxEQLVariantLoss(5, indicator="mass", source=source, decay=decay,
                                 recency=recency)
    mass = torch.zeros(5, dtype=torch.float64)
    for step, (logits, targets) in enumerate(_batches()):
        targets = targets.clone()
        targets[: step % 3] = -100  # some steps with ignored rows
        margin = crit.class_terms()["margin"]
        # float32 softmax against this float64 sum, the weights (up to 6) scaling its rounding
        tol = {"rtol": 1e-5, "atol": 1e-6} if recency else {}
        torch.testing.assert_close(margin, torch.log(mass.clamp(min=1e-4)), **tol)
        _step(crit, logits, targets)
        z = logits.double() + (margin if source == "adjusted" else 0)
        keep = targets != -100
        mass = (decay * mass
                + (step + 1) ** recency * torch.softmax(z[keep], 1).sum(0) / int(keep.sum()))
        torch.testing.assert_close(crit.mass, mass, **tol)
    assert int(crit.stats.num_updates) == 6
    assert "mass" in crit.state_dict()


def test_mass_indicator_tends_to_the_class_frequencies():
    """Trained on a stream with class frequencies 8:4:2:1 (a linear model on noise, so only
    the prior can be learnt), the accumulated predicted mass ends near those frequencies
    although the loss never saw them."""
    torch.manual_seed(0)
    freq = torch.tensor([8.0, 4.0, 2.0, 1.0])
    model = torch.nn.Linear(3, 4)
    crit = SoftmaxEQLVariantLoss(4, indicator="mass", decay=0.99)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(600):
        t = torch.multinomial(freq, 64, replacement=True)
        loss = crit(model(torch.randn(64, 3)), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    share = crit.mass / crit.mass.sum()
    torch.testing.assert_close(share, (freq / freq.sum()).double(), rtol=0.15, atol=0.0)


@pytest.mark.parametrize("shape", [(48, 5), (4, 5, 3, 2)])
def test_gamma_scales_each_class_logit_by_its_indicator_share(shape):
    """gamma > 0: the loss is CE(s * z + margin) with s_j = (I_j / max I)^gamma (eps-clamped),
    written out here with autograd, for rows and for pixels (class dim 1); the statistics
    (here the mass, which reads the softmax of the adjusted logits) follow the same logits."""
    gamma = 0.5
    crit = SoftmaxEQLVariantLoss(5, indicator="mass", gamma=gamma)
    assert torch.equal(crit.class_terms()["scale"], torch.ones(5, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
        targets = torch.randint(0, 5, (shape[0],) + shape[2:], generator=g)
        terms = crit.class_terms()
        ind = crit.mass.clamp(min=1e-4)
        torch.testing.assert_close(terms["scale"], (ind / ind.max()) ** gamma)
        view = (1, 5) + (1,) * (len(shape) - 2)
        ref = logits.clone().requires_grad_()
        want = torch.nn.functional.cross_entropy(
            ref * terms["scale"].view(view) + terms["margin"].view(view), targets)
        want.backward()
        mass_before = crit.mass.clone()
        loss, grad = _step(crit, logits, targets)
        torch.testing.assert_close(loss, want.detach())
        torch.testing.assert_close(grad, ref.grad)
        z = logits * terms["scale"].view(view) + terms["margin"].view(view)
        p = torch.softmax(z, 1).movedim(1, -1).reshape(-1, 5)
        torch.testing.assert_close(crit.mass, mass_before + p.sum(0) / len(p))
    assert not torch.equal(crit.class_terms()["scale"], torch.ones(5, dtype=torch.float64))


def test_gamma_zero_changes_nothing():
    plain, zero = SoftmaxEQLVariantLoss(5, indicator="mass"), SoftmaxEQLVariantLoss(
        5, indicator="mass", gamma=0.0)
    for logits, targets in _batches():
        a, b = _step(plain, logits, targets), _step(zero, logits, targets)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert "scale" not in zero.class_terms()
    with pytest.raises(ValueError, match="gamma"):
        SoftmaxEQLVariantLoss(5, gamma=-1.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(48, 5), (4, 5, 3, 2)])
def test_balance_weighs_each_row_by_the_estimated_prior(reduction, shape):
    """balance=beta: row n's loss is weighted by w_{y_n} = pi^-beta / sum_k pi_k^(1-beta),
    pi the mass normalised to sum 1 (eps-clamped), written out here with autograd for rows
    and for pixels, some of them ignored; the mass itself stays the unweighted sum of the
    predicted probabilities."""
    beta = 0.5
    crit = SoftmaxEQLVariantLoss(5, indicator="mass", balance=beta, reduction=reduction)
    assert torch.equal(crit.class_terms()["weight"], torch.ones(5, dtype=torch.float64))
    g = torch.Generator().manual_seed(4)
    for step in range(4):
        logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
        targets = torch.randint(0, 5, (shape[0],) + shape[2:], generator=g)
        targets.view(-1)[: step] = -100  # some steps with ignored rows
        terms = crit.class_terms()
        prior = crit.mass.clamp(min=1e-4) / crit.mass.clamp(min=1e-4).sum()
        want_w = prior ** -beta / (prior ** (1 - beta)).sum()
        torch.testing.assert_close(terms["weight"], want_w)
        view = (1, 5) + (1,) * (len(shape) - 2)
        ref = logits.clone().requires_grad_()
        rows = torch.nn.functional.cross_entropy(ref + terms["margin"].view(view), targets,
                                                 reduction="none")
        keep = targets != -100
        weighted = rows * want_w[targets.clamp(min=0)] * keep
        want = {"mean": weighted.sum() / keep.sum(), "sum": weighted.sum(),
                "none": weighted}[reduction]
        want.sum().backward()
        mass_before = crit.mass.clone()
        z = logits.clone().requires_grad_()
        loss = crit(z, targets)
        loss.sum().backward()
        torch.testing.assert_close(loss, want.detach())
        torch.testing.assert_close(z.grad, ref.grad)
        p = torch.softmax(logits + terms["margin"].view(view), 1).movedim(1, -1).reshape(-1, 5)
        scale = 1 / int(keep.sum()) if reduction == "mean" else 1
        torch.testing.assert_close(crit.mass, mass_before + p[keep.reshape(-1)].sum(0) * scale)
    assert not torch.equal(crit.class_terms()["weight"], torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_balance_is_in_expectation_the_loss_of_a_resampled_stream(beta):
    """With the prior estimate at a batch's class frequencies n_j / N, the weighted mean
    loss equals the loss of the same rows re-sampled with class probabilities proportional
    to n_j^(1-beta) (square-root sampling for 0.5, class-balanced for 1): sum_j q_j l_j with
    l_j the mean loss of class j's rows."""
    counts = torch.tensor([24, 12, 8, 4])
    targets = torch.repeat_interleave(torch.arange(4), counts)
    logits = torch.randn(len(targets), 4, generator=torch.Generator().manual_seed(5))
    crit = SoftmaxEQLVariantLoss(4, indicator="mass", balance=beta)
    with torch.no_grad():
        crit.mass.copy_(counts / counts.sum())
    margin = crit.class_terms()["margin"]
    loss = crit(logits, targets)
    rows = torch.nn.functional.cross_entropy(logits.double() + margin, targets,
                                             reduction="none")
    per_class = torch.stack([rows[targets == j].mean() for j in range(4)])
    q = counts.double() ** (1 - beta)
    torch.testing.assert_close(loss.double(), (q / q.sum() * per_class).sum(),
                               rtol=1e-6, atol=0.0)


def test_balance_leaves_the_statistics_unweighted():
    """The margins (and every statistic) follow the same path with and without the row
    weights, since the statistics are those of the unweighted loss; 0 changes nothing."""
    plain = SoftmaxEQLVariantLoss(5, indicator="mass", recency=1.0)
    zero = SoftmaxEQLVariantLoss(5, indicator="mass", recency=1.0, balance=0.0)
    half = SoftmaxEQLVariantLoss(5, indicator="mass", recency=1.0, balance=0.5)
    for step, (logits, targets) in enumerate(_batches()):
        a, b, c = (_step(x, logits, targets) for x in (plain, zero, half))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.allclose(a[1], c[1]) == (step == 0)  # no mass yet: all weights 1
    torch.testing.assert_close(half.mass, plain.mass)
    torch.testing.assert_close(half.stats.pos_grad, plain.stats.pos_grad)
    assert "weight" not in zero.class_terms()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="balance"):
            SoftmaxEQLVariantLoss(5, balance=bad)
