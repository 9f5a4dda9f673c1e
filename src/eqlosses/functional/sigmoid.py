"""Sigmoid (binary cross-entropy) losses: Sigmoid-EQL (EQL v2), EQL v1 and the federated loss.

All share one kernel, :func:`_weighted_bce`: binary cross-entropy over ``K`` logit columns with a
positive weight per column and a negative weight per column (or per element), with the loss and
its gradient computed together in closed form and the gradient statistics read off the same
tensors. Targets are class indices; a target equal to ``K`` (background without a column of its
own) makes the row a negative for every column.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from ._common import (check_class_vector, check_logits, check_reduction, check_targets,
                      compute_dtype, gather_rows, needs_grad, per_class_sum, reduce_loss,
                      scale_of, scatter_rows)

__all__ = ["sigmoid_eql_weights", "sigmoid_eql_loss", "eql_weights", "eql_loss",
           "federated_loss", "sample_federated_classes"]


class _Result(NamedTuple):
    loss: torch.Tensor
    pos_inc: Optional[torch.Tensor]   # [K] sum of |dL/dz| over positive entries (unreduced loss)
    neg_inc: Optional[torch.Tensor]   # [K] same over negative entries
    scale: Union[float, torch.Tensor]  # 1 / normaliser applied to the reduced loss


def _weighted_bce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    pos_weight: torch.Tensor,
    neg_weight: torch.Tensor,
    ignore_index: int,
    reduction: str,
    want_stats: bool,
    all_valid: Optional[bool] = None,
) -> _Result:
    """sum_nj [pos_weight_j y_nj + neg_weight_(n)j (1 - y_nj)] * BCE(z_nj, y_nj), reduced.

    ``logits [N, K]``, ``targets [N]`` in ``[0, K]`` or ``ignore_index`` (``K`` = no positive
    column), ``pos_weight [K]``, ``neg_weight [K]`` or ``[N, K]``. ``"mean"`` divides by the
    number of non-ignored rows. The statistics are the unreduced magnitudes
    ``|sigmoid(z) - y| * w`` summed per column over positive and over negative entries.
    ``all_valid`` (from :func:`check_targets`): True when no row is ignored. Otherwise (False,
    or None: unknown) ignored rows are weighted by 0 where they are summed (row losses,
    statistics, the gradient's per-row factor in backward) rather than masked element by
    element. Nothing is read on the host.
    """
    need_grad = needs_grad(logits)
    with torch.no_grad():
        dtype = compute_dtype(logits)
        z = logits.detach().to(dtype)
        n, k = z.shape
        valid = targets != ignore_index
        has_pos = valid & (targets < k)
        col = targets.clamp(0, k - 1)
        pos_w = pos_weight.to(dtype)[col]
        neg_w = neg_weight.to(dtype)
        neg_w_t = neg_w[col] if neg_w.dim() == 1 else gather_rows(neg_w, col)
        row_weight = None if all_valid else valid.to(dtype)  # [N], 0 for ignored rows
        if row_weight is not None:  # ignored rows count nowhere, even non-finite ones
            z = z.masked_fill(~valid.unsqueeze(1), 0.0)

        z_t = gather_rows(z, col)
        # Negative part for every element: softplus(z) = BCE(z, 0); positives overwritten below.
        elem = F.softplus(z)
        sp_t = gather_rows(elem, col)
        elem.mul_(neg_w)
        pos_loss = pos_w * (sp_t - z_t)  # BCE(z, 1) = softplus(z) - z
        scatter_rows(elem, col, torch.where(has_pos, pos_loss, neg_w_t * sp_t))
        if row_weight is not None:
            if reduction == "none":
                elem.mul_(row_weight.unsqueeze(1))
            else:  # row losses [N]: one pass over the rows instead of a masked copy
                elem = elem.sum(1).mul_(row_weight)

        grad = pos_inc = neg_inc = None
        if want_stats or need_grad:
            grad = torch.sigmoid(z)
            p_t = gather_rows(grad, col)
            grad.mul_(neg_w)  # d BCE(z, 0) / dz = sigmoid(z), weighted
            grad_t = gather_rows(grad, col)
            if want_stats:
                scatter_rows(grad, col, torch.where(has_pos, torch.zeros_like(grad_t), grad_t))
                # every remaining entry of a valid row is a negative, all >= 0
                neg_inc = grad.sum(0) if row_weight is None else row_weight @ grad
                pos_inc = per_class_sum(pos_w * (1 - p_t), col, has_pos, k)
            scatter_rows(grad, col, torch.where(has_pos, pos_w * (p_t - 1), grad_t))

        normalizer = max(n, 1) if all_valid else valid.sum().clamp(min=1).to(dtype)
    loss = reduce_loss(logits, elem, grad if need_grad else None, reduction, normalizer,
                       row_weight=row_weight)
    return _Result(loss, pos_inc, neg_inc, scale_of(reduction, normalizer))


def _num_classes(per_class: torch.Tensor) -> int:
    """C from a per-class vector, which defines the class count of the functional losses."""
    shape = tuple(torch.as_tensor(per_class).shape)
    if len(shape) != 1:
        raise ValueError(f"per-class tensors must have shape [C], got {shape}")
    if shape[0] < 1:
        raise ValueError("per-class tensors must have at least one class (shape [C] with "
                         "C >= 1), got shape (0,)")
    return shape[0]


# --------------------------------------------------------------------------------------------
# Sigmoid-EQL (EQL v2)
# --------------------------------------------------------------------------------------------

def sigmoid_eql_weights(
    ratio: torch.Tensor, gamma: float = 12.0, mu: float = 0.8, alpha: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid-EQL's positive and negative class weights from the gradient ratio ``g``.

        r_j = f(g_j) = 1 / (1 + exp(-gamma (g_j - mu)))     (negative weight)
        q_j = 1 + alpha (1 - r_j)                             (positive weight)

    >>> pos_w, neg_w = sigmoid_eql_weights(torch.tensor([100.0, 0.0]))
    >>> neg_w
    tensor([1.0000e+00, 6.7724e-05])
    """
    neg_w = torch.sigmoid(gamma * (ratio - mu))
    pos_w = 1 + alpha * (1 - neg_w)
    return pos_w, neg_w


def _sigmoid_eql(logits, targets, ratio, num_classes, gamma, mu, alpha, ignore_index,
                 reduction, want_stats, objectness=True, validate=True) -> _Result:
    check_reduction(reduction)
    if objectness:
        check_logits(logits, num_classes + 1,
                     "Sigmoid-EQL (C foreground columns + 1 background)")
    else:
        check_logits(logits, num_classes, "Sigmoid-EQL without an objectness column")
    targets, all_valid = check_targets(targets, logits, num_classes, ignore_index,
                                       "Sigmoid-EQL", validate)
    ratio = check_class_vector(ratio, num_classes, "ratio", logits.device)
    pos_w, neg_w = sigmoid_eql_weights(ratio.to(compute_dtype(logits)), gamma, mu, alpha)
    if objectness:
        one = pos_w.new_ones(1)
        pos_w, neg_w = torch.cat([pos_w, one]), torch.cat([neg_w, one])
    res = _weighted_bce(logits, targets, pos_w, neg_w, ignore_index, reduction, want_stats,
                        all_valid)
    if want_stats:  # the background column is trained but never in the statistics
        res = res._replace(pos_inc=res.pos_inc[:num_classes], neg_inc=res.neg_inc[:num_classes])
    return res


def sigmoid_eql_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ratio: torch.Tensor,
    gamma: float = 12.0,
    mu: float = 0.8,
    alpha: float = 4.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    objectness: bool = True,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Sigmoid-EQL (EQL v2) for a given gradient ratio; the stateless twin of ``SigmoidEQLLoss``.

        loss = sum_nj [q_j y_nj + r_j (1 - y_nj)] * BCEWithLogits(z_nj, y_nj) / N

    with ``r, q = sigmoid_eql_weights(ratio)`` on the C foreground columns and weight 1 on the
    background (objectness) column. Tan et al., "Equalization Loss v2", CVPR 2021.

    Args:
        logits: ``[N, C + 1]``; column ``C`` is the background/objectness logit.
        targets: ``[N]`` int64 in ``[0, C]`` (``C`` = background) or ``ignore_index``.
        ratio: ``[C]`` accumulated gradient ratio ``g_j``.
        reduction: ``"mean"`` (sum / number of non-ignored rows), ``"sum"`` or ``"none"``.
        objectness: ``False`` for logits ``[N, C]`` without the background column
            (classification); target ``C`` then marks a row that is negative everywhere.
        validate: check the target values (host synchronisations); ``False`` reads nothing
            on the host (shape, dtype and device are always checked).

    >>> logits = torch.zeros(2, 3)
    >>> sigmoid_eql_loss(logits, torch.tensor([0, 2]), ratio=torch.full((2,), 100.0))
    tensor(2.0794)
    """
    return _sigmoid_eql(logits, targets, ratio, _num_classes(ratio), gamma, mu, alpha,
                        ignore_index, reduction, want_stats=False, objectness=objectness,
                        validate=validate).loss


# --------------------------------------------------------------------------------------------
# EQL v1
# --------------------------------------------------------------------------------------------

def eql_weights(targets: torch.Tensor, class_frequency: torch.Tensor, lambda_: float,
                num_classes: int) -> torch.Tensor:
    """EQL v1 negative weights ``w_nj = 1 - E_n T_j`` for non-target entries, ``[N, C]``.

    ``E_n = 1`` for foreground rows (target < C), ``T_j = 1`` when ``class_frequency_j <
    lambda_``. Positive entries always have weight 1.
    """
    tail = (class_frequency < lambda_).to(torch.float32)
    fg = (targets >= 0) & (targets < num_classes)
    return 1 - fg.to(torch.float32).unsqueeze(1) * tail.unsqueeze(0)


def eql_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_frequency: torch.Tensor,
    lambda_: float = 0.0011,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Equalization Loss v1 (sigmoid form); stateless, so ``EQLLoss`` is a thin wrapper.

        w_nj = 1 - E_n T_j (1 - y_nj),   loss = sum_nj w_nj BCE(z_nj, y_nj) / N

    ``E_n`` = row n is foreground, ``T_j`` = class j's image frequency is below ``lambda_``: the
    foreground rows stop suppressing rare classes. Tan et al., CVPR 2020.

    Args:
        logits: ``[N, C]`` (no background column).
        targets: ``[N]`` int64 in ``[0, C]`` (``C`` = background: all-zero target) or ignore.
        class_frequency: ``[C]`` fraction of training images containing each class.
        lambda_: frequency threshold (0.0011 for LVIS v1, 0.00177 for LVIS v0.5).
        validate: check the target values (host synchronisations); see ``sigmoid_eql_loss``.

    >>> eql_loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0.5, 1e-4]))
    tensor(0.6931)
    """
    check_reduction(reduction)
    num_classes = _num_classes(class_frequency)
    check_logits(logits, num_classes, "EQL")
    targets, all_valid = check_targets(targets, logits, num_classes, ignore_index, "EQL",
                                       validate)
    freq = check_class_vector(class_frequency, num_classes, "class_frequency", logits.device)
    neg_w = eql_weights(targets, freq, lambda_, num_classes)
    return _weighted_bce(logits, targets, torch.ones(num_classes, device=logits.device), neg_w,
                         ignore_index, reduction, want_stats=False, all_valid=all_valid).loss


# --------------------------------------------------------------------------------------------
# Federated loss
# --------------------------------------------------------------------------------------------

def sample_federated_classes(
    targets: torch.Tensor,
    sampling_weight: torch.Tensor,
    num_sampled: int = 50,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A ``[C]`` bool mask of the classes the federated loss trains on this step.

    Every foreground class present in ``targets`` is included; the remaining
    ``num_sampled - #present`` classes (if positive) are drawn without replacement with
    probability proportional to ``sampling_weight`` (by convention, the training image count of
    each class to the power 0.5). Zhou et al., "Probabilistic two-stage detection", 2021.

    The draw is Gumbel-top-k (the classes with the largest ``log w_j + Gumbel noise``), which
    samples exactly the distribution of successive draws without replacement, with fixed
    shapes and without reading anything on the host (no synchronisation; ``torch.compile``
    captures it in one graph when ``generator`` is None). Classes of weight 0 are never drawn.

    >>> sample_federated_classes(torch.tensor([1, 3]), torch.tensor([1.0, 0.0, 4.0]), 1)
    tensor([False,  True, False])
    """
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    targets = targets.long()  # any integer dtype (a uint8 index would be a mask)
    num_classes = sampling_weight.numel()
    fg = (targets >= 0) & (targets < num_classes)
    hits = torch.zeros(num_classes, dtype=torch.float32, device=targets.device)
    hits.index_add_(0, targets.clamp(0, num_classes - 1).reshape(-1),
                    fg.reshape(-1).to(torch.float32))
    present = hits > 0
    k = min(num_sampled, num_classes)
    weight = sampling_weight.detach().to(device=targets.device, dtype=torch.float32)
    eligible = (weight > 0) & ~present
    dev = generator.device if generator is not None else targets.device
    u = torch.rand(num_classes, generator=generator, device=dev).to(targets.device)
    gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))
    keys = torch.where(eligible, weight.log() + gumbel, float("-inf"))
    top = keys.topk(k).indices  # the k best keys, best first
    rank = torch.arange(k, device=targets.device)
    take = eligible[top] & (rank < num_sampled - present.sum())
    return present.scatter(0, top, take | present[top])


def federated_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_mask: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Sigmoid BCE restricted to the classes in ``class_mask`` (the federated loss).

        loss = sum_n sum_{j in S} BCE(z_nj, y_nj) / N

    Args:
        logits: ``[N, C]`` (no background column).
        targets: ``[N]`` int64 in ``[0, C]`` (``C`` = background) or ``ignore_index``.
        class_mask: ``[C]`` bool, see :func:`sample_federated_classes`.
        validate: check the target values (host synchronisations); see ``sigmoid_eql_loss``.

    >>> federated_loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([True, False]))
    tensor(0.6931)
    """
    check_reduction(reduction)
    num_classes = _num_classes(class_mask)
    check_logits(logits, num_classes, "the federated loss")
    targets, all_valid = check_targets(targets, logits, num_classes, ignore_index,
                                       "the federated loss", validate)
    w = check_class_vector(class_mask, num_classes, "class_mask", logits.device).to(torch.float32)
    return _weighted_bce(logits, targets, w, w, ignore_index, reduction, want_stats=False,
                         all_valid=all_valid).loss
