"""Accumulated per-class gradient statistics, the state behind every gradient-driven loss.

``GradientStatistics`` knows no loss formula. A loss computes, in closed form from detached
logits, the per-class increments

    pos_inc_j = sum over rows whose target is j      of |d loss / d z_nj|
    neg_inc_j = sum over rows whose target is not j  of |d loss / d z_nj|

and hands them to :meth:`GradientStatistics.update`, which all-reduces them (one collective for
both) and adds them to the running sums. The sums are never decayed. A step whose reduced
increments are not finite is skipped on every rank, decided on the device: the update does not
synchronise with the host (unless asked to warn) and compiles with ``torch.compile``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from .distributed import all_reduce_sum_

__all__ = ["GradientStatistics"]

_ACCUMULATORS = ("pos_grad", "neg_grad")


def apply_keeping_dtype(module: nn.Module, fn: Any) -> None:
    """``module._apply(fn)`` for a module with buffers only: follow device moves, never dtype
    casts, so that ``model.half()`` cannot round accumulated sums or counts."""
    for name, buf in module._buffers.items():
        if buf is None:
            continue
        moved = fn(buf)
        if moved.dtype != buf.dtype:
            moved = buf.to(device=moved.device)
        module._buffers[name] = moved


class GradientStatistics(nn.Module):
    """Running sums of positive and negative gradient magnitudes for ``num_classes`` classes.

    The accumulators are registered, persistent buffers: they are saved by ``state_dict``,
    restored by ``load_state_dict`` and moved by ``.to(device)``. They stay in ``dtype``
    (float64 by default) when the module is cast with ``.half()``, ``.float()`` or
    ``.to(dtype)``, so that casting a model does not degrade the statistics.

    Buffers:
        pos_grad: ``[C]`` accumulated positive-gradient magnitude ``P_j``.
        neg_grad: ``[C]`` accumulated negative-gradient magnitude ``Nn_j``.
        num_updates: number of updates applied (0-d int64): calls of :meth:`update` whose
            reduced increments were finite.
        num_skipped: number of updates skipped because a reduced increment was not finite
            (``num_updates + num_skipped`` = calls of :meth:`update`).

    Args:
        num_classes: number of foreground classes ``C``.
        dtype: accumulator dtype (float64 or float32).

    Example:
        >>> stats = GradientStatistics(3)
        >>> stats.update(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([4.0, 2.0, 0.0]))
        tensor(True)
        >>> stats.ratio(init=1.0)  # class 2 has seen no gradient yet
        tensor([0.2500, 0.0000, 1.0000], dtype=torch.float64)
    """

    pos_grad: torch.Tensor
    neg_grad: torch.Tensor
    num_updates: torch.Tensor
    num_skipped: torch.Tensor

    def __init__(self, num_classes: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
        self._dtype = dtype
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=dtype))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=dtype))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_skipped", torch.zeros((), dtype=torch.int64))
        self._warned_non_finite = False

    @property
    def num_classes(self) -> int:
        return self.pos_grad.numel()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dtype={self._dtype}"

    def _apply(self, fn: Any, recurse: bool = True) -> "GradientStatistics":
        apply_keeping_dtype(self, fn)
        return self

    @torch.no_grad()
    def update(self, pos_inc: torch.Tensor, neg_inc: torch.Tensor,
               warn: bool = True, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add one step's increments (summed over all processes first); return whether applied.

        Call this on every rank at every training step, also with zero increments for an empty
        batch: it performs exactly one all-reduce of a ``[2, C]`` tensor. If the reduced
        increments are not finite on any rank (a NaN or inf on one rank reaches every rank
        through the sum), every rank skips the update: the accumulators are left as they were,
        ``num_skipped`` is incremented instead of ``num_updates``. The decision is taken on the
        device (``torch.where``), so the update itself never synchronises with the host.

        Args:
            pos_inc: ``[C]`` non-negative positive-gradient magnitudes of this step.
            neg_inc: ``[C]`` non-negative negative-gradient magnitudes of this step.
            warn: issue a ``RuntimeWarning`` the first time an update is skipped. This reads
                the decision on the host (one synchronisation per call until the warning has
                been shown); the losses pass their ``validate`` switch. With ``warn=False``
                nothing is read: watch ``num_skipped`` instead.
            extra: optional ``[K, C]`` increments of a loss's own per-class sums, carried in
                the same all-reduce (still one collective) and under the same decision: on
                return they hold their sums over the processes, zeroed if the update was
                skipped, for the caller to add to its own buffers.

        Returns:
            A 0-d bool tensor on the accumulators' device: True if the update was applied.
        """
        expected = (self.num_classes,)
        if pos_inc.shape != expected or neg_inc.shape != expected:
            raise ValueError(
                f"increments must have shape {expected}, got {tuple(pos_inc.shape)} and "
                f"{tuple(neg_inc.shape)}"
            )
        rows = [pos_inc, neg_inc]
        if extra is not None:
            if extra.dim() != 2 or extra.shape[1] != self.num_classes:
                raise ValueError(f"extra increments must have shape [K, {self.num_classes}], "
                                 f"got {tuple(extra.shape)}")
            rows += list(extra.unbind())
        inc = torch.stack(rows).to(device=self.pos_grad.device, dtype=self._dtype)
        all_reduce_sum_(inc)
        # Decided from one sum, in few operations (each costs dispatch time on the hot path):
        # a NaN or inf anywhere makes the sum non-finite (no float64 sum of these magnitudes
        # overflows), and `sum * 0` is 0 for a finite sum and NaN otherwise.
        zero = inc.sum() * 0
        finite, skipped = zero == 0, zero != 0
        inc.masked_fill_(skipped, 0.0)
        if extra is not None:
            extra.copy_(inc[2:])
        # in-place methods: `self.buf += x` would also go through nn.Module.__setattr__
        self.pos_grad.add_(inc[0])
        self.neg_grad.add_(inc[1])
        self.num_updates.add_(finite)
        self.num_skipped.add_(skipped)
        if warn and not self._warned_non_finite and not bool(finite):  # host sync
            warnings.warn(
                "GradientStatistics: a non-finite gradient increment was skipped (non-finite "
                "logits?); the accumulated statistics were left unchanged. This warning is "
                "shown once; see `num_skipped` for the count.",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_non_finite = True
        return finite

    def ratio(self, init: float, eps: float = 1e-10) -> torch.Tensor:
        """The accumulated gradient ratio ``g_j = P_j / (Nn_j + eps)``.

        Classes that have received no gradient at all (``P_j + Nn_j == 0``, e.g. before the
        first update) get ``init`` instead. Not clamped: losses that need ``[0, 1]`` clamp it.
        """
        seen = (self.pos_grad + self.neg_grad) > 0
        ratio = self.pos_grad / (self.neg_grad + eps)
        return torch.where(seen, ratio, torch.full_like(ratio, init))

    @torch.no_grad()
    def reset(self) -> None:
        """Zero the accumulators and counters."""
        for buf in self._buffers.values():
            buf.zero_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook
        for name in _ACCUMULATORS:
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                raise ValueError(
                    f"checkpoint statistics '{key}' have shape {tuple(state_dict[key].shape)}, "
                    f"but this loss was built for num_classes={self.num_classes} (expected "
                    f"shape ({self.num_classes},)); build the loss with the checkpoint's class count"
                )
        # Buffers are copied in place, so a float32 checkpoint keeps our accumulator dtype.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
