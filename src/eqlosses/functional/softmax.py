"""Softmax losses: Softmax-EQL, balanced softmax (logit adjustment), EQL v1's softmax form and
the Seesaw loss.

All are cross-entropy over additively adjusted logits, ``CE(z + a, y)``, with ``a`` constant
for autograd. One kernel, :func:`_adjusted_cross_entropy`, computes the loss and its gradient
``softmax(z + a) - y`` in closed form, for logits ``[N, C]`` or ``[N, C, *]`` (e.g. per-pixel
``[B, C, H, W]``), and reads the gradient statistics off the same softmax.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from . import fused
from .sigmoid import _num_classes
from .soft_targets import (_soft_adjusted_cross_entropy, check_probability_targets,
                           is_float_target)
from ._common import (adjusted_logits, check_class_vector, check_logits, check_normalizer,
                      check_reduction, check_targets, compute_dtype, gather_rows, needs_grad,
                      per_class_sum, reduce_loss, scale_of, sum_except_dim1,
                      weighted_sum_except_dim1)

__all__ = ["softmax_eql_adjustment", "softmax_eql_loss", "balanced_softmax_adjustment",
           "balanced_softmax_loss", "eql_softmax_loss", "seesaw_loss"]


#: p_t below this is treated as underflowed (the loss is then taken from logsumexp)
_TINY = {dt: torch.finfo(dt).tiny * 2 ** 20 for dt in (torch.float32, torch.float64)}


class _Result(NamedTuple):
    loss: torch.Tensor
    pos_inc: Optional[torch.Tensor]  # [C] sum of |d loss_sum / dz| over positive entries
    neg_inc: Optional[torch.Tensor]
    scale: Union[float, torch.Tensor]  # 1 / number of valid rows (mean) or 1
    grad: Optional[torch.Tensor]     # d loss_sum / dz, when asked for


def _adjusted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    adjustment: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    want_stats: bool,
    return_grad: bool = False,
    all_valid: Optional[bool] = None,
) -> _Result:
    """``CE(z + a, y)`` with ``a`` a ``[C]`` vector or a tensor broadcastable to ``z``.

    ``logits [N, C, *]``, ``targets [N, *]`` in ``[0, C)`` or ``ignore_index``. ``"mean"``
    divides by the number of non-ignored rows (pixels). ``"none"`` returns ``[N, *]``.
    ``all_valid`` (from :func:`check_targets`): a bool when validation read the targets; the
    kernel may then read one more value on the host (whether some ``p_t`` underflows, to skip
    the exact fallback). None: rows are masked and nothing is read on the host.
    With the fused CPU kernel enabled (:mod:`eqlosses.functional.fused`), the calls it serves
    go there instead.
    """
    need_grad = needs_grad(logits)
    kernel = fused.kernel_for(logits, adjustment, return_grad)
    if kernel is not None:
        z, t = logits.detach(), targets
        if z.dim() > 2:  # [N, C, *] as [N, C, P]: views, the logits being contiguous
            pixels = math.prod(z.shape[2:])
            z, t = z.view(z.shape[0], z.shape[1], pixels), t.reshape(t.shape[0], pixels)
        elem, grad, pos_inc, neg_inc, count = kernel.adjusted_cross_entropy(
            z, None if adjustment is None else adjustment.to(logits.dtype), t.contiguous(),
            ignore_index, reduction == "mean", want_stats, need_grad)
        elem = elem.view(targets.shape)
        grad = None if grad is None else grad.view(logits.shape)
        normalizer = max(targets.numel(), 1) if all_valid else count
        loss = reduce_loss(logits, elem, grad, reduction, normalizer, grad_reduced=True)
        return _Result(loss, pos_inc, neg_inc, scale_of(reduction, normalizer), None)
    # The op count matters as much as the passes over [N, C] here (each eager op costs a few
    # microseconds of dispatch): `valid` only when some row may be ignored, one unsqueezed
    # index for every gather and scatter, scalar scatters.
    valid = None if all_valid else targets != ignore_index
    col = targets if all_valid else targets.masked_fill(~valid, 0)
    index = col.unsqueeze(1)

    def prepared():
        """The adjusted logits, ignored rows zeroed (they count nowhere, even non-finite
        ones), and whether the buffer is this call's own."""
        z = adjusted_logits(logits, adjustment)
        owned = adjustment is not None or z.dtype != logits.dtype  # else a view of logits
        if valid is not None:
            invalid = ~valid.unsqueeze(1)
            z, owned = z.masked_fill_(invalid, 0.0) if owned else z.masked_fill(invalid, 0.0), True
        return z, owned

    with torch.no_grad():
        z, owned = prepared()
        dtype, c = z.dtype, z.shape[1]
        if z.dim() == 2:
            # Softmax is fastest on rows. It writes into this call's own buffer (the adjusted
            # logits) when there is one: one logits-sized buffer per step, not two, which also
            # spares the page faults of a freed pair the allocator hands back to the system.
            # The loss is -log p_t, except where p_t underflows (a margin of ~70 nats): there
            # it is logsumexp(z) - z_t, with logsumexp(z) = max z - log max p (both maxima are
            # at the same column, softmax being monotonic; max p >= 1/C), exact to rounding.
            # Without validation, max z and z_t are read before the softmax overwrites z; with
            # it, the host sees whether some p_t underflows and only then z is recomputed.
            sync_free = all_valid is None
            if sync_free:
                z_max, z_t = z.amax(dim=1), z.gather(1, index).squeeze(1)
            prob = torch.softmax(z, dim=1, out=z) if owned else torch.softmax(z, dim=1)
            p_t = prob.gather(1, index).squeeze(1)
            elem = -torch.log(p_t)
            tiny = _TINY[dtype]
            if sync_free or bool((p_t < tiny).any()):
                if not sync_free:
                    z = prepared()[0]
                    z_max, z_t = z.amax(dim=1), z.gather(1, index).squeeze(1)
                lse = z_max - torch.log(prob.amax(dim=1))
                elem = torch.where(p_t < tiny, lse - z_t, elem)
        else:  # [N, C, *]: log_softmax over dim 1 is much faster than softmax there
            prob = torch.log_softmax(z, dim=1, out=z) if owned else torch.log_softmax(z, dim=1)
            elem = -prob.gather(1, index).squeeze(1)
            prob = prob.exp_()
            p_t = torch.exp(-elem)  # cheaper than a second strided gather
        del z
        # Ignored rows: their entries of `prob` are left as they are and weighted by 0 wherever
        # they are read (loss, statistics, gradient), which saves a pass over the logits.
        row_weight = None if valid is None else valid.to(dtype)
        if row_weight is not None:
            elem.mul_(row_weight)

        grad = pos_inc = neg_inc = None
        if want_stats or need_grad or return_grad:
            grad = prob
            if want_stats:
                grad.scatter_(1, index, 0.0)
                if row_weight is None:
                    neg_inc = sum_except_dim1(grad)  # every remaining entry is a negative
                else:
                    neg_inc = weighted_sum_except_dim1(grad, row_weight)
                pos_inc = per_class_sum(1 - p_t, col, row_weight, c)
            grad.scatter_(1, index, (p_t - 1).unsqueeze(1))
            if row_weight is not None and return_grad:
                grad = grad * row_weight.unsqueeze(1)
        normalizer = max(targets.numel(), 1) if all_valid else valid.sum().clamp(min=1).to(dtype)
    loss = reduce_loss(logits, elem, grad if need_grad else None, reduction, normalizer,
                       row_weight=row_weight)
    return _Result(loss, pos_inc, neg_inc, scale_of(reduction, normalizer),
                   grad if return_grad else None)


