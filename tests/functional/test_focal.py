import pytest
import torch
import torch.nn.functional as F

from eqlosses.functional import (efl_gamma, equalized_focal_loss, equalized_quality_focal_loss,
                                 focal_loss)
from tests import reference as ref


def _inputs(n=10, c=4, dtype=torch.float64):
    z = (torch.randn(n, c, dtype=dtype) * 2).requires_grad_()
    t = torch.tensor([0, 4, 1, 4, 2, -100, 3, 4, 0, 4])[:n]
    return z, t


def _clone(z):
    return z.detach().clone().requires_grad_()


@pytest.mark.parametrize("normalizer", [None, 3.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_efl_matches_reference(normalizer, reduction):
    z, t = _inputs()
    ratio = torch.tensor([1.0, 0.6, 0.1, 0.0], dtype=torch.float64)
    loss = equalized_focal_loss(z, t, ratio, normalizer=normalizer, reduction=reduction)
    gamma = 2 + 8 * (1 - ratio)
    z2 = _clone(z)
    expected = ref.focal_family(z2, t, gamma, gamma / 2, alpha=0.25,
                                normalizer=normalizer if reduction == "mean" else 1.0)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)


def test_efl_ratio_is_clamped():
    torch.testing.assert_close(efl_gamma(torch.tensor([-1.0, 2.0, 0.25])),
                               torch.tensor([10.0, 2.0, 8.0]))


def test_efl_with_zero_scale_is_focal_loss():
    z, t = _inputs()
    ratio = torch.rand(4, dtype=torch.float64)
    loss = equalized_focal_loss(z, t, ratio, scale_factor=0.0)
    z2 = _clone(z)
    expected = ref.focal_family(z2, t, torch.full((4,), 2.0), torch.ones(4), alpha=0.25)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(loss, focal_loss(z, t))


def test_focal_loss_agrees_with_torchvision():
    tv = pytest.importorskip("torchvision")
    z, t = _inputs()
    valid = t != -100
    y = F.one_hot(t[valid], 5)[:, :4].double()
    z2 = _clone(z)
    expected = tv.ops.sigmoid_focal_loss(z2[valid], y, alpha=0.25, gamma=2.0, reduction="sum")
    expected = expected / (t[valid] < 4).sum()
    loss = focal_loss(z, t)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)


def test_focal_without_alpha():
    z, t = _inputs()
    loss = focal_loss(z, t, alpha=None, normalizer=1.0)
    expected = ref.focal_family(_clone(z), t, torch.full((4,), 2.0), torch.ones(4), alpha=None,
                                normalizer=1.0)
    torch.testing.assert_close(loss, expected)


def test_eqfl_matches_reference():
    z, t = _inputs()
    quality = torch.rand(10, dtype=torch.float64) * 0.7 + 0.25
    ratio = torch.tensor([1.0, 0.3, 0.0, 0.8], dtype=torch.float64)
    loss = equalized_quality_focal_loss(z, t, quality, ratio, scale_factor=4.0, normalizer=2.0)
    gamma = 2 + 4 * (1 - ratio)
    z2 = _clone(z)
    expected = ref.focal_family(z2, t, gamma, gamma / 2, alpha=None, quality=quality,
                                normalizer=2.0)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)


def test_gradcheck():
    z, t = _inputs(n=8, c=3)
    t = t.clamp(max=3)
    ratio = torch.tensor([0.9, 0.4, 0.0], dtype=torch.float64)
    q = torch.rand(8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: equalized_focal_loss(x, t, ratio), (z,))
    assert torch.autograd.gradcheck(
        lambda x: equalized_focal_loss(x, t, ratio, reduction="none"), (z,))
    assert torch.autograd.gradcheck(lambda x: equalized_quality_focal_loss(x, t, q, ratio), (z,))


@pytest.mark.parametrize("fn", ["efl", "eqfl"])
def test_stable_at_extreme_logits(fn):
    z = torch.tensor([[100.0, -100.0], [-100.0, 100.0], [100.0, 100.0]], requires_grad=True)
    t = torch.tensor([0, 0, 2])  # a confident wrong positive and confident negatives
    ratio = torch.tensor([0.5, 0.0])
    if fn == "efl":
        loss = equalized_focal_loss(z, t, ratio)
    else:
        loss = equalized_quality_focal_loss(z, t, torch.tensor([0.9, 0.9, 0.0]), ratio)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    z64 = z.detach().double()
    if fn == "efl":
        ref64 = equalized_focal_loss(z64, t, ratio.double())
    else:
        ref64 = equalized_quality_focal_loss(z64, t, torch.tensor([0.9, 0.9, 0.0]).double(),
                                             ratio.double())
    torch.testing.assert_close(loss.double(), ref64, rtol=1e-5, atol=1e-5)
    # the naive -log(sigmoid(z)) of the reference overflows here in float32
    assert torch.isinf(-torch.log(torch.sigmoid(torch.tensor(-104.0))))


def test_ignored_rows_count_nowhere():
    z, t = _inputs()
    ratio = torch.rand(4, dtype=torch.float64)
    elem = equalized_focal_loss(z, t, ratio, reduction="none")
    assert elem.shape == (10, 4) and (elem[5] == 0).all()
    elem.sum().backward()
    assert (z.grad[5] == 0).all()
    keep = t != -100
    torch.testing.assert_close(elem.sum(),
                               equalized_focal_loss(z[keep], t[keep], ratio, reduction="sum"))


def test_bad_quality_and_normalizer():
    z, t = _inputs()
    with pytest.raises(ValueError, match="quality"):
        equalized_quality_focal_loss(z, t, torch.rand(3), torch.ones(4))
    with pytest.raises(ValueError, match="normalizer"):
        equalized_focal_loss(z, t, torch.ones(4), normalizer=torch.ones(2))
