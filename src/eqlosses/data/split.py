"""Validation splits carved from the training data, so that settings are chosen without the
test set.

Two kinds, both seeded and stratified by class:

* :func:`stratified_holdout`: hold out a fraction of *each* class of the (long-tailed)
  training set. The validation set then has the training set's imbalance; a tail class keeps
  at least one training image.
* :func:`balanced_holdout`: draw the same number of images per class from the training-split
  images a long-tailed subset left out (Fashion-MNIST-LT keeps ``n_k <= n_max`` of the 6,000
  training images of each class). The training subset is unchanged, and the validation set is
  balanced like the test set, so tail-class accuracy is measured on as many images as
  head-class accuracy.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

__all__ = ["stratified_holdout", "balanced_holdout"]


def _labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-d (one class per sample), got shape {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.size and lab.min() < 0:
        raise ValueError(f"labels must be >= 0, found {int(lab.min())}")
    return lab.astype(np.int64, copy=False)


def stratified_holdout(labels: Sequence[int] | np.ndarray, fraction: float,
                       min_per_class: int = 1, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(train, val)``, holding out a fraction of every class.

    Class ``k`` with ``n_k`` samples gives ``v_k = min(max(round(fraction * n_k),
    min_per_class), n_k - 1)`` samples to validation: at least ``min_per_class``, but never
    its last training sample (a class with a single sample stays whole in training, and has
    none in validation). Which samples: the first ``v_k`` of a permutation of the class's
    indices drawn from ``numpy.random.default_rng(seed)``, one class after the other in class
    order, so the split depends only on the labels, ``fraction``, ``min_per_class`` and
    ``seed``. Both index arrays are sorted int64 and disjoint; together they cover every index.

    >>> train, val = stratified_holdout([0] * 10 + [1] * 3 + [2], fraction=0.2)
    >>> np.bincount(np.asarray([0] * 10 + [1] * 3 + [2])[val], minlength=3).tolist()
    [2, 1, 0]
    >>> len(train) + len(val)
    14
    """
    lab = _labels(labels)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, (int, np.integer)) \
            or min_per_class < 0:
        raise ValueError(f"min_per_class must be an integer >= 0, got {min_per_class!r}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for k in range(int(lab.max()) + 1 if lab.size else 0):
        idx = rng.permutation(np.flatnonzero(lab == k))
        n = idx.size
        v = min(max(int(round(fraction * n)), int(min_per_class)), max(n - 1, 0))
        val.append(idx[:v])
        train.append(idx[v:])
    empty = np.zeros(0, dtype=np.int64)
    return (np.sort(np.concatenate(train or [empty])).astype(np.int64),
            np.sort(np.concatenate(val or [empty])).astype(np.int64))


def balanced_holdout(labels: Sequence[int] | np.ndarray, exclude: Sequence[int] | np.ndarray,
                     per_class: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """``per_class`` indices of each class, none of them in ``exclude`` (sorted int64).

    For each class in order, the first ``per_class`` entries of a permutation (drawn from
    ``numpy.random.default_rng(seed)``) of that class's indices outside ``exclude``. Raises a
    ``ValueError`` naming the class when fewer than ``per_class`` are left.

    >>> labels = [0, 0, 0, 1, 1, 1]
    >>> val = balanced_holdout(labels, exclude=[0, 3], per_class=2, num_classes=2)
    >>> val.tolist()
    [1, 2, 4, 5]
    """
    lab = _labels(labels)
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) \
            or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
    free = np.ones(lab.size, dtype=bool)
    ex = np.asarray(exclude, dtype=np.int64)
    if ex.size and (ex.min() < 0 or ex.max() >= lab.size):
        raise ValueError(f"exclude holds indices outside [0, {lab.size})")
    free[ex] = False
    rng = np.random.default_rng(seed)
    val = []
    for k in range(num_classes):
        idx = np.flatnonzero((lab == k) & free)
        if idx.size < per_class:
            raise ValueError(f"class {k} has {idx.size} samples outside the training subset, "
                             f"fewer than the {per_class} per class asked for validation")
        val.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(val)).astype(np.int64)
