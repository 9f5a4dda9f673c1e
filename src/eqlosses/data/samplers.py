"""Re-sampling for long-tailed training: class-balanced, square-root and repeat-factor sampling.

:func:`repeat_factors` is LVIS repeat-factor sampling (Gupta et al., CVPR 2019): with
:math:`f_c` the fraction of training samples (images) that contain class :math:`c` and
:math:`t` the threshold,

.. math:: r_c = \\max(1, \\sqrt{t / f_c}), \\qquad r_i = \\max_{c \\in i} r_c .

:class:`LongTailSampler` draws an epoch's index list deterministically from ``(seed, epoch)``
with one of four policies, then splits it across processes like
:class:`torch.utils.data.DistributedSampler`; its ``state_dict`` records how far the current
epoch went, so that a resumed run yields exactly the indices not yet consumed.
Torch and numpy only.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["repeat_factors", "LongTailSampler", "SAMPLING_MODES"]

SAMPLING_MODES = ("instance", "class_balanced", "sqrt", "rfs")


class _Labels:
    """Labels in one of two forms: one class per sample (``single``, int64 ``[N]``) or a list
    of classes per sample (detection images); ``pairs`` = the distinct (sample, class) pairs."""

    def __init__(self, labels: Any, num_classes: int) -> None:
        if (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
                or num_classes < 1):
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu().numpy()
        if isinstance(labels, np.ndarray) and labels.dtype != object:
            if labels.ndim != 1:
                raise ValueError(f"labels must be a 1-d integer array or a list of per-sample "
                                 f"label lists, got an array of shape {list(labels.shape)}")
            self.single: np.ndarray | None = self._check(labels, num_classes)
            self.n = int(labels.shape[0])
            samples = np.arange(self.n)
            classes = self.single
        else:
            items = list(labels)
            scalar = [isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                      or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 0)
                      for x in items]
            self.n = len(items)
            if all(scalar):
                self.single = self._check(np.asarray([int(x) for x in items], np.int64),
                                          num_classes)
                samples = np.arange(self.n)
                classes = self.single
            elif not any(scalar):
                self.single = None
                per = [np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x).reshape(-1)
                       for x in items]
                per = [p if p.size else np.zeros(0, np.int64) for p in per]  # [] is float
                lengths = np.asarray([p.size for p in per], dtype=np.int64)
                flat = np.concatenate(per) if per else np.zeros(0, np.int64)
                classes = self._check(flat, num_classes)
                samples = np.repeat(np.arange(self.n), lengths)
            else:
                first = scalar.index(False) if scalar[0] else scalar.index(True)
                raise ValueError(f"labels mix integers and label lists (item 0 is "
                                 f"{items[0]!r}, item {first} is {items[first]!r}); give "
                                 f"one integer per sample or one list per sample")
        key = np.unique(samples.astype(np.int64) * num_classes + classes)
        self.pair_samples = key // num_classes
        self.pair_classes = key % num_classes
        self.num_classes = int(num_classes)

    @staticmethod
    def _check(lab: np.ndarray, num_classes: int) -> np.ndarray:
        if lab.size and not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
        lab = lab.astype(np.int64)
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            bad = lab[(lab < 0) | (lab >= num_classes)][0]
            raise ValueError(f"labels must be in [0, {num_classes}), found {bad}")
        return lab


def _repeat_factors(lab: _Labels, threshold: float) -> np.ndarray:
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    r = np.ones(lab.n, dtype=np.float64)
    if lab.n == 0:
        return r
    freq = np.bincount(lab.pair_classes, minlength=lab.num_classes) / lab.n
    r_class = np.ones(lab.num_classes, dtype=np.float64)
    present = freq > 0
    r_class[present] = np.maximum(1.0, np.sqrt(threshold / freq[present]))
    np.maximum.at(r, lab.pair_samples, r_class[lab.pair_classes])
    return r


def repeat_factors(labels: Sequence[int] | Sequence[Sequence[int]] | np.ndarray | torch.Tensor,
                   num_classes: int, threshold: float = 0.001) -> torch.Tensor:
    """LVIS repeat factors ``r_i`` ``[N]`` (float64), one per sample.

    ``labels`` is a 1-d integer array (one class per sample) or a list of per-sample label
    lists (the classes of the objects in each detection image; repeats count once). With
    ``f_c`` the fraction of samples containing class ``c``:
    ``r_c = max(1, sqrt(threshold / f_c))`` and ``r_i = max_{c in sample i} r_c``; a sample
    without labels gets 1.

    >>> repeat_factors([0, 0, 0, 1], num_classes=2, threshold=0.5)
    tensor([1.0000, 1.0000, 1.0000, 1.4142], dtype=torch.float64)
    >>> repeat_factors([[0, 0], [0, 1], []], num_classes=2, threshold=1.0)
    tensor([1.2247, 1.7321, 1.0000], dtype=torch.float64)
    """
    return torch.from_numpy(_repeat_factors(_Labels(labels, num_classes), threshold))


class LongTailSampler(Sampler[int]):
    """Epoch-deterministic, distributed, resumable sampler for long-tailed training sets.

    Each epoch, a global index list is drawn from ``numpy.random.default_rng([seed, epoch])``
    (the same on every process):

    - ``"instance"``: a permutation of all ``N`` samples;
    - ``"class_balanced"``: ``N`` draws with replacement, first a class uniformly among the
      classes that have samples, then a sample uniformly within it: ``p(c) = 1 / C'``;
    - ``"sqrt"``: as ``class_balanced`` with ``p(c) = sqrt(n_c) / sum_k sqrt(n_k)``;
    - ``"rfs"``: sample ``i`` repeated ``floor(r_i)`` times, plus once with probability
      ``r_i - floor(r_i)`` (:func:`repeat_factors` with ``rfs_threshold``), shuffled; the
      length varies a little between epochs, around ``sum_i r_i``.

    Like :class:`~torch.utils.data.DistributedSampler`, the list is then padded by repeating
    its start (or, with ``drop_last``, truncated) to a multiple of ``num_replicas``, and rank
    ``r`` takes the slice ``[r::num_replicas]``. ``num_replicas`` and ``rank`` default to the
    initialised ``torch.distributed`` process group, else 1 and 0.

    ``labels`` is one class per sample, or (for ``"instance"`` and ``"rfs"`` only) a list of
    per-image label lists for detection.

    Resuming: ``position`` counts the indices this rank has yielded in the current epoch and
    ``state_dict()`` returns ``{"epoch", "position"}``; after ``load_state_dict`` the next
    iteration continues at that position. ``set_epoch(e)`` resets the position only when ``e``
    differs from the current epoch, so the usual ``set_epoch`` call at the top of the epoch
    loop keeps a loaded position. An iteration that starts at the end of an epoch starts the
    same epoch over, except right after ``load_state_dict``, where it yields nothing (the
    loaded epoch was complete). ``len()`` is always the full epoch length of this rank. With a
    ``DataLoader`` using worker processes, the loader pulls indices ahead of the batches it
    has returned (``prefetch_factor * num_workers`` batches); save ``position`` as the number
    of samples consumed (batches done times batch size) in that case, or use
    ``num_workers=0``, with which the position is exact at batch boundaries.

    >>> s = LongTailSampler([0, 0, 0, 1], num_classes=2, mode="instance", seed=1)
    >>> sorted(s), len(s)
    ([0, 1, 2, 3], 4)
    >>> s = LongTailSampler([0, 0, 0, 1], num_classes=2, num_replicas=2, rank=1)
    >>> len(s), s.state_dict()
    (2, {'epoch': 0, 'position': 0})
    """

    def __init__(self, labels: Sequence[int] | Sequence[Sequence[int]] | np.ndarray |
                 torch.Tensor, num_classes: int, mode: str = "instance",
                 rfs_threshold: float = 0.001, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__()
        if mode not in SAMPLING_MODES:
            raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
        lab = _Labels(labels, num_classes)
        if lab.n == 0:
            raise ValueError("labels are empty: a sampler needs at least one sample")
        if mode in ("class_balanced", "sqrt") and lab.single is None:
            raise ValueError(f"mode {mode!r} needs one class per sample, got per-image label "
                             f"lists; use mode 'instance' or 'rfs' for detection")
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if dist_on else 1
        if rank is None:
            rank = torch.distributed.get_rank() if dist_on else 0
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.mode = mode
        self.num_classes = int(num_classes)
        self.num_samples_total = lab.n
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0
        self._loaded = False  # the position came from load_state_dict, not from iterating
        self._cache: tuple[int, np.ndarray] | None = None
        self.repeat_factors: torch.Tensor | None = None
        if mode == "rfs":
            self.repeat_factors = torch.from_numpy(_repeat_factors(lab, rfs_threshold))
        if mode in ("class_balanced", "sqrt"):
            single = lab.single
            counts = np.bincount(single, minlength=self.num_classes)
            self._by_class = np.argsort(single, kind="stable")   # indices grouped by class
            self._class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self._class_count = counts
            self._classes = np.flatnonzero(counts)
            weight = np.ones(len(self._classes)) if mode == "class_balanced" else \
                np.sqrt(counts[self._classes].astype(np.float64))
            self.class_probs = np.zeros(self.num_classes)
            self.class_probs[self._classes] = weight / weight.sum()

    # -- the index lists -------------------------------------------------------------------
    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """The global index list of ``epoch`` (default: the current one), before padding and
        splitting across ranks; the same on every rank."""
        epoch = self.epoch if epoch is None else self._check_epoch(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        n = self.num_samples_total
        if self.mode == "instance":
            return rng.permutation(n)
        if self.mode == "rfs":
            r = self.repeat_factors.numpy()
            whole = np.floor(r)
            reps = whole.astype(np.int64) + (rng.random(n) < (r - whole))
            return rng.permutation(np.repeat(np.arange(n), reps))
        cls = rng.choice(self._classes, size=n, p=self.class_probs[self._classes])
        within = rng.integers(0, self._class_count[cls])
        return self._by_class[self._class_start[cls] + within]

    def _split(self, indices: np.ndarray) -> np.ndarray:
        n, reps = len(indices), self.num_replicas
        if self.drop_last:
            indices = indices[:(n // reps) * reps]
        else:
            pad = math.ceil(n / reps) * reps - n
            if pad:
                indices = np.concatenate([indices, np.resize(indices, pad)])
        return indices[self.rank::reps]

    def _local(self) -> np.ndarray:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._split(self.epoch_indices()))
        return self._cache[1]

    # -- Sampler protocol --------------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        local = self._local()
        if self.position >= len(local) and not self._loaded:
            self.position = 0  # the epoch was iterated to its end: go over it again
        self._loaded = False
        for i in range(self.position, len(local)):
            self.position = i + 1
            yield int(local[i])

    def __len__(self) -> int:
        return len(self._local())

    @staticmethod
    def _check_epoch(epoch: int) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        return int(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's index list; the position restarts at 0 if the epoch changes."""
        epoch = self._check_epoch(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0
            self._loaded = False

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": current epoch, "position": indices already yielded in it}``."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`: the next iteration yields this rank's indices
        of ``epoch`` from ``position`` on (none if ``position`` is at or past the end, e.g.
        batches done times batch size after a partial last batch)."""
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"sampler state needs 'epoch' and 'position', missing "
                             f"{sorted(missing)}")
        epoch = self._check_epoch(state["epoch"])
        length = len(self._local()) if epoch == self.epoch else \
            len(self._split(self.epoch_indices(epoch)))
        position = state["position"]
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or \
                position < 0:
            raise ValueError(f"position must be an integer >= 0 (indices already yielded in "
                             f"epoch {epoch}, of {length} on this rank), got {position!r}")
        self.epoch, self.position = epoch, min(int(position), length)
        self._loaded = True
