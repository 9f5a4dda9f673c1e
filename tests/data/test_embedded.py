from pathlib import Path

import numpy as np
import pytest

from eqlosses.data import (FASHION_MNIST_CLASSES, embedded_info, find_fashion_mnist,
                           load_embedded, load_fashion_mnist, longtail_counts,
                           longtail_indices)


def test_train_split_is_the_documented_long_tail():
    images, labels = load_embedded("train")
    expected = longtail_counts(1000, 10, 100)
    assert images.shape == (sum(expected), 28, 28) and images.dtype == np.uint8
    assert labels.shape == (sum(expected),) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=10).tolist() == expected
    assert images.max() > 200 and images.min() == 0  # real pixels, not a placeholder


def test_test_split_is_balanced():
    images, labels = load_embedded("test")
    assert images.shape == (3000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels, minlength=10).tolist() == [300] * 10


def test_info_records_how_it_was_made():
    info = embedded_info()
    assert (info["n_max"], info["imbalance"], info["seed"], info["test_per_class"]) == \
        (1000, 100.0, 0, 300)
    assert info["classes"] == list(FASHION_MNIST_CLASSES)
    assert info["train_counts"] == longtail_counts(1000, 10, 100)
    assert info["test_counts"] == [300] * 10
    assert np.all(np.diff(info["train_indices"]) > 0) and info["train_indices"].max() < 60000
    assert np.all(np.diff(info["test_indices"]) > 0) and info["test_indices"].max() < 10000
    text = Path(info["license"]).read_text()
    assert "Copyright (c) 2017 Zalando SE" in text and "Permission is hereby granted" in text
    assert Path(info["file"]).stat().st_size < 4_000_000


def test_bad_split():
    with pytest.raises(ValueError, match="got 'val'"):
        load_embedded("val")


def test_load_returns_independent_arrays():
    a, _ = load_embedded("test")
    a[:] = 0
    b, _ = load_embedded("test")
    assert b.any()


def test_embedded_matches_the_original_files_when_installed():
    try:
        root = find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files not installed; the embedded data is checked above")
    info = embedded_info()
    for split, imbalance, n_max in (("train", 100, 1000), ("test", 1, 300)):
        images, labels = load_fashion_mnist(root, split)
        emb_images, emb_labels = load_embedded(split)
        idx = info[f"{split}_indices"]
        # the shipped subset is what scripts/make_embedded_fashion_mnist.py draws
        np.testing.assert_array_equal(idx, longtail_indices(labels, 10, imbalance, n_max, 0))
        np.testing.assert_array_equal(emb_images, images[idx])
        np.testing.assert_array_equal(emb_labels, labels[idx])
