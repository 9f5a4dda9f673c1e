"""The Fashion-MNIST long-tailed subset shipped inside the package (no download needed).

``fashion_mnist_lt.npz`` (about 2.5 MB) holds

- ``train``: 2,478 images of the Fashion-MNIST training split, a long-tailed subset with the
  CIFAR-LT profile ``n_k = int(1000 * 100 ** (-k / 9))`` = 1000, 599, 359, 215, 129, 77, 46,
  27, 16, 10 (class 0 "T-shirt/top" the head, class 9 "Ankle boot" the tail);
- ``test``: 3,000 images of the Fashion-MNIST test split, 300 per class.

Both were drawn by :func:`eqlosses.data.longtail_indices` with seed 0
(``scripts/make_embedded_fashion_mnist.py``); pixels and labels are unchanged. Fashion-MNIST
is MIT licensed, Copyright (c) 2017 Zalando SE: see ``FASHION_MNIST_LICENSE.txt`` next to
the data file. Numpy only.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

__all__ = ["EMBEDDED_FILE", "load_embedded", "embedded_info"]

EMBEDDED_FILE = "fashion_mnist_lt.npz"


def _load() -> dict[str, np.ndarray]:
    ref = resources.files("eqlosses.data").joinpath(EMBEDDED_FILE)
    if not ref.is_file():
        raise FileNotFoundError(
            f"the embedded data file {EMBEDDED_FILE} is missing from the eqlosses.data "
            f"package; reinstall eqlosses, or rebuild it with "
            f"scripts/make_embedded_fashion_mnist.py")
    with ref.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def load_embedded(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Embedded Fashion-MNIST images ``uint8 [N, 28, 28]`` and labels ``int64 [N]``.

    ``split="train"`` is the long-tailed training subset (imbalance 100, 2,478 images),
    ``split="test"`` the balanced test subset (300 per class).

    >>> images, labels = load_embedded("train")
    >>> images.shape, images.dtype, np.bincount(labels).tolist()
    ((2478, 28, 28), dtype('uint8'), [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10])
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = _load()
    return data[f"{split}_images"], data[f"{split}_labels"].astype(np.int64)


def embedded_info() -> dict:
    """How the embedded subset was made: source, classes, parameters and per-class counts.

    Keys: ``dataset``, ``classes``, ``n_max``, ``imbalance``, ``seed``, ``test_per_class``,
    ``train_counts``, ``test_counts``, ``train_indices`` and ``test_indices`` (the positions
    of the kept images in the original Fashion-MNIST splits, int64 arrays), ``file`` and
    ``license``.

    >>> info = embedded_info()
    >>> info["n_max"], info["imbalance"], info["seed"], info["test_counts"][:3]
    (1000, 100.0, 0, [300, 300, 300])
    """
    data = _load()
    classes = [str(c) for c in data["classes"]]
    base = resources.files("eqlosses.data")
    return {
        "dataset": "Fashion-MNIST",
        "classes": classes,
        "n_max": int(data["n_max"]),
        "imbalance": float(data["imbalance"]),
        "seed": int(data["seed"]),
        "test_per_class": int(data["test_per_class"]),
        "train_counts": np.bincount(data["train_labels"], minlength=len(classes)).tolist(),
        "test_counts": np.bincount(data["test_labels"], minlength=len(classes)).tolist(),
        "train_indices": data["train_indices"].astype(np.int64),
        "test_indices": data["test_indices"].astype(np.int64),
        "file": str(base.joinpath(EMBEDDED_FILE)),
        "license": str(base.joinpath("FASHION_MNIST_LICENSE.txt")),
    }
