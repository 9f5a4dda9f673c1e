"""Long-tailed subsets of balanced labelled sets (the CIFAR-LT construction).

The class sizes follow the exponential profile of Cui et al. (CVPR 2019) and Cao et al.
(LDAM, NeurIPS 2019), used for CIFAR-10/100-LT:

.. math:: n_k = \\lfloor n_{max} \\cdot \\rho^{-k / (C - 1)} \\rfloor, \\qquad k = 0, \\dots, C - 1,

where :math:`\\rho = n_0 / n_{C-1}` is the imbalance ratio (``imbalance``). Class 0 is the
head, class ``C - 1`` the tail. Numpy only.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["longtail_counts", "longtail_indices"]


def longtail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Per-class sample counts of the exponential long-tailed profile.

    ``n_k = int(n_max * imbalance ** (-k / (C - 1)))``, at least 1. ``imbalance = 1`` gives
    ``n_max`` for every class; ``imbalance = n_max / n_min`` in general.

    >>> longtail_counts(1000, 10, 100)
    [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    >>> longtail_counts(5, 3, 1)
    [5, 5, 5]
    """
    if isinstance(n_max, bool) or not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(f"n_max must be an integer >= 1, got {n_max!r}")
    if (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
            or num_classes < 1):
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    imbalance = float(imbalance)
    if not math.isfinite(imbalance) or imbalance < 1:
        raise ValueError(f"imbalance must be a finite number >= 1 (1 = balanced), got "
                         f"{imbalance}")
    if num_classes == 1:
        return [int(n_max)]
    return [max(1, int(n_max * imbalance ** (-k / (num_classes - 1))))
            for k in range(num_classes)]


def longtail_indices(labels: Sequence[int] | np.ndarray, num_classes: int, imbalance: float,
                     n_max: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices of a deterministic long-tailed subset of a (roughly balanced) labelled set.

    For class ``k`` the subset keeps the first ``n_k`` entries (``n_k`` from
    :func:`longtail_counts`) of a permutation of that class's indices, drawn from
    ``numpy.random.default_rng(seed)`` one class after the other in class order. ``n_max``
    defaults to the size of the smallest class. Returns the kept indices sorted, as int64.

    >>> labels = [0, 1, 0, 1, 0, 1, 0, 1]
    >>> idx = longtail_indices(labels, num_classes=2, imbalance=4)
    >>> np.bincount(np.asarray(labels)[idx]).tolist()
    [4, 1]
    """
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-d (one class per sample), got shape {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    lab = lab.astype(np.int64, copy=False)
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        bad = lab[(lab < 0) | (lab >= num_classes)][0]
        raise ValueError(f"labels must be in [0, {num_classes}), found {bad}")
    sizes = np.bincount(lab, minlength=num_classes)
    if n_max is None:
        n_max = int(sizes.min())
        if n_max < 1:
            raise ValueError(f"class {int(sizes.argmin())} has no sample; every class needs "
                             f"at least one (sizes {sizes.tolist()})")
    counts = longtail_counts(n_max, num_classes, imbalance)
    short = [k for k in range(num_classes) if sizes[k] < counts[k]]
    if short:
        k = short[0]
        raise ValueError(f"class {k} has {int(sizes[k])} samples but the profile (n_max="
                         f"{n_max}, imbalance={imbalance}) needs {counts[k]}; "
                         f"{len(short)} class(es) too small: {short[:10]}")
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(np.flatnonzero(lab == k))[:counts[k]] for k in range(num_classes)]
    return np.sort(np.concatenate(kept)).astype(np.int64)
