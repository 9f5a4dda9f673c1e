"""Process-group helpers. Every function is a no-op (or the identity) without an initialised group.

The equalization losses keep per-class statistics that must be identical on every rank. The
one rule this module supports is DESIGN.md's: exactly one SUM all-reduce per training forward,
on every rank, even when the local batch is empty.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_initialized", "world_size", "rank", "all_reduce_sum_", "mean_across_processes"]


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 without a group)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """Rank of this process in the default group (0 without a group)."""
    return dist.get_rank() if is_initialized() else 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it.

    Without an initialised process group, or with a single process, the tensor is returned
    unchanged and no communication happens.

    >>> t = torch.ones(3)
    >>> all_reduce_sum_(t)
    tensor([1., 1., 1.])
    """
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_across_processes(value: torch.Tensor | float,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """The mean of ``value`` over all processes (one all-reduce), as a float tensor.

    This is the normaliser that one-stage detectors use for focal-style losses: the number of
    positive anchors averaged over processes, so that every rank divides by the same number.
    A tensor stays on its device; a Python number goes to ``device`` (with NCCL, pass the
    GPU).

    >>> mean_across_processes(7.0)
    tensor(7.)
    """
    if device is None and isinstance(value, torch.Tensor):
        device = value.device
    t = torch.as_tensor(value, dtype=torch.float32, device=device).clone()
    all_reduce_sum_(t)
    return t / world_size()
