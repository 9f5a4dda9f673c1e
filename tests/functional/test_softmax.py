import pytest
import torch
import torch.nn.functional as F

from eqlosses.functional import (balanced_softmax_loss, eql_softmax_loss, seesaw_loss,
                                 softmax_eql_adjustment, softmax_eql_loss)
from tests import reference as ref


def _clone(z):
    return z.detach().clone().requires_grad_()


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_softmax_eql_matches_paper_margin(tau):
    z = (torch.randn(9, 5, dtype=torch.float64) * 2).requires_grad_()
    t = torch.tensor([0, 1, 4, 4, -100, 2, 0, 3, 1])
    indicator = torch.tensor([3.0, 0.5, 0.0, 1e-6, 0.02], dtype=torch.float64)
    loss = softmax_eql_loss(z, t, indicator, tau=tau)
    z2 = _clone(z)
    expected = ref.adjusted_ce(z2, t, ref.softmax_eql_margin(indicator, tau=tau))
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)


def test_softmax_eql_initial_state_is_cross_entropy():
    z = torch.randn(16, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (16,))
    loss = softmax_eql_loss(z, t, torch.zeros(7, dtype=torch.float64))
    z2 = _clone(z)
    expected = F.cross_entropy(z2, t)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_segmentation_shape_equals_flattened_rows(reduction):
    b, c, h, w = 2, 6, 5, 4
    z = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, c, (b, h, w))
    t[0, 0] = 255
    t[1, 2, 1:3] = 255
    indicator = torch.rand(c, dtype=torch.float64)
    loss = softmax_eql_loss(z, t, indicator, ignore_index=255, reduction=reduction)
    z2 = _clone(z)
    flat = softmax_eql_loss(z2.permute(0, 2, 3, 1).reshape(-1, c), t.reshape(-1), indicator,
                            ignore_index=255, reduction=reduction)
    if reduction == "none":
        assert loss.shape == (b, h, w) and (loss[t == 255] == 0).all()
        flat = flat.view(b, h, w)
        weight = torch.rand(b, h, w, dtype=torch.float64)
        loss, flat = (loss * weight).sum(), (flat * weight).sum()
    loss.backward()
    flat.backward()
    torch.testing.assert_close(loss, flat)
    torch.testing.assert_close(z.grad, z2.grad)
    assert (z.grad.permute(0, 2, 3, 1)[t == 255] == 0).all()


def test_segmentation_initial_state_is_torch_cross_entropy_with_ignore():
    z = torch.randn(2, 4, 6, 6, requires_grad=True)
    t = torch.randint(0, 4, (2, 6, 6))
    t[:, :2] = 255
    loss = softmax_eql_loss(z, t, torch.zeros(4), ignore_index=255)
    z2 = _clone(z)
    expected = F.cross_entropy(z2, t, ignore_index=255)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)


def test_all_ignored_batch_gives_zero_loss_and_gradient():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.full((2, 4, 4), 255)
    loss = softmax_eql_loss(z, t, torch.rand(3), ignore_index=255)
    loss.backward()
    assert loss.item() == 0.0 and (z.grad == 0).all()
    # torch's own cross-entropy gives nan here
    assert torch.isnan(F.cross_entropy(z.detach(), t, ignore_index=255))


def test_gradcheck():
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 1, 1])
    ind = torch.tensor([0.3, 0.0, 2.0, 0.05], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: softmax_eql_loss(x, t, ind), (z,))
    zs = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    ts = torch.randint(0, 4, (2, 3, 3))
    ts[0, 1, 1] = -100
    assert torch.autograd.gradcheck(lambda x: softmax_eql_loss(x, ts, ind, reduction="none"),
                                    (zs,))


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("ignored", [False, True])
def test_extreme_logits_underflow_is_handled(validate, ignored):
    """p_t underflows in row 0: the loss there comes from logsumexp, exactly (with validation
    the kernel recomputes the logits its softmax overwrote; without, it read them before)."""
    z = torch.tensor([[-1000.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, -1e4, 1.0]],
                     requires_grad=True)
    t = torch.tensor([0, 1, -100 if ignored else 1])
    loss = softmax_eql_loss(z, t, torch.zeros(3), reduction="none", validate=validate)
    expected = F.cross_entropy(z.detach(), t, reduction="none")
    torch.testing.assert_close(loss, expected)
    assert loss[0] > 999
    loss.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_adjustment_formula():
    torch.testing.assert_close(softmax_eql_adjustment(torch.tensor([0.0, 1.0, 10.0]), tau=2.0),
                               2.0 * torch.log(torch.tensor([1e-4, 1.0, 10.0])))


