"""Focal-family losses for one-stage detection: focal loss, EFL and EQFL.

One kernel, :func:`_focal`, computes the loss and its gradient together in closed form, in a
numerically stable form (``log sigmoid`` through ``softplus``: finite at logits of +-100 in
float32, where the reference's ``-log(sigmoid(z))`` overflows to inf).

Conventions: logits ``[N, C]`` (no background column); targets ``[N]`` in ``[0, C]`` with ``C``
= background (a negative for every class); rows with ``ignore_index`` count nowhere. The
default reduction ``"mean"`` is ``sum / normalizer``, where ``normalizer`` defaults to the
number of positive rows (at least 1); pass the positives averaged over processes when training
with several (see :func:`eqlosses.distributed.mean_across_processes`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .sigmoid import _num_classes
from ._common import (check_class_vector, check_logits, check_normalizer, check_reduction,
                      check_targets, check_tensor, compute_dtype, gather_rows, needs_grad,
                      per_class_sum, reduce_loss, scale_of, scatter_rows)

__all__ = ["efl_gamma", "focal_loss", "equalized_focal_loss", "equalized_quality_focal_loss"]

Normalizer = Union[None, float, torch.Tensor]


class _Result(NamedTuple):
    loss: torch.Tensor
    pos_inc: Optional[torch.Tensor]  # [C] sum of |d loss_sum / dz| over positive entries
    neg_inc: Optional[torch.Tensor]
    scale: Union[float, torch.Tensor]  # 1 / normaliser (mean) or 1


def _focal(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: torch.Tensor,
    weight: torch.Tensor,
    alpha: Optional[float],
    quality: Optional[torch.Tensor],
    normalizer: Normalizer,
    ignore_index: int,
    reduction: str,
    want_stats: bool,
    all_valid: Optional[bool] = None,
) -> _Result:
    """sum over valid rows and classes of weight_j * FL_gamma_j(z, y), reduced.

    Negatives: ``(1 - alpha) p^g softplus(z)``; the target entry of a positive row:
    ``alpha (1 - p)^g softplus(-z)`` (focal) or ``BCE(z, q) |q - p|^g`` (quality focal, no
    alpha), all times ``weight_j``. ``gamma`` and ``weight`` are ``[C]`` constants.
    ``all_valid`` (from :func:`check_targets`): True skips the row mask; None (unknown) masks.
    Nothing is read on the host.
    """
    need_grad = needs_grad(logits)
    with torch.no_grad():
        dtype = compute_dtype(logits)
        z = logits.detach().to(dtype)
        n, c = z.shape
        gamma = gamma.to(dtype)
        valid = targets != ignore_index
        if not all_valid:  # ignored rows count nowhere, even non-finite ones
            z = z.masked_fill(~valid.unsqueeze(1), 0.0)
        has_pos = valid & (targets < c)
        col = targets.clamp(0, c - 1)
        neg_coef = weight.to(dtype) * (1.0 - alpha if alpha is not None else 1.0)

        # Negative part for every element; the target entries of positive rows are zeroed
        # here and overwritten with the positive formula below.
        sp = F.softplus(z)                    # -log(1 - p)
        mod = z - sp                          # log p
        p = mod.exp()
        mod.mul_(gamma).exp_().mul_(neg_coef)  # coef * p^g
        if not all_valid:
            mod.mul_(valid.to(dtype).unsqueeze(1))
        scatter_rows(mod, col, torch.where(has_pos, torch.zeros(n, dtype=dtype, device=z.device),
                                           gather_rows(mod, col)))
        elem = mod * sp

        # Positive entries, one per positive row.
        z_t = gather_rows(z, col)
        g_t, w_t = gamma[col], weight.to(dtype)[col]
        sp_t = F.softplus(z_t)                # -log(1 - p_t)
        lp_t = z_t - sp_t                     # log p_t
        p_t = lp_t.exp()
        if quality is None:
            coef = w_t * (alpha if alpha is not None else 1.0)
            mod_t = torch.exp(-g_t * sp_t)    # (1 - p)^g
            pos_loss = coef * mod_t * (-lp_t)
            pos_grad = coef * mod_t * (g_t * p_t * lp_t - (1 - p_t))
        else:
            q = quality.to(dtype)
            bce = sp_t - q * z_t
            d = p_t - q
            ad = d.abs()
            pos_loss = w_t * bce * ad.pow(g_t)
            pos_grad = w_t * torch.sign(d) * ad.pow(g_t - 1) * (ad * ad + g_t * bce * p_t * (1 - p_t))
        scatter_rows(elem, col, torch.where(has_pos, pos_loss, gather_rows(elem, col)))

        grad = pos_inc = neg_inc = None
        if want_stats or need_grad:
            # d/dz [p^g softplus(z)] = p^g (p + g (1 - p) softplus(z)), computed in sp's storage
            grad = sp.addcmul_(sp, p, value=-1).mul_(gamma).add_(p).mul_(mod)
            del p
            if want_stats:
                neg_inc = grad.sum(0)  # target entries of positive rows are 0 here
                pos_inc = per_class_sum(pos_grad.abs(), col, has_pos, c)
            scatter_rows(grad, col, torch.where(has_pos, pos_grad, gather_rows(grad, col)))

        if normalizer is None:
            norm = has_pos.sum().clamp(min=1).to(dtype)
        else:
            if isinstance(normalizer, (int, float)) and not normalizer > 0:
                raise ValueError(f"normalizer must be > 0, got {normalizer}")
            norm = torch.as_tensor(normalizer, dtype=dtype, device=z.device).detach()
            if norm.numel() != 1:
                raise ValueError(f"normalizer must be a scalar, got shape {tuple(norm.shape)}")
            norm = norm.reshape(())
    loss = reduce_loss(logits, elem, grad if need_grad else None, reduction, norm)
    return _Result(loss, pos_inc, neg_inc, scale_of(reduction, norm))


def efl_gamma(ratio: torch.Tensor, focal_gamma: float = 2.0, scale_factor: float = 8.0
              ) -> torch.Tensor:
    """EFL's per-class focusing factor ``gamma_j = gamma_b + s (1 - clamp(g_j, 0, 1))``.

    >>> efl_gamma(torch.tensor([1.0, 0.5, 0.0]))
    tensor([ 2.,  6., 10.])
    """
    return focal_gamma + scale_factor * (1 - ratio.clamp(0, 1))


def _check_focal_inputs(logits, targets, ratio, what, ignore_index, reduction, validate=True):
    check_reduction(reduction)
    check_tensor(logits)
    if ratio is not None:
        num_classes = _num_classes(ratio)
    else:
        num_classes = logits.shape[1] if logits.dim() == 2 else -1
    check_logits(logits, num_classes, what)
    targets = check_targets(targets, logits, num_classes, ignore_index, what, validate)
    if ratio is not None:
        ratio = check_class_vector(ratio, num_classes, "ratio", logits.device)
    return targets, ratio


def _equalized_focal(logits, targets, ratio, focal_gamma, scale_factor, alpha, quality,
                     normalizer, ignore_index, reduction, want_stats, validate=True) -> _Result:
    what = "EQFL" if quality is not None else "EFL"
    check_normalizer(normalizer, validate)
    if not focal_gamma > 0:
        raise ValueError(f"focal_gamma must be > 0 (it divides the weighting factor), got "
                         f"{focal_gamma}")
    (targets, all_valid), ratio = _check_focal_inputs(logits, targets, ratio, what,
                                                      ignore_index, reduction, validate)
    if quality is not None:
        check_tensor(quality, "quality")
        if quality.shape != targets.shape or not quality.is_floating_point():
            raise ValueError(f"quality must be a float tensor of shape {tuple(targets.shape)}, "
                             f"got {quality.dtype} {tuple(quality.shape)}")
        if quality.device != logits.device:
            raise ValueError(f"quality is on {quality.device} but logits are on {logits.device}")
    gamma = efl_gamma(ratio.to(compute_dtype(logits)), focal_gamma, scale_factor)
    return _focal(logits, targets, gamma, gamma / focal_gamma, alpha, quality, normalizer,
                  ignore_index, reduction, want_stats, all_valid)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: Optional[float] = 0.25,
    normalizer: Normalizer = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al., 2017) with the detection conventions of this module.

        loss = sum_nj alpha_t (1 - p_t)^gamma (-log p_t) / normalizer

    ``alpha=None`` disables the alpha weighting. Logits ``[N, C]``, targets ``[N]`` in
    ``[0, C]`` (``C`` = background) or ``ignore_index``. ``validate=False`` skips the check
    of the target values (the only host synchronisation).

    >>> focal_loss(torch.zeros(1, 2), torch.tensor([0]))
    tensor(0.1733)
    """
    (targets, all_valid), _ = _check_focal_inputs(logits, targets, None, "the focal loss",
                                                  ignore_index, reduction, validate)
    c = logits.shape[1]
    g = torch.full((c,), float(gamma), device=logits.device)
    return _focal(logits, targets, g, torch.ones_like(g), alpha, None, normalizer, ignore_index,
                  reduction, want_stats=False, all_valid=all_valid).loss


