"""The confusion-matrix state that the classification and segmentation metrics share.

Every metric of this package that is built on a confusion matrix keeps only *sum* states: the
``[C, C]`` matrix itself (``M[i, j]`` = counted items of true class ``i`` predicted as ``j``)
and, where a metric needs more, other per-class or per-``k`` counts (e.g. top-k hits). Sums of
several processes combine exactly, so :meth:`ConfusionMatrixState.sync` packs every declared
state into one flat tensor and sums it over the processes with ONE all-reduce, whatever the
number of states, and the result does not depend on how the test set was split or batched.

The states are declared once, with :meth:`ConfusionMatrixState.add_state` (as torchmetrics'
``Metric.add_state``); reset, ``state_dict`` / ``load_state_dict``, device moves and the
all-reduce then handle every declared state alike. A metric built on it declares its extra
states in ``__init__``, calls :meth:`ConfusionMatrixState._count` from its ``update`` and
implements only its own ``compute``.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Union

import torch

from .. import distributed

__all__ = ["ConfusionMatrixState"]

Device = Union[torch.device, str]

#: The reductions a declared state may have. Only sums: all states travel in one SUM
#: all-reduce, and sums are what make the metrics independent of the split of the data.
REDUCTIONS = ("sum",)


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


class ConfusionMatrixState:
    """A ``[C, C]`` int64 confusion matrix and further declared sum states, one all-reduce.

    The matrix is the state ``confusion`` (rows = true class, columns = predicted class).
    Subclasses declare further states with :meth:`add_state`; each becomes an attribute (an
    int64 tensor) that :meth:`reset`, :meth:`state_dict`, :meth:`load_state_dict`, :meth:`to`
    and :meth:`sync` handle like the matrix. :meth:`update` (or :meth:`_count`, for a subclass
    with its own ``update``) adds ``(target, prediction)`` pairs with one ``bincount``.

    Counting rules: a target equal to ``ignore_index`` counts nowhere, whatever is predicted
    there; with ``ignore_index=None`` every negative target counts nowhere (classification,
    where both -1 and -100 are common ignore labels). Items where the optional ``valid`` mask
    is False count nowhere (e.g. the duplicates a ``DistributedSampler`` pads a shard with).
    Every other target must be in ``[0, C)``, and so must the prediction of a counted item.

    Distributed evaluation: each rank calls ``update`` on its shard, then every rank calls
    :meth:`sync` once (ONE all-reduce of all declared states, packed), after which every rank
    holds the totals of one process evaluating everything. ``update`` after ``sync`` raises
    until :meth:`reset`.

    Args:
        num_classes: number of classes ``C``.
        ignore_index: the target label that counts nowhere; None: every negative target.
        device: device of the states. None (default): the states follow the inputs of
            ``update`` (CPU until the first one). With NCCL pass the rank's CUDA device, so
            that :meth:`sync` works also on a rank that saw no input.

    Example:
        >>> s = ConfusionMatrixState(3, ignore_index=255)
        >>> s.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 255]))
        >>> s.confusion
        tensor([[1, 1, 0],
                [0, 1, 0],
                [0, 0, 0]])
        >>> s.add_state("hits", torch.zeros(2, dtype=torch.int64))
        >>> sorted(s.state_dict())
        ['confusion', 'hits']
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = None, *,
                 device: Optional[Device] = None) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if ignore_index is not None:
            if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
                raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
            if 0 <= ignore_index < num_classes:
                raise ValueError(f"ignore_index must lie outside the classes [0, {num_classes}), "
                                 f"got {ignore_index}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._follow_inputs = device is None
        self._device = torch.device("cpu" if device is None else device)
        self._states: Dict[str, str] = {}  # name -> reduction, in declaration (= packing) order
        self._synced = False
        self.add_state("confusion", torch.zeros(num_classes, num_classes, dtype=torch.int64))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index="
                f"{self.ignore_index}, states={list(self._states)})")

    # ---------------------------------------------------------------------------------------
    # Declared states
    # ---------------------------------------------------------------------------------------

    def add_state(self, name: str, default: torch.Tensor, reduction: str = "sum") -> None:
        """Declare a sum state: an int64 tensor, zeroed by :meth:`reset`, summed by :meth:`sync`.

        The state becomes the attribute ``name`` (a copy of ``default`` on :attr:`device`).
        States are packed in declaration order; :meth:`reset` zeroes them.

        Args:
            name: attribute and ``state_dict`` key; a valid identifier not used yet.
            default: the initial (zero) value, any shape, dtype int64 (all states share one
                dtype so that they travel in one all-reduce).
            reduction: how the processes' values combine; only ``"sum"``.

        >>> s = ConfusionMatrixState(2)
        >>> s.add_state("topk_correct", torch.zeros(3, dtype=torch.int64))
        >>> s.topk_correct
        tensor([0, 0, 0])
        """
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"a state name must be a public identifier, got {name!r}")
        if name in self._states or hasattr(self, name):
            raise ValueError(f"state name {name!r} is already taken")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS} (all states travel in one "
                             f"SUM all-reduce), got {reduction!r}")
        if not isinstance(default, torch.Tensor) or default.dtype != torch.int64:
            got = default.dtype if isinstance(default, torch.Tensor) else type(default).__name__
            raise ValueError(f"state {name!r} must be an int64 tensor, got {got}")
        setattr(self, name, default.detach().clone().to(self._device))
        self._states[name] = reduction

    @property
    def state_names(self) -> List[str]:
        """The declared states, in packing order (``confusion`` first)."""
        return list(self._states)

    @property
    def device(self) -> torch.device:
        """The device of every state."""
        return self.confusion.device

    def to(self, device: Device) -> "ConfusionMatrixState":
        """Move every state to ``device`` (in place) and return ``self``.

        With ``device=None`` at construction the states still follow the next inputs.
        """
        self._device = torch.device(device)
        for name in self._states:
            setattr(self, name, getattr(self, name).to(self._device))
        return self

    def reset(self) -> None:
        """Zero every state (start a new evaluation)."""
        for name in self._states:
            getattr(self, name).zero_()
        self._synced = False

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """A copy of every state, by name."""
        return {name: getattr(self, name).clone() for name in self._states}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Set every state from :meth:`state_dict` output (same names and shapes).

        Raises ValueError for a missing or unknown name, or a shape that differs.
        """
        missing = [n for n in self._states if n not in state]
        unknown = [n for n in state if n not in self._states]
        if missing or unknown:
            raise ValueError(f"state_dict must have the states {list(self._states)}, missing "
                             f"{missing}, unknown {unknown}")
        values = {n: torch.as_tensor(state[n]) for n in self._states}
        for name, value in values.items():
            own = getattr(self, name)
            if value.shape != own.shape:
                raise ValueError(f"{name} must have shape {tuple(own.shape)}, got "
                                 f"{tuple(value.shape)}")
        for name, value in values.items():
            getattr(self, name).copy_(value)
        self._synced = False

    def sync(self) -> None:
        """Sum every declared state over all processes: exactly ONE all-reduce.

        The states are packed into one flat tensor (declaration order), summed with
        :func:`eqlosses.distributed.all_reduce_sum_` and unpacked. Collective: call it on every
        rank, once, after the last ``update``. Without a process group (or with one process) it
        communicates nothing; a second call before :meth:`reset` is a no-op (the states already
        hold the totals).
        """
        if self._synced:
            return
        states = [getattr(self, name) for name in self._states]
        packed = torch.cat([s.reshape(-1) for s in states])
        distributed.all_reduce_sum_(packed)
        for s, chunk in zip(states, packed.split([s.numel() for s in states])):
            s.copy_(chunk.view_as(s))
        self._synced = True

    # ---------------------------------------------------------------------------------------
    # Counting
    # ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, preds: torch.Tensor, targets: torch.Tensor,
               valid: Optional[torch.Tensor] = None) -> None:
        """Count one batch of integer predictions.

        Args:
            preds: integer predicted classes, any shape.
            targets: integer true classes, the shape of ``preds``.
            valid: optional bool mask of that shape; items where it is False count nowhere.
        """
        self._count(preds, targets, valid)

    def _check_not_synced(self) -> None:
        if self._synced:
            raise RuntimeError(f"{type(self).__name__}.update() after sync(): the states already "
                               f"hold the totals of all processes; call reset() first")

    @torch.no_grad()
    def _count(self, preds: torch.Tensor, targets: torch.Tensor,
               valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Validate, follow the input device, add the pairs to ``confusion``; return the kept mask.

        The returned mask is flat (``targets.numel()`` items), on :attr:`device`: True where the
        item was counted (``valid`` and not ignored). A subclass counts its other states on
        those items.
        """
        self._check_not_synced()
        if not _is_integer(targets):
            raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
        if not _is_integer(preds):
            raise ValueError(f"predictions must be integer class indices, got dtype "
                             f"{preds.dtype}")
        if preds.shape != targets.shape:
            raise ValueError(f"predictions {tuple(preds.shape)} and targets "
                             f"{tuple(targets.shape)} must have the same shape")
        if valid is not None and (valid.dtype != torch.bool or valid.shape != targets.shape):
            raise ValueError(f"valid must be a bool mask of shape {tuple(targets.shape)}, got "
                             f"dtype {valid.dtype} and shape {tuple(valid.shape)}")
        if self._follow_inputs and preds.device != self.device:
            self.to(preds.device)
        t = targets.to(device=self.device, dtype=torch.int64).reshape(-1)
        p = preds.to(device=self.device, dtype=torch.int64).reshape(-1)
        keep = t < 0 if self.ignore_index is None else t == self.ignore_index
        keep = ~keep
        if valid is not None:
            keep &= valid.to(self.device).reshape(-1)
        t, p = t[keep], p[keep]
        if t.numel() == 0:
            return keep
        c = self.num_classes
        bad_t = (t < 0) | (t >= c)
        if bool(bad_t.any()):
            ignored = ("negative (ignored)" if self.ignore_index is None
                       else f"ignore_index={self.ignore_index}")
            raise ValueError(f"targets must be in [0, {c}) or {ignored}, found "
                             f"{torch.unique(t[bad_t])[:10].tolist()}")
        bad_p = (p < 0) | (p >= c)
        if bool(bad_p.any()):
            raise ValueError(f"predicted classes must be in [0, {c}), found "
                             f"{torch.unique(p[bad_p])[:10].tolist()}")
        self.confusion += torch.bincount(t * c + p, minlength=c * c).view(c, c)
        return keep
