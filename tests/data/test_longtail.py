import numpy as np
import pytest
import torch

from eqlosses.data import longtail_counts, longtail_indices


def test_counts_follow_the_exponential_profile():
    counts = longtail_counts(1000, 10, 100)
    assert counts == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    # n_k = int(n_max * rho^(-k / (C - 1))): the ratio head / tail is the imbalance
    assert counts[0] / counts[-1] == 100
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert longtail_counts(500, 100, 100)[:2] == [500, int(500 * 100 ** (-1 / 99))]


def test_counts_balanced_single_class_and_floor_of_one():
    assert longtail_counts(7, 4, 1) == [7, 7, 7, 7]
    assert longtail_counts(7, 1, 50) == [7]
    assert longtail_counts(3, 5, 1000) == [3, 1, 1, 1, 1]  # never below 1


@pytest.mark.parametrize("args, match", [
    ((0, 10, 10), "n_max"), ((10.5, 10, 10), "n_max"), ((10, 0, 10), "num_classes"),
    ((10, 10, 0.5), "imbalance"), ((10, 10, float("inf")), "imbalance"),
])
def test_counts_validate_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        longtail_counts(*args)


def _balanced(per_class=20, num_classes=5, seed=3):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def test_indices_give_the_profile_and_are_sorted_unique_int64():
    labels = _balanced()
    idx = longtail_indices(labels, 5, imbalance=10)
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=5).tolist() == longtail_counts(20, 5, 10)
    idx = longtail_indices(labels, 5, imbalance=10, n_max=8)
    assert np.bincount(labels[idx], minlength=5).tolist() == longtail_counts(8, 5, 10)


def test_indices_are_deterministic_and_nested_by_seed():
    labels = torch.as_tensor(_balanced())
    a = longtail_indices(labels, 5, 10, seed=1)
    np.testing.assert_array_equal(a, longtail_indices(labels.numpy(), 5, 10, seed=1))
    assert not np.array_equal(a, longtail_indices(labels, 5, 10, seed=2))
    # the same permutation is cut shorter for a stronger imbalance: subsets are nested
    b = longtail_indices(labels, 5, 20, seed=1)
    assert set(b.tolist()) <= set(a.tolist())


def test_indices_follow_the_documented_construction():
    labels = _balanced(per_class=6, num_classes=3)
    rng = np.random.default_rng(7)
    expected = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:n]
                                       for k, n in enumerate(longtail_counts(6, 3, 6))]))
    np.testing.assert_array_equal(longtail_indices(labels, 3, 6, seed=7), expected)


def test_indices_errors():
    labels = np.array([0, 0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="class 1 has 2 samples .* needs 3"):
        longtail_indices(labels, 3, imbalance=1, n_max=3)
    with pytest.raises(ValueError, match="class 2 has no sample"):
        longtail_indices(np.array([0, 1]), 3, imbalance=2)
    with pytest.raises(ValueError, match=r"in \[0, 2\), found 2"):
        longtail_indices(labels, 2, imbalance=2)
    with pytest.raises(ValueError, match="integers"):
        longtail_indices(np.array([0.0, 1.0]), 2, imbalance=2)
    with pytest.raises(ValueError, match="1-d"):
        longtail_indices(np.zeros((2, 2), np.int64), 2, imbalance=2)
