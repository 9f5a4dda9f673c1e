import pytest
import torch
import torch.nn.functional as F

from eqlosses.functional import (eql_loss, federated_loss, sample_federated_classes,
                                 sigmoid_eql_loss, sigmoid_eql_weights)
from tests import reference as ref


def _inputs(n=9, c=4, ignore=True, dtype=torch.float64):
    z = (torch.randn(n, c + 1, dtype=dtype) * 3).requires_grad_()
    t = torch.randint(0, c + 1, (n,))
    if ignore:
        t[1] = -100
    return z, t


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore", [False, True])
def test_sigmoid_eql_matches_reference(reduction, ignore):
    z, t = _inputs(ignore=ignore)
    ratio = torch.tensor([0.0, 0.5, 0.9, 3.0], dtype=torch.float64)
    loss = sigmoid_eql_loss(z, t, ratio, reduction=reduction)
    z2 = z.detach().clone().requires_grad_()
    expected = ref.sigmoid_eql(z2, t, ratio)
    if reduction == "sum":
        expected = expected * (t != -100).sum()
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)


def test_sigmoid_eql_none_reduction_is_elementwise():
    z, t = _inputs()
    ratio = torch.rand(4, dtype=torch.float64)
    elem = sigmoid_eql_loss(z, t, ratio, reduction="none")
    assert elem.shape == z.shape
    assert (elem[1] == 0).all()  # ignored row
    torch.testing.assert_close(elem.sum(), sigmoid_eql_loss(z, t, ratio, reduction="sum"))
    # gradient of a weighted sum of elements
    w = torch.rand_like(elem)
    (elem * w).sum().backward()
    z2 = z.detach().clone().requires_grad_()
    r, q = sigmoid_eql_weights(ratio)[1], sigmoid_eql_weights(ratio)[0]
    y = torch.zeros_like(z2)
    valid = t != -100
    y[valid.nonzero().squeeze(1), t[valid]] = 1
    cw = torch.cat([q, q.new_ones(1)]) * y + torch.cat([r, r.new_ones(1)]) * (1 - y)
    dense = F.binary_cross_entropy_with_logits(z2, y, reduction="none") * cw * valid[:, None]
    (dense * w).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_sigmoid_eql_with_unit_weights_is_bce():
    z, t = _inputs(n=16, c=6, ignore=False)
    loss = sigmoid_eql_loss(z, t, torch.full((6,), 100.0, dtype=torch.float64))
    z2 = z.detach().clone().requires_grad_()
    bce = F.binary_cross_entropy_with_logits(z2, F.one_hot(t, 7).double(), reduction="sum") / 16
    loss.backward()
    bce.backward()
    torch.testing.assert_close(loss, bce)
    torch.testing.assert_close(z.grad, z2.grad)


def test_sigmoid_eql_gradcheck():
    z, t = _inputs(n=6, c=3)
    ratio = torch.tensor([0.1, 0.7, 1.2], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: sigmoid_eql_loss(x, t, ratio), (z,))
    assert torch.autograd.gradcheck(lambda x: sigmoid_eql_loss(x, t, ratio, reduction="none"),
                                    (z,))


def test_sigmoid_eql_stable_at_extreme_logits():
    z = torch.tensor([[100.0, -100.0, 100.0], [-100.0, 100.0, -100.0]], requires_grad=True)
    t = torch.tensor([0, 2])
    loss = sigmoid_eql_loss(z, t, torch.zeros(2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    z64 = z.detach().double().requires_grad_()
    ref64 = sigmoid_eql_loss(z64, t, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(loss.double(), ref64, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype):
    z, t = _inputs(dtype=torch.float32, ignore=False)
    zh = z.detach().to(dtype).requires_grad_()
    loss = sigmoid_eql_loss(zh, t, torch.rand(4))
    loss.backward()
    assert loss.dtype == torch.float32 and zh.grad.dtype == dtype
    expected = sigmoid_eql_loss(zh.detach().float(), t, torch.rand(4) * 0 + 0.5)
    assert torch.isfinite(expected)


def test_eql_matches_formula():
    c = 5
    z = torch.randn(12, c, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, 5, 5, 4, 3, 0, -100, 5])
    freq = torch.tensor([0.5, 0.1, 0.001, 0.0005, 0.00001], dtype=torch.float64)
    loss = eql_loss(z, t, freq, lambda_=0.0011)
    # w_nj = 1 - E_n T_j (1 - y_nj)
    z2 = z.detach().clone().requires_grad_()
    total = 0.0
    for i in range(12):
        if t[i] == -100:
            continue
        for j in range(c):
            y = float(t[i] == j)
            e = float(t[i] < c)
            tail = float(freq[j] < 0.0011)
            w = 1 - e * tail * (1 - y)
            total = total + w * F.binary_cross_entropy_with_logits(z2[i, j], torch.tensor(y).double())
    expected = total / 11
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)


def test_federated_loss_trains_only_masked_classes():
    z = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, 2, 6, 2, 1, 6, 0])
    mask = torch.tensor([True, True, True, False, False, True])
    loss = federated_loss(z, t, mask)
    loss.backward()
    z2 = z.detach().clone().requires_grad_()
    y = F.one_hot(t, 7)[:, :6].double()
    expected = (F.binary_cross_entropy_with_logits(z2, y, reduction="none") * mask).sum() / 8
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z.grad, z2.grad)
    assert (z.grad[:, ~mask] == 0).all()


def test_sample_federated_classes():
    weight = torch.tensor([100.0, 50.0, 10.0, 1.0, 0.0, 5.0]) ** 0.5
    t = torch.tensor([3, 6, 3, 6])  # class 3 present, 6 = background
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = sample_federated_classes(t, weight, num_sampled=3, generator=g)
        assert mask[3] and int(mask.sum()) == 3 and not mask[4]  # zero weight never drawn
    # more classes asked for than can be drawn: all with positive weight, no error
    mask = sample_federated_classes(t, weight, num_sampled=50, generator=g)
    assert mask.tolist() == [True, True, True, True, False, True]
    # frequent classes are drawn more often
    hits = torch.zeros(6)
    for _ in range(300):
        hits += sample_federated_classes(torch.tensor([6]), weight, num_sampled=1, generator=g)
    assert hits[0] > hits[2] > hits[3]


def test_bad_inputs_raise_clear_errors():
    z = torch.randn(4, 5)
    ratio = torch.ones(4)
    with pytest.raises(ValueError, match="channels"):
        sigmoid_eql_loss(torch.randn(4, 7), torch.zeros(4, dtype=torch.long), ratio)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        sigmoid_eql_loss(z, torch.tensor([0, 1, 5, 2]), ratio)
    with pytest.raises(ValueError, match="integer"):
        sigmoid_eql_loss(z, torch.zeros(4), ratio)
    with pytest.raises(ValueError, match="shape"):
        sigmoid_eql_loss(z, torch.zeros(3, dtype=torch.long), ratio)
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_eql_loss(z, torch.zeros(4, dtype=torch.long), ratio, reduction="avg")
    with pytest.raises(ValueError, match="expects 4"):  # C = 3 from the ratio: 3 + 1 columns
        sigmoid_eql_loss(z, torch.zeros(4, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="device"):
        sigmoid_eql_loss(z, torch.zeros(4, dtype=torch.long, device="meta"), ratio)