def _check_softmax_inputs(logits, targets, num_classes, what, ignore_index, reduction,
                          validate=True):
    check_reduction(reduction)
    check_logits(logits, num_classes, what, spatial=True)
    return check_targets(targets, logits, num_classes - 1, ignore_index, what, validate)


def _soft_or_hard(logits, targets, num_classes, what, adjustment_of, ignore_index, reduction,
                  want_stats, validate):
    """``CE(z + a, targets)`` for class-index or probability targets (float targets of the
    logits' shape, :mod:`eqlosses.functional.soft_targets`); ``adjustment_of(device)`` gives
    ``a`` once the inputs are checked."""
    if is_float_target(targets):
        check_reduction(reduction)
        check_logits(logits, num_classes, what, spatial=True)
        check_probability_targets(targets, logits, what, validate)
        return _soft_adjusted_cross_entropy(logits, targets, adjustment_of(logits.device),
                                            reduction, want_stats)
    targets, all_valid = _check_softmax_inputs(logits, targets, num_classes, what,
                                               ignore_index, reduction, validate)
    return _adjusted_cross_entropy(logits, targets, adjustment_of(logits.device), ignore_index,
                                   reduction, want_stats, all_valid=all_valid)


# --------------------------------------------------------------------------------------------
# Softmax-EQL
# --------------------------------------------------------------------------------------------