def equalized_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ratio: torch.Tensor,
    focal_gamma: float = 2.0,
    scale_factor: float = 8.0,
    alpha: Optional[float] = 0.25,
    normalizer: Normalizer = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Equalized Focal Loss for a given gradient ratio; the stateless twin of the module.

        gamma_j = gamma_b + s (1 - clamp(g_j, 0, 1))
        loss = sum_nj alpha_t (gamma_j / gamma_b) (1 - p_t)^gamma_j (-log p_t) / normalizer

    Tan et al., "Equalized Focal Loss for Dense Long-Tailed Object Detection", CVPR 2022.

    Args:
        logits: ``[N, C]``; targets ``[N]`` in ``[0, C]`` (``C`` = background) or ignore.
        ratio: ``[C]`` accumulated gradient ratio (1 for every class gives the focal loss).
        normalizer: defaults to the number of positive rows (at least 1).
        validate: check the target values (a host synchronisation); ``False`` reads nothing
            on the host (shapes, dtypes and devices are always checked).

    >>> equalized_focal_loss(torch.zeros(1, 2), torch.tensor([0]), ratio=torch.ones(2))
    tensor(0.1733)
    """
    return _equalized_focal(logits, targets, ratio, focal_gamma, scale_factor, alpha, None,
                            normalizer, ignore_index, reduction, want_stats=False,
                            validate=validate).loss


def equalized_quality_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    quality: torch.Tensor,
    ratio: torch.Tensor,
    focal_gamma: float = 2.0,
    scale_factor: float = 8.0,
    normalizer: Normalizer = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Equalized Quality Focal Loss (EFL's mechanism on quality focal loss).

        negatives:                  BCE(z, 0) sigmoid(z)^gamma_j
        target entry of a positive: BCE(z, q) |q - sigmoid(z)|^gamma_j
        all times gamma_j / gamma_b, summed and divided by ``normalizer``

    Args:
        quality: ``[N]`` float quality target (e.g. IoU) of each row; read on positive rows.
        validate: check the target values (a host synchronisation); see
            :func:`equalized_focal_loss`.

    >>> equalized_quality_focal_loss(torch.zeros(1, 2), torch.tensor([0]),
    ...                              torch.tensor([1.0]), ratio=torch.ones(2))
    tensor(0.3466)
    """
    return _equalized_focal(logits, targets, ratio, focal_gamma, scale_factor, None, quality,
                            normalizer, ignore_index, reduction, want_stats=False,
                            validate=validate).loss