def test_balanced_softmax_is_prior_adjusted_ce():
    z = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 3, (8,))
    counts = torch.tensor([90, 9, 1])
    loss = balanced_softmax_loss(z, t, counts, tau=1.5)
    prior = counts.double() / counts.sum()
    z2 = _clone(z)
    expected = F.cross_entropy(z2 + 1.5 * prior.log(), t)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(balanced_softmax_loss(z, t, counts, tau=0.0),
                               F.cross_entropy(z, t))
    # a class with no sample keeps a finite offset
    assert torch.isfinite(balanced_softmax_loss(z, t, torch.tensor([5, 0, 1])))


def test_eql_softmax_drops_rare_negatives():
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    freq = torch.tensor([0.5, 0.2, 1e-4, 1e-5])  # classes 2, 3 are rare
    loss = eql_softmax_loss(z, t, freq, lambda_=1e-3, gamma=1.0)
    # with gamma = 1 every rare non-target class leaves the denominator
    z2 = _clone(z)
    terms = []
    for i in range(6):
        keep = [j for j in range(4) if j == t[i] or freq[j] >= 1e-3]
        terms.append(-(z2[i, t[i]] - torch.logsumexp(z2[i, keep], 0)))
    expected = torch.stack(terms).mean()
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)
    # gamma = 0: plain cross-entropy
    torch.testing.assert_close(eql_softmax_loss(z, t, freq, lambda_=1e-3, gamma=0.0),
                               F.cross_entropy(z, t))


def test_eql_softmax_background_rows_suppress_nothing():
    z = torch.randn(4, 4, dtype=torch.float64)
    t = torch.tensor([3, 3, 0, 3])  # 3 = background with C = 3
    freq = torch.tensor([0.5, 1e-5, 1e-5])
    loss = eql_softmax_loss(z, t, freq, lambda_=1e-3, gamma=1.0, background=True,
                            reduction="none")
    full = F.cross_entropy(z, t, reduction="none")
    torch.testing.assert_close(loss[[0, 1, 3]], full[[0, 1, 3]])
    assert loss[2] < full[2]


def test_seesaw_without_mitigation_and_compensation_is_two_cross_entropies():
    c = 4
    z = torch.randn(10, c + 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 4, 2, 4, 3, 0, 4, 1, 2])
    loss = seesaw_loss(z, t, torch.tensor([50, 20, 5, 1]), p=0.0, q=0.0)
    fg = t < c
    z2 = _clone(z)
    expected = (F.cross_entropy(z2[fg, :c], t[fg], reduction="sum")
                + F.cross_entropy(z2[:, c:], (t == c).long(), reduction="sum")) / 10
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)


def test_softmax_bad_inputs():
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        softmax_eql_loss(torch.randn(2, 3), torch.tensor([0, 3]), torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        softmax_eql_loss(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long),
                         torch.zeros(3))
    with pytest.raises(ValueError, match="floating"):
        softmax_eql_loss(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]),
                         torch.zeros(3))


@pytest.mark.parametrize("batch", [2, 20])
def test_statistics_weighting_of_ignored_pixels(batch):
    from eqlosses.functional._common import weighted_sum_except_dim1

    x = torch.rand(batch, 3, 4, 5, dtype=torch.float64)
    w = (torch.rand(batch, 4, 5) > 0.3).double()
    expected = torch.einsum("nchw,nhw->c", x, w)
    torch.testing.assert_close(weighted_sum_except_dim1(x, w), expected)
