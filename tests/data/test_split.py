"""Validation splits carved from the training data (eqlosses.data.split)."""

import numpy as np
import pytest

from eqlosses.data.longtail import longtail_indices
from eqlosses.data.split import balanced_holdout, stratified_holdout

#: a long-tailed label set: 50, 20, 7, 2 and 1 samples of classes 0..4, shuffled
LABELS = np.random.default_rng(3).permutation(np.repeat(np.arange(5), [50, 20, 7, 2, 1]))


def test_stratified_holdout_takes_the_fraction_of_every_class():
    train, val = stratified_holdout(LABELS, fraction=0.2)
    # round(0.2 n_k), at least 1, never the last image: 10, 4, 1 (round(1.4)), 1 (at least
    # one), 0 (a one-image class stays whole in training)
    assert np.bincount(LABELS[val], minlength=5).tolist() == [10, 4, 1, 1, 0]
    assert np.bincount(LABELS[train], minlength=5).tolist() == [40, 16, 6, 1, 1]


def test_stratified_holdout_is_disjoint_complete_and_sorted():
    train, val = stratified_holdout(LABELS, fraction=0.3, seed=5)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(LABELS)))
    assert train.dtype == val.dtype == np.int64
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()


def test_stratified_holdout_is_seeded_and_deterministic():
    a = stratified_holdout(LABELS, 0.2, seed=1)
    b = stratified_holdout(LABELS, 0.2, seed=1)
    c = stratified_holdout(LABELS, 0.2, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])  # another seed, other images (same class counts)
    assert np.bincount(LABELS[a[1]], minlength=5).tolist() == \
        np.bincount(LABELS[c[1]], minlength=5).tolist()


def test_min_per_class_and_bad_arguments():
    _, val = stratified_holdout(LABELS, fraction=0.01, min_per_class=3)
    assert np.bincount(LABELS[val], minlength=5).tolist() == [3, 3, 3, 1, 0]
    _, val = stratified_holdout(LABELS, fraction=0.01, min_per_class=0)
    assert np.bincount(LABELS[val], minlength=5).tolist() == [0, 0, 0, 0, 0]
    for fraction in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            stratified_holdout(LABELS, fraction)
    with pytest.raises(ValueError, match="min_per_class"):
        stratified_holdout(LABELS, 0.2, min_per_class=-1)
    with pytest.raises(ValueError, match="1-d"):
        stratified_holdout(LABELS.reshape(2, -1), 0.2)


def test_balanced_holdout_avoids_the_training_subset():
    labels = np.repeat(np.arange(3), 30)
    keep = longtail_indices(labels, 3, imbalance=10, n_max=20, seed=0)
    val = balanced_holdout(labels, keep, per_class=8, num_classes=3, seed=4)
    assert np.bincount(labels[val], minlength=3).tolist() == [8, 8, 8]
    assert not set(val.tolist()) & set(keep.tolist())
    assert np.array_equal(val, balanced_holdout(labels, keep, 8, 3, seed=4))
    assert not np.array_equal(val, balanced_holdout(labels, keep, 8, 3, seed=5))
    with pytest.raises(ValueError, match="class 0 has 10 samples"):
        balanced_holdout(labels, keep, per_class=11, num_classes=3)