def softmax_eql_adjustment(indicator: torch.Tensor, tau: float = 1.0, eps: float = 1e-4
                           ) -> torch.Tensor:
    """Softmax-EQL's per-class logit offset ``a_j = tau * log(max(I_j, eps))``.

    The paper's margin ``z~_nj = z_nj + tau log(max(I_j, eps) / max(I_{y_n}, eps))`` equals
    ``z_nj + a_j - a_{y_n}``; the row constant ``a_{y_n}`` cancels in the softmax, so
    cross-entropy over ``z + a`` is exactly the paper's loss, with the same gradient.

    >>> softmax_eql_adjustment(torch.tensor([0.0, 1.0]))
    tensor([-9.2103,  0.0000])
    """
    log_i = torch.log(indicator.clamp(min=eps))
    return log_i if tau == 1 else tau * log_i  # (one op fewer on the hot path; same bits)


def _softmax_eql(logits, targets, indicator, tau, eps, ignore_index, reduction, want_stats,
                 validate=True) -> _Result:
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it floors the indicator inside a log), got {eps}")
    num_classes = _num_classes(indicator)

    def adjustment(device):
        vector = check_class_vector(indicator, num_classes, "indicator", device)
        return softmax_eql_adjustment(vector.to(compute_dtype(logits)), tau, eps)

    return _soft_or_hard(logits, targets, num_classes, "Softmax-EQL", adjustment, ignore_index,
                         reduction, want_stats, validate)


def softmax_eql_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    indicator: torch.Tensor,
    tau: float = 1.0,
    eps: float = 1e-4,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Softmax-EQL for a given indicator; the stateless twin of ``SoftmaxEQLLoss``.

        z~_nj = z_nj + tau log(max(I_j, eps) / max(I_{y_n}, eps))  (j != y_n)
        loss = CrossEntropy(z~, y)

    ``I`` is the accumulated positive (indicator ``"pos"``) or negative gradient per class.
    With probability targets ``q`` (float, the logits' shape, rows summing to 1: mixup, label
    smoothing) the loss is the soft cross-entropy on the adjusted logits,
    ``-sum_j q_nj log softmax(z~_n)_j`` (:mod:`eqlosses.functional.soft_targets`); one-hot
    ``q`` equals integer targets.

    Args:
        logits: ``[N, C]`` or ``[N, C, *]`` (e.g. ``[B, C, H, W]``).
        targets: ``[N]`` or ``[N, *]`` int64 in ``[0, C)`` or ``ignore_index``; or
            probability targets of the logits' shape (non-negative, summing to 1 over dim 1;
            with ``validate`` a ``ValueError`` otherwise).
        indicator: ``[C]``.
        reduction: ``"mean"`` over non-ignored rows/pixels, ``"sum"`` or ``"none"``.
        validate: check the target values (host synchronisations); ``False`` reads nothing
            on the host (shapes, dtypes and devices are always checked).

    >>> softmax_eql_loss(torch.zeros(2, 4), torch.tensor([0, 3]), torch.zeros(4))
    tensor(1.3863)
    """
    return _softmax_eql(logits, targets, indicator, tau, eps, ignore_index, reduction,
                        want_stats=False, validate=validate).loss


# --------------------------------------------------------------------------------------------
# Balanced softmax / logit adjustment
# --------------------------------------------------------------------------------------------

def balanced_softmax_adjustment(class_counts: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``a_j = tau * log(prior_j)`` with ``prior = counts / sum(counts)``.

    Classes with no training sample are counted as one, so that their offset stays finite.

    >>> balanced_softmax_adjustment(torch.tensor([3, 1]))
    tensor([-0.2877, -1.3863])
    """
    counts = class_counts.to(torch.float64).clamp(min=1)
    return (tau * torch.log(counts / counts.sum())).to(torch.float32)


