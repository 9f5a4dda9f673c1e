"""Input validation, the closed-form autograd node and the package's one reduction helper.

Host synchronisation: the checks here that read metadata only (type, dtype, shape, device) are
always on; those that read tensor values (the target range) run only with ``validate=True``.
The kernels take ``all_valid`` from :func:`check_targets`: a Python bool when validation read
the targets, ``None`` otherwise, in which case they read no tensor value on the host at all
(no ``.item()``, ``bool(tensor)``, ``nonzero`` or boolean indexing), so that a training step
never waits for the device and compiles into one graph (``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float16/bfloat16 logits are computed in float32; float32/float64 as they are."""
    return torch.promote_types(logits.dtype, torch.float32)


def adjusted_logits(logits: torch.Tensor, adjustment: Optional[torch.Tensor]) -> torch.Tensor:
    """Detached ``logits`` in the compute dtype plus ``adjustment`` (a ``[C]`` vector, applied
    along dim 1, or a tensor broadcastable to the logits); a new tensor when adjusted."""
    z = logits.detach().to(compute_dtype(logits))
    if adjustment is not None:
        a = adjustment.to(z.dtype)
        if a.dim() == 1:
            a = a.view((1, z.shape[1]) + (1,) * (z.dim() - 2))
        z = z + a
    return z


