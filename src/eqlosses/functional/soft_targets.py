"""Probability targets for the softmax losses: soft cross-entropy on adjusted logits.

Mixup, CutMix and label smoothing (timm's, for instance) give each row a probability vector
``q_n`` over the classes instead of one class. The softmax losses of the package
(cross-entropy, balanced softmax, Softmax-EQL) accept such ``[N, C]`` (or ``[N, C, *]``)
float targets, whose entries are non-negative and sum to 1 over the classes:

    loss_n = - sum_j q_nj log softmax(z_n + a)_j          d loss_n / d z_nj = p~_nj - q_nj

with ``a`` the loss's additive adjustment (0, ``tau log prior`` or Softmax-EQL's margins) and
``p~ = softmax(z + a)``. Because the loss is linear in ``q``, a soft row is the ``q``-weighted
mixture of the one-hot rows of each class, and its gradient statistics are defined as the same
mixture of theirs:

    pos_inc_j = sum_n q_nj (1 - p~_nj)          neg_inc_j = sum_n (1 - q_nj) p~_nj

(divided by the number of rows for ``reduction="mean"``). For a one-hot ``q`` these are the
statistics of the integer label, so one-hot probability targets give the loss, gradient and
statistics of integer targets (to rounding). For a soft row, ``pos_inc_j + neg_inc_j`` is at
least ``|p~_nj - q_nj|``: the mixture counts the push up from the row's share of class ``j``
and the push down from its share of the other classes separately, as they would be counted
were the mixed samples in the batch one by one. There is no ``ignore_index`` for
probability targets: every row counts.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ._common import adjusted_logits, needs_grad, reduce_loss, scale_of, sum_except_dim1

__all__ = ["is_probability_target", "is_float_target", "check_probability_targets"]


class SoftResult(NamedTuple):
    loss: torch.Tensor
    pos_inc: Optional[torch.Tensor]  # [C] q-weighted magnitudes, before the reduction's scale
    neg_inc: Optional[torch.Tensor]
    scale: Union[float, torch.Tensor]  # 1 / rows (mean) or 1
    grad: Optional[torch.Tensor]


def is_probability_target(targets: object, logits: torch.Tensor) -> bool:
    """True for a floating-point tensor with the logits' shape (``[N, C]`` / ``[N, C, *]``):
    probability targets rather than class indices.

    >>> is_probability_target(torch.tensor([[0.9, 0.1]]), torch.zeros(1, 2))
    True
    >>> is_probability_target(torch.tensor([0]), torch.zeros(1, 2))
    False
    """
    return (isinstance(targets, torch.Tensor) and targets.is_floating_point()
            and isinstance(logits, torch.Tensor) and logits.dim() >= 2
            and tuple(targets.shape) == tuple(logits.shape))


def is_float_target(targets: object) -> bool:
    """True for a floating-point tensor: targets to be read as probabilities (and checked
    with :func:`check_probability_targets`) rather than as class indices."""
    return isinstance(targets, torch.Tensor) and targets.is_floating_point()


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def check_probability_targets(targets: torch.Tensor, logits: torch.Tensor, what: str,
                              validate: bool = True) -> torch.Tensor:
    """Check ``[N, C, *]`` probability targets: the logits' shape and device always; with
    ``validate`` (one host synchronisation) that they are finite, non-negative and sum to 1
    over dim 1 (within 1e-4; 1e-2 for half precision). A ``ValueError`` says what is wrong.

    >>> check_probability_targets(torch.tensor([[0.5, 0.6]]), torch.zeros(1, 2), "CE")
    Traceback (most recent call last):
    ...
    ValueError: CE: probability targets must sum to 1 over the classes (dim 1), found a row summing to 1.1 (row 0); give class indices, or normalise the rows
    """
    if not isinstance(targets, torch.Tensor) or not targets.is_floating_point():
        raise ValueError(f"{what}: probability targets must be a float tensor, got "
                         f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(f"{what}: float targets (dtype {targets.dtype}) are probability "
                         f"targets and must have the logits' shape {tuple(logits.shape)} (one "
                         f"probability per class, dim 1), got shape {tuple(targets.shape)}; "
                         f"give class indices as an integer (int64) tensor")
    if targets.device != logits.device:
        raise ValueError(f"{what}: targets are on {targets.device} but logits are on "
                         f"{logits.device}; move both to the same device")
    if not validate or not targets.numel():
        return targets
    q = targets.detach()
    sums = q.sum(dim=1, dtype=torch.float64)
    off = (sums - 1).abs()
    negative, not_finite, worst = torch.stack([
        (q < 0).any().to(torch.float64), (~torch.isfinite(q)).any().to(torch.float64),
        off.nan_to_num(nan=float("inf")).max()]).tolist()  # the one host sync
    if not_finite:
        raise ValueError(f"{what}: probability targets must be finite, found NaN or inf")
    if negative:
        index = (q < 0).nonzero()[0].tolist()
        raise ValueError(f"{what}: probability targets must be >= 0, found {q[tuple(index)]:g} "
                         f"at {tuple(index)}")
    if worst > _tolerance(q.dtype):
        flat = off.reshape(-1)
        at = int(flat.argmax())
        row = (at,) if off.dim() == 1 else tuple(torch.unravel_index(torch.tensor(at),
                                                                     off.shape))
        row_text = row[0] if len(row) == 1 else tuple(int(i) for i in row)
        raise ValueError(f"{what}: probability targets must sum to 1 over the classes (dim 1), "
                         f"found a row summing to {float(sums.reshape(-1)[at]):.3g} (row "
                         f"{row_text}); give class indices, or normalise the rows")
    return targets


def _soft_adjusted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                 adjustment: Optional[torch.Tensor], reduction: str,
                                 want_stats: bool) -> SoftResult:
    """``-sum_j q_j log softmax(z + a)_j`` per row (pixel), its closed-form gradient
    ``softmax(z + a) - q`` and the mixture statistics; ``"mean"`` divides by the rows."""
    need_grad = needs_grad(logits)
    with torch.no_grad():
        z = adjusted_logits(logits, adjustment)
        dtype = z.dtype
        q = targets.detach().to(dtype)
        logp = torch.log_softmax(z, dim=1)
        del z
        # q log p with 0 log 0 = 0 (a class of probability 0 adds nothing, even where p = 0)
        elem = -torch.where(q > 0, q * logp, 0.0).sum(dim=1)
        prob = logp.exp_()
        pos_inc = neg_inc = None
        if want_stats:
            pos_inc = sum_except_dim1(q * (1 - prob))
            neg_inc = sum_except_dim1((1 - q) * prob)
        grad = prob.sub_(q) if need_grad else None
        normalizer = max(elem.numel(), 1)
    loss = reduce_loss(logits, elem, grad, reduction, normalizer)
    return SoftResult(loss, pos_inc, neg_inc, scale_of(reduction, normalizer), None)