def balanced_softmax_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_counts: torch.Tensor,
    tau: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Balanced softmax (Ren et al., 2020) = logit-adjusted loss (Menon et al., 2021).

        loss = CrossEntropy(z + tau log(prior), y),  prior_j = n_j / sum_k n_k

    ``tau=0`` is plain cross-entropy. Predict with the raw logits. ``validate=False`` skips
    the check of the target values (see :func:`softmax_eql_loss`). Probability targets
    (float, the logits' shape, rows summing to 1) give the soft cross-entropy
    ``-sum_j q_nj log softmax(z + tau log prior)_nj``, as for :func:`softmax_eql_loss`.

    >>> balanced_softmax_loss(torch.zeros(1, 2), torch.tensor([1]), torch.tensor([3, 1]))
    tensor(1.3863)
    >>> balanced_softmax_loss(torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]), torch.tensor([3, 1]))
    tensor(1.3863)
    """
    num_classes = _num_classes(class_counts)

    def adjustment(device):
        counts = check_class_vector(class_counts, num_classes, "class_counts", device)
        return balanced_softmax_adjustment(counts, tau)

    return _soft_or_hard(logits, targets, num_classes, "balanced softmax", adjustment,
                         ignore_index, reduction, False, validate).loss


# --------------------------------------------------------------------------------------------
# EQL v1, softmax form
# --------------------------------------------------------------------------------------------

def eql_softmax_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_frequency: torch.Tensor,
    lambda_: float = 0.0011,
    gamma: float = 0.9,
    background: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    generator: Optional[torch.Generator] = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """EQL v1, softmax form: rare non-target classes dropped from the softmax denominator.

        w~_nk = 1 - beta_nk E_n T_k (1 - y_nk),   beta_nk ~ Bernoulli(gamma)
        loss = -log(exp(z_ny) / sum_k w~_nk exp(z_nk))

    ``T_k`` = class k's frequency is below ``lambda_``; ``E_n`` = row n is foreground. With
    ``background=True`` logits have ``C + 1`` columns and target ``C`` is background (whose rows
    suppress nothing); otherwise ``C`` columns and targets in ``[0, C)``. ``validate=False``
    skips the check of the target values (see :func:`softmax_eql_loss`); the draw of ``beta``
    reads nothing on the host either (``torch.compile`` captures it when ``generator`` is None).

    >>> g = torch.Generator().manual_seed(0)
    >>> eql_softmax_loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0.5, 1e-4]),
    ...                  gamma=1.0, generator=g)
    tensor(0.)
    """
    return _eql_softmax(logits, targets, class_frequency, lambda_, gamma, background,
                        ignore_index, reduction, generator, validate, want_stats=False).loss


def _eql_softmax(logits, targets, class_frequency, lambda_, gamma, background, ignore_index,
                 reduction, generator, validate, want_stats) -> _Result:
    """:func:`eql_softmax_loss`'s kernel; with ``want_stats`` also the statistics of its
    gradient (a dropped entry has probability 0, so it adds no negative gradient)."""
    c = _num_classes(class_frequency)
    channels = c + 1 if background else c
    targets, all_valid = _check_softmax_inputs(logits, targets, channels, "softmax EQL",
                                               ignore_index, reduction, validate)
    freq = check_class_vector(class_frequency, c, "class_frequency", logits.device)
    tail = freq < lambda_
    if background:
        tail = torch.cat([tail, tail.new_zeros(1)])
    fg = ((targets >= 0) & (targets < c)).unsqueeze(1)
    beta = torch.rand(logits.shape, generator=generator,
                      device=generator.device if generator is not None else logits.device)
    drop = (beta.to(logits.device) < gamma) & fg & tail.view((1, -1) + (1,) * (logits.dim() - 2))
    drop.scatter_(1, targets.masked_fill(targets == ignore_index, 0).unsqueeze(1), False)
    a = torch.zeros(logits.shape, dtype=compute_dtype(logits), device=logits.device)
    a.masked_fill_(drop, float("-inf"))
    return _adjusted_cross_entropy(logits, targets, a, ignore_index, reduction, want_stats,
                                   all_valid=all_valid)


# --------------------------------------------------------------------------------------------
# Seesaw loss
# --------------------------------------------------------------------------------------------

def seesaw_weights(logits: torch.Tensor, targets: torch.Tensor, class_counts: torch.Tensor,
                   p: float = 0.8, q: float = 2.0, eps: float = 1e-2) -> torch.Tensor:
    """Seesaw factors ``S_ij = M_ij * C_ij`` for rows with target ``i`` (all in ``[0, C)``).

        M_ij = (N_j / N_i)^p if N_j < N_i else 1        (mitigation, N = cumulative counts)
        C_ij = (s_j / s_i)^q if s_j > s_i else 1        (compensation, s = softmax(z), detached)
    """
    weights = torch.ones_like(logits)
    if p > 0:
        counts = class_counts.to(logits.dtype).clamp(min=1)
        ratio = counts[None, :] / counts[:, None]
        weights = weights * torch.where(ratio < 1, ratio.pow(p), torch.ones_like(ratio))[targets]
    if q > 0:
        scores = torch.softmax(logits.detach(), dim=1)
        self_scores = gather_rows(scores, targets).clamp(min=eps)
        score_ratio = scores / self_scores[:, None]
        weights = weights * torch.where(score_ratio > 1, score_ratio.pow(q),
                                        torch.ones_like(score_ratio))
    return weights


def _seesaw(logits, targets, class_counts, p, q, eps, normalizer, ignore_index, validate=True,
            checked=None):
    """Returns (loss, class term, objectness term), the terms detached.

    ``checked``: the :class:`~eqlosses.functional._common.Targets` of a caller that has checked
    ``targets`` already (they are not checked twice). With validation on, the class term is
    computed on the foreground rows only (``nonzero``: one more host synchronisation); without,
    on every row with the others masked (equal to rounding, and nothing read on the host).
    """
    check_normalizer(normalizer, validate)
    num_classes = _num_classes(class_counts)
    check_logits(logits, num_classes + 2, "Seesaw (C class columns + 2 objectness columns)")
    if checked is None:
        checked = check_targets(targets, logits, num_classes, ignore_index, "Seesaw", validate)
    targets, all_valid = checked
    counts = check_class_vector(class_counts, num_classes, "class_counts", logits.device)
    need_grad = needs_grad(logits)
    with torch.no_grad():
        dtype = compute_dtype(logits)
        z = logits.detach().to(dtype)
        valid = targets != ignore_index
        fg = valid & (targets < num_classes)
        if all_valid is not None:  # host reads allowed: the foreground rows only
            rows = fg.nonzero().squeeze(1)
            z_cls, t_cls, cls_valid = z[rows, :num_classes], targets[rows], True
        else:  # every row; the non-foreground ones are ignored in the class term
            rows = None
            z_cls, cls_valid = z[:, :num_classes], None
            t_cls = torch.where(fg, targets, torch.full_like(targets, ignore_index))
        log_s = torch.log(seesaw_weights(z_cls, t_cls.clamp(0, num_classes - 1), counts, p, q,
                                         eps))
        cls = _adjusted_cross_entropy(z_cls, t_cls, log_s, ignore_index, "sum", False,
                                      return_grad=need_grad, all_valid=cls_valid)
        obj_target = torch.where(valid, (targets == num_classes).long(), targets)
        obj = _adjusted_cross_entropy(z[:, num_classes:], obj_target, None, ignore_index, "sum",
                                      False, return_grad=need_grad, all_valid=all_valid)
        grad = None
        if need_grad:
            if rows is None:
                grad = torch.cat([cls.grad, obj.grad], dim=1)
            else:
                grad = torch.zeros_like(z)
                grad[rows, :num_classes] = cls.grad
                grad[:, num_classes:] = obj.grad
        if normalizer is None:
            norm = valid.sum().clamp(min=1).to(dtype)
        else:
            norm = torch.as_tensor(normalizer, dtype=dtype, device=z.device).reshape(())
    loss = reduce_loss(logits, cls.loss + obj.loss, grad, "mean", norm)
    return loss, cls.loss / norm, obj.loss / norm


def seesaw_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_counts: torch.Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
    normalizer: Optional[float] = None,
    ignore_index: int = -100,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Seesaw loss (Wang et al., CVPR 2021) with a separate objectness branch, as in mmdet.

        class term:      sum over foreground rows of CE(z_cls + log S * (1 - y), y)
        objectness term: sum over all rows of CE(z_obj, [fg, bg])
        loss = (class term + objectness term) / normalizer   (default: non-ignored rows)

    Args:
        logits: ``[N, C + 2]``: C class logits, then objectness ``[fg, bg]``.
        targets: ``[N]`` int64 in ``[0, C]`` (``C`` = background) or ``ignore_index``.
        class_counts: ``[C]`` cumulative training counts per class (``N_j``).
        validate: check the target values (host synchronisations); ``False`` reads nothing
            on the host (shapes, dtypes and devices are always checked).

    >>> seesaw_loss(torch.zeros(1, 4), torch.tensor([0]), torch.tensor([5, 1]))
    tensor(0.9368)
    """
    return _seesaw(logits, targets, class_counts, p, q, eps, normalizer, ignore_index,
                   validate)[0]
