"""Build ``src/eqlosses/data/fashion_mnist_lt.npz``, the Fashion-MNIST subset shipped with eqlosses.

- ``train``: a long-tailed subset of the Fashion-MNIST training split, CIFAR-LT profile
  ``n_k = int(n_max * imbalance ** (-k / 9))`` with ``n_max = 1000``, ``imbalance = 100``,
  class 0 (T-shirt/top) the head and class 9 (Ankle boot) the tail;
- ``test``: a balanced subset of the test split, 300 images per class.

Both subsets come from :func:`eqlosses.data.longtail_indices` with ``seed = 0``, so the
content is a deterministic function of the Fashion-MNIST files. Pixels and labels are
unchanged. Run from the repository root after ``apt-get install dataset-fashion-mnist``
(or with ``--root`` / ``$EQLOSSES_FASHION_MNIST`` pointing at the four IDX files)::

    python scripts/make_embedded_fashion_mnist.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from eqlosses.data.idx import FASHION_MNIST_CLASSES, find_fashion_mnist, load_fashion_mnist
from eqlosses.data.longtail import longtail_counts, longtail_indices

N_MAX = 1000
IMBALANCE = 100.0
TEST_PER_CLASS = 300
SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "eqlosses" / "data" / \
    "fashion_mnist_lt.npz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="directory with the Fashion-MNIST IDX "
                        "files (default: $EQLOSSES_FASHION_MNIST, then "
                        "/usr/share/datasets/fashion-mnist)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz")
    args = parser.parse_args(argv)

    num_classes = len(FASHION_MNIST_CLASSES)
    print(f"reading Fashion-MNIST from {find_fashion_mnist(args.root)}")
    train_x, train_y = load_fashion_mnist(args.root, "train")
    test_x, test_y = load_fashion_mnist(args.root, "test")

    train_idx = longtail_indices(train_y, num_classes, IMBALANCE, n_max=N_MAX, seed=SEED)
    test_idx = longtail_indices(test_y, num_classes, 1.0, n_max=TEST_PER_CLASS, seed=SEED)
    train_counts = np.bincount(train_y[train_idx], minlength=num_classes)
    test_counts = np.bincount(test_y[test_idx], minlength=num_classes)
    assert train_counts.tolist() == longtail_counts(N_MAX, num_classes, IMBALANCE)
    assert test_counts.tolist() == [TEST_PER_CLASS] * num_classes

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        train_images=train_x[train_idx], train_labels=train_y[train_idx].astype(np.uint8),
        train_indices=train_idx.astype(np.int32),
        test_images=test_x[test_idx], test_labels=test_y[test_idx].astype(np.uint8),
        test_indices=test_idx.astype(np.int32),
        classes=np.array(FASHION_MNIST_CLASSES),
        n_max=np.int64(N_MAX), imbalance=np.float64(IMBALANCE), seed=np.int64(SEED),
        test_per_class=np.int64(TEST_PER_CLASS),
    )
    print(f"train: {int(train_counts.sum())} images, per class {train_counts.tolist()}")
    print(f"test:  {int(test_counts.sum())} images, per class {test_counts.tolist()}")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
