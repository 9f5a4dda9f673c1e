"""Per-class gradient statistics of the plain losses, in closed form from detached logits.

The gradient-driven losses (Softmax-EQL, Sigmoid-EQL, EFL) accumulate, at every training
step, the magnitudes of the gradient of the *reduced* loss with respect to the logits, split
by whether the entry is the target of its row:

    pos_j = sum over rows n with target j           of |d loss / d z_nj|
    neg_j = sum over rows n with a target other than j of |d loss / d z_nj|

(ignored rows count nowhere; a background row, target ``C``, is a negative for every class).
The functions below compute the same two ``[K]`` vectors for the plain losses, one per logit
column ``K``, without autograd: they read the closed-form gradient off the same kernels the
losses use, so a loss built with ``track_statistics=True`` and these functions agree exactly.

* :func:`cross_entropy_gradients`: ``CE(z + a, y)``; ``d/dz_nj = (softmax(z + a)_nj - y_nj)
  * s`` with ``s = 1 / (valid rows)`` for ``"mean"`` and 1 otherwise, so ``pos_j = s sum_{y_n
  = j} (1 - p_nj)`` and ``neg_j = s sum_{y_n != j} p_nj`` (``a = 0``: cross-entropy; ``a = tau
  log prior``: balanced softmax / logit adjustment).
* :func:`bce_gradients`: sigmoid BCE, ``d/dz_nj = (sigmoid(z_nj) - y_nj) * s``.
* :func:`focal_gradients`: sigmoid focal loss, ``s = 1 / normalizer``.

Nothing is read on the host with ``validate=False`` (the target range is then not checked).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ._common import check_logits, check_reduction, check_targets, check_tensor
from .focal import _check_focal_inputs, _focal
from .sigmoid import _weighted_bce
from .soft_targets import _soft_adjusted_cross_entropy, check_probability_targets
from .softmax import _adjusted_cross_entropy, _check_softmax_inputs

__all__ = ["GradientIncrements", "cross_entropy_gradients", "bce_gradients", "focal_gradients"]


class GradientIncrements(NamedTuple):
    """One step's per-column gradient magnitudes ``[K]`` of the reduced loss (detached).

    Hand them to :meth:`eqlosses.GradientStatistics.update` (after dropping background
    columns, if any)."""

    pos: torch.Tensor
    neg: torch.Tensor


def _scaled(pos: torch.Tensor, neg: torch.Tensor, scale) -> GradientIncrements:
    return GradientIncrements(pos * scale, neg * scale)


def cross_entropy_gradients(logits: torch.Tensor, targets: torch.Tensor,
                            adjustment: Optional[torch.Tensor] = None,
                            ignore_index: int = -100, reduction: str = "mean", *,
                            validate: bool = True) -> GradientIncrements:
    """Positive / negative gradient magnitudes of ``CE(z + a, y)`` per logit column.

    Args:
        logits: ``[N, K]`` or ``[N, K, *]`` (e.g. per-pixel ``[B, K, H, W]``).
        targets: ``[N]`` or ``[N, *]`` integer classes in ``[0, K)`` or ``ignore_index``,
            or probability targets with the logits' shape (rows summing to 1; the statistics
            are then the ``q``-weighted mixture of the one-hot rows',
            :mod:`eqlosses.functional.soft_targets`).
        adjustment: ``[K]`` additive logit offsets (constant), e.g. balanced softmax's
            ``log prior``; None for plain cross-entropy.
        reduction: the loss whose gradient is measured: ``"mean"`` over non-ignored rows
            (pixels), or ``"sum"`` (``"none"`` measures the sum too).
        validate: check the target values (host synchronisations).

    Example:
        >>> inc = cross_entropy_gradients(torch.zeros(2, 2), torch.tensor([0, 0]))
        >>> inc.pos, inc.neg  # each row: p = (1/2, 1/2), divided by the 2 rows
        (tensor([0.5000, 0.0000]), tensor([0.0000, 0.5000]))
    """
    check_tensor(logits)
    channels = logits.shape[1] if logits.dim() >= 2 else -1
    if adjustment is not None:
        adjustment = torch.as_tensor(adjustment).to(logits.device)
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        check_reduction(reduction)
        check_logits(logits, channels, "cross-entropy", spatial=True)
        check_probability_targets(targets, logits, "cross-entropy", validate)
        soft = _soft_adjusted_cross_entropy(logits.detach(), targets, adjustment, reduction,
                                            want_stats=True)
        return _scaled(soft.pos_inc, soft.neg_inc, soft.scale)
    targets, all_valid = _check_softmax_inputs(logits, targets, channels, "cross-entropy",
                                               ignore_index, reduction, validate)
    res = _adjusted_cross_entropy(logits.detach(), targets, adjustment, ignore_index,
                                  reduction, want_stats=True, all_valid=all_valid)
    return _scaled(res.pos_inc, res.neg_inc, res.scale)


def bce_gradients(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", *, validate: bool = True) -> GradientIncrements:
    """Positive / negative gradient magnitudes of sigmoid BCE per logit column.

    ``logits [N, K]``, ``targets [N]`` in ``[0, K]`` (``K``: a background row, negative for
    every column) or ``ignore_index``; ``"mean"`` divides by the non-ignored rows.

    Example:
        >>> inc = bce_gradients(torch.zeros(2, 2), torch.tensor([0, 2]))
        >>> inc.pos, inc.neg  # |sigmoid(0) - y| = 1/2 everywhere, divided by 2 rows
        (tensor([0.2500, 0.0000]), tensor([0.2500, 0.5000]))
    """
    check_reduction(reduction)
    check_tensor(logits)
    channels = logits.shape[1] if logits.dim() == 2 else -1
    check_logits(logits, channels, "BCE")
    targets, all_valid = check_targets(targets, logits, channels, ignore_index, "BCE",
                                       validate)
    ones = torch.ones(channels, device=logits.device)
    res = _weighted_bce(logits.detach(), targets, ones, ones, ignore_index, reduction,
                        want_stats=True, all_valid=all_valid)
    return _scaled(res.pos_inc, res.neg_inc, res.scale)


def focal_gradients(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0,
                    alpha: Optional[float] = 0.25,
                    normalizer: Union[None, float, torch.Tensor] = None,
                    ignore_index: int = -100, reduction: str = "mean", *,
                    validate: bool = True) -> GradientIncrements:
    """Positive / negative gradient magnitudes of the sigmoid focal loss per logit column.

    Same conventions as :func:`eqlosses.functional.focal_loss` (``"mean"`` divides by
    ``normalizer``, by default the number of positive rows, at least 1).

    Example:
        >>> inc = focal_gradients(torch.zeros(1, 2), torch.tensor([0]), alpha=None)
        >>> inc.pos, inc.neg  # (1/2)^2 (1/2 + 2 (1/2) log 2) for either entry at p = 1/2
        (tensor([0.2983, 0.0000]), tensor([0.0000, 0.2983]))
    """
    (targets, all_valid), _ = _check_focal_inputs(logits, targets, None, "the focal loss",
                                                  ignore_index, reduction, validate)
    c = logits.shape[1]
    g = torch.full((c,), float(gamma), device=logits.device)
    res = _focal(logits.detach(), targets, g, torch.ones_like(g), alpha, None, normalizer,
                 ignore_index, reduction, want_stats=True, all_valid=all_valid)
    return _scaled(res.pos_inc, res.neg_inc, res.scale)
