"""Indicators and raw-logit gradient statistics of the Softmax-EQL variants."""

import pytest
import torch

from eqlosses.functional.softmax_eql_variants import eql_indicator, raw_softmax_increments


def _autograd_increments(logits, targets):
    """|d mean CE(z, y) / d z| split by positive / negative entries, from autograd."""
    z = logits.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(z, targets).backward()
    onehot = torch.nn.functional.one_hot(targets, z.shape[1]).bool()
    g = z.grad.abs()
    return (g * onehot).sum(0), (g * ~onehot).sum(0)


def test_raw_increments_are_the_plain_cross_entropy_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 6, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 6, (32,), generator=g)
    pos, neg = raw_softmax_increments(logits, targets)
    want_pos, want_neg = _autograd_increments(logits, targets)
    torch.testing.assert_close(pos, want_pos)
    torch.testing.assert_close(neg, want_neg)
    # a row's positive magnitude equals the sum of its negative ones (softmax rows sum to 1)
    torch.testing.assert_close(pos.sum(), neg.sum())


def test_raw_increments_skip_ignored_rows():
    logits = torch.randn(5, 3, dtype=torch.float64)
    targets = torch.tensor([0, -100, 2, 1, -100])
    pos, neg = raw_softmax_increments(logits, targets, ignore_index=-100)
    keep = targets != -100
    want_pos, want_neg = _autograd_increments(logits[keep], targets[keep])
    torch.testing.assert_close(pos, want_pos)
    torch.testing.assert_close(neg, want_neg)


def test_indicators():
    pos, neg = torch.tensor([3.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 0.0])
    assert eql_indicator(pos, neg, "pos") is pos and eql_indicator(pos, neg, "neg") is neg
    assert eql_indicator(pos, neg, "ratio").tolist() == [3.0, 0.25, 0.0]
    with pytest.raises(ValueError, match="pos, neg, ratio"):
        eql_indicator(pos, neg, "both")