def check_tensor(value: object, name: str = "logits") -> None:
    """A ``TypeError`` naming ``name`` unless ``value`` is a tensor (before any attribute of
    it is read: a list would otherwise fail with an ``AttributeError`` on ``.device``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_logits(logits: torch.Tensor, channels: int, what: str, spatial: bool = False) -> None:
    """``logits`` must be a floating tensor ``[N, channels]`` (or ``[N, channels, *]``)."""
    check_tensor(logits)
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    shape = "[N, C]" if not spatial else "[N, C] or [N, C, *]"
    if logits.dim() < 2 or (not spatial and logits.dim() != 2):
        raise ValueError(f"logits must have shape {shape}, got {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"logits have 0 channels in dim 1, but {what} expects at least one "
                         "class channel")
    if logits.shape[1] != channels:
        raise ValueError(
            f"logits have {logits.shape[1]} channels in dim 1, but {what} expects {channels}"
        )


class Targets(NamedTuple):
    """Checked targets: int64 ``values`` and whether every row is valid (not ``ignore_index``).

    ``all_valid`` is a Python bool when validation read the targets on the host (it comes free
    with that read), and ``None`` when nothing was read (``validate=False``): the kernels then
    take their masked, sync-free paths.
    """

    values: torch.Tensor
    all_valid: Optional[bool]


def check_targets(
    targets: torch.Tensor,
    logits: torch.Tensor,
    high: int,
    ignore_index: int,
    what: str,
    validate: bool = True,
) -> Targets:
    """Check integer class-index targets; return them as int64 with what was learnt.

    Targets must have shape ``[N]`` (or ``[N, *]`` matching ``logits [N, C, *]``), live on the
    logits' device and hold values in ``[0, high]`` or ``ignore_index``. Type, shape and device
    are metadata and always checked. The value range is checked only with ``validate=True``:
    one host synchronisation (``aminmax``) when every target is a class, a second one when some
    rows are ignored (or out of range). With ``validate=False`` nothing is read on the host and
    out-of-range targets give undefined results (or an indexing error), as in ``torch.nn``.
    """
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be integer class indices (int64), got dtype {targets.dtype}; "
            "convert one-hot or soft targets with argmax first"
        )
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(targets.shape) != expected:
        raise ValueError(
            f"targets must have shape {expected} to match logits {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.device != logits.device:
        raise ValueError(
            f"targets are on {targets.device} but logits are on {logits.device}; "
            "move both to the same device"
        )
    if targets.dtype != torch.int64:
        targets = targets.long()
    if not validate:
        return Targets(targets, None)
    if not targets.numel():
        return Targets(targets, True)
    low, top = torch.stack(torch.aminmax(targets)).tolist()  # host sync 1
    if low >= 0 and top <= high and not low <= ignore_index <= top:
        return Targets(targets, True)  # the common case: every row is a class
    valid = targets != ignore_index
    bad = ((targets < 0) | (targets > high)) & valid
    any_bad, all_valid = torch.stack([bad.any(), valid.all()]).tolist()  # host sync 2
    if any_bad:
        value = targets[bad][0].item()
        raise ValueError(
            f"{what} expects targets in [0, {high}] or ignore_index={ignore_index}, "
            f"found {value}"
        )
    return Targets(targets, bool(all_valid))


def check_class_vector(
    vector: torch.Tensor, num_classes: int, name: str, device: torch.device
) -> torch.Tensor:
    """A per-class tensor ``[C]``, checked and moved to ``device``."""
    vector = torch.as_tensor(vector)
    if vector.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},), got {tuple(vector.shape)}")
    return vector.to(device)


def check_device(module_tensor: torch.Tensor, logits: torch.Tensor, what: str) -> None:
    check_tensor(logits)
    if module_tensor.device != logits.device:
        raise ValueError(
            f"{what} state is on {module_tensor.device} but logits are on {logits.device}; "
            f"move the loss with .to({str(logits.device)!r})"
        )


class _ClosedFormLoss(torch.autograd.Function):
    """A loss value whose gradient w.r.t. the logits was computed in closed form in forward.

    ``grad`` is d(sum of the unreduced loss)/d logits; ``scale`` (a float or 0-d tensor)
    multiplies the gradient (``1 / normaliser`` for a mean, 1 otherwise); ``value`` has it
    applied already.
    """

    @staticmethod
    def forward(ctx, logits, value, grad, scale, row_weight):  # type: ignore[override]
        ctx.save_for_backward(grad, row_weight)
        ctx.scale = scale
        ctx.logits_dtype = logits.dtype
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        grad, row_weight = ctx.saved_tensors
        scale = ctx.scale
        if 0 < grad_out.dim() < grad.dim():  # per-row loss of a [N, C, *] input
            grad_out = grad_out.unsqueeze(1)
        kept = _graph_kept()
        if (row_weight is None and isinstance(scale, float) and scale == 1.0
                and grad_out.dim() == 0 and grad_out.device.type == "cpu"
                and grad_out.item() == 1.0):
            # `loss.backward()` of a sum, or of a mean whose gradient came already divided
            # (the fused kernel): the gradient is final. Reading grad_out costs nothing on the
            # CPU; elsewhere it would wait for the device, so there the multiply stays.
            g = grad.clone() if kept else grad
            return g.to(ctx.logits_dtype), None, None, None, None
        factor = grad_out * scale
        if row_weight is not None:  # [N, *]: zero for ignored rows
            factor = factor * row_weight.unsqueeze(1)
        # `grad` belongs to this node alone: when the graph is freed after this backward, scale
        # it in place (no new logits-sized buffer: one allocation and its page faults fewer
        # per step); keep it intact for a graph that is kept (retain_graph=True).
        g = grad * factor if kept else grad.mul_(factor)
        return g.to(ctx.logits_dtype), None, None, None, None


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True when torch
    cannot tell (the query is internal to torch: err on the side of not modifying) and while
    ``torch.compile`` traces (dynamo cannot trace the query; the compiler plans buffers
    itself)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if query is None or torch.compiler.is_compiling():
        return True
    try:
        return bool(query())
    except RuntimeError:
        return True


def check_normalizer(normalizer: Union[None, float, torch.Tensor], validate: bool) -> None:
    """A normaliser must be a number > 0 (a Python number always is checked; a tensor one must
    hold one element, and, with ``validate``, a finite value > 0: one host read)."""
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
        if validate and not bool(torch.isfinite(normalizer).all() & (normalizer > 0).all()):
            raise ValueError(f"normalizer must be > 0 and finite, got {normalizer.item()}")
    elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise ValueError(f"normalizer must be a number or a 0-d tensor, got {normalizer!r}")
    elif not (normalizer > 0 and math.isfinite(normalizer)):
        raise ValueError(f"normalizer must be > 0 and finite, got {normalizer}")


def scale_of(reduction: str, normalizer: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
    """The factor a reduction applies to the summed loss: ``1 / normalizer`` for a mean."""
    return 1.0 / normalizer if reduction == "mean" else 1.0


def reduce_loss(
    logits: torch.Tensor,
    elementwise: torch.Tensor,
    grad: Optional[torch.Tensor],
    reduction: str,
    normalizer: Union[float, torch.Tensor],
    row_weight: Optional[torch.Tensor] = None,
    grad_reduced: bool = False,
) -> torch.Tensor:
    """The package's one reduction helper.

    ``elementwise`` is the detached unreduced loss and ``grad`` its closed-form gradient
    d(sum elementwise)/d logits (``None`` when no gradient is needed). Returns
    ``sum / normalizer`` (``"mean"``), the sum (``"sum"``) or ``elementwise`` (``"none"``),
    attached to the autograd graph of ``logits``. ``row_weight`` (``[N, *]``), if given,
    multiplies the gradient of each row (0 for ignored rows whose ``grad`` entries were left
    unmasked). ``grad_reduced``: ``grad`` is already the gradient of the reduced loss (divided
    by ``normalizer`` for a mean).
    """
    if reduction == "none":
        value, scale = elementwise, 1.0
    else:
        scale = scale_of(reduction, normalizer)
        value = elementwise.sum() * scale
    if grad is None:
        return value
    return _ClosedFormLoss.apply(logits, value, grad, 1.0 if grad_reduced else scale,
                                 row_weight)


def needs_grad(logits: torch.Tensor) -> bool:
    return logits.requires_grad and torch.is_grad_enabled()


def scatter_rows(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``x[n, index[n]] = values[n]`` in place, for ``x [N, K]`` (or ``[N, K, *]``)."""
    x.scatter_(1, index.unsqueeze(1), values.unsqueeze(1))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[n, index[n]]`` for ``x [N, K]`` (or ``[N, K, *]`` with ``index [N, *]``)."""
    return x.gather(1, index.unsqueeze(1)).squeeze(1)


def per_class_sum(values: torch.Tensor, classes: torch.Tensor, mask: Optional[torch.Tensor],
                  num_classes: int) -> torch.Tensor:
    """``out[c] = sum of values[n] where classes[n] == c and mask[n]``, without a host sync.

    ``classes`` must be in ``[0, num_classes)`` everywhere (masked rows may hold any valid
    class: their values are zeroed before they are added).
    """
    if mask is not None:
        values = values * mask
    out = torch.zeros(num_classes, dtype=values.dtype, device=values.device)
    return out.index_add_(0, classes.reshape(-1), values.reshape(-1))


def sum_except_dim1(x: torch.Tensor) -> torch.Tensor:
    """Per-class sums ``[C]`` of ``x [N, C, *]``."""
    dims: Sequence[int] = [0] + list(range(2, x.dim()))
    return x.sum(dim=dims)


def weighted_sum_except_dim1(x: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """``sum_{n,*} x[n, c, *] * row_weight[n, *]`` for each class ``c``.

    Matrix-vector products where they are fast (rows; a few images of many pixels), otherwise
    a product and a sum.
    """
    n, c = x.shape[:2]
    if x.dim() == 2:
        return row_weight @ x
    if 0 < n <= 16:  # (no images: reshape cannot infer -1 from 0 elements)
        flat, w = x.reshape(n, c, -1), row_weight.reshape(n, -1)
        out = flat[0] @ w[0]
        for i in range(1, n):
            out += flat[i] @ w[i]
        return out
    return sum_except_dim1(x * row_weight.unsqueeze(1))
