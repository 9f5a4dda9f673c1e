"""IDX files (the MNIST / Fashion-MNIST format) and the Fashion-MNIST files on disk.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim``
big-endian uint32 dimension sizes, then the ``prod(dims)`` values, big-endian, row-major.
Files may be gzip-compressed (detected from the content, not the name). Numpy only.

Fashion-MNIST (Xiao et al., 2017; MIT licence, Copyright (c) 2017 Zalando SE) is found in,
in this order: the ``root`` argument, the ``EQLOSSES_FASHION_MNIST`` environment variable, and
``/usr/share/datasets/fashion-mnist``, where the Debian/Ubuntu package
``dataset-fashion-mnist`` installs ``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
``t10k-labels-idx1-ubyte.gz``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "FASHION_MNIST_CLASSES", "FASHION_MNIST_ENV", "FASHION_MNIST_DEFAULT",
           "find_fashion_mnist", "load_fashion_mnist"]

# dtype code -> big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_ENV = "EQLOSSES_FASHION_MNIST"
FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into a native-endian numpy array.

    Checks the magic number (two zero bytes, a known dtype code, ``ndim >= 1``) and that the
    payload holds exactly ``prod(dims)`` values; every error names the file.

    >>> import tempfile, struct
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = Path(d) / "x-idx1-ubyte"
    ...     _ = p.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 3) + bytes([7, 8, 9]))
    ...     read_idx(p)
    array([7, 8, 9], dtype=uint8)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file, {len(data)} bytes is shorter than the "
                         f"4-byte magic number")
    zero0, zero1, code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(f"{path}: bad IDX magic number 0x{data[:4].hex()}, expected "
                         f"0x0000<dtype code><ndim> (first two bytes zero)")
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X}, expected one of {known}")
    if ndim < 1:
        raise ValueError(f"{path}: IDX header declares 0 dimensions, expected at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header, expected {header} bytes for {ndim} "
                         f"dimensions, found {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "trailing bytes after"
        raise ValueError(f"{path}: {what} IDX payload, header {dims} x {dtype.itemsize} byte(s) "
                         f"expects {expected} bytes, found {found}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # a writable native-endian copy


def _file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _missing(directory: Path) -> list[str]:
    return [s for s in _STEMS if _file(directory, s) is None]


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The directory holding the four Fashion-MNIST IDX files (raw or ``.gz``).

    Looks in ``root`` if given, else in ``$EQLOSSES_FASHION_MNIST`` if set, else in
    ``/usr/share/datasets/fashion-mnist`` (the Debian package ``dataset-fashion-mnist``).
    In each, the files may also be in torchvision's ``FashionMNIST/raw`` sub-directory.
    """
    if root is not None:
        base, origin = Path(root), "data.root / root argument"
    elif os.environ.get(FASHION_MNIST_ENV):
        base, origin = Path(os.environ[FASHION_MNIST_ENV]), f"${FASHION_MNIST_ENV}"
    else:
        base, origin = FASHION_MNIST_DEFAULT, "default location"
    for directory in (base, base / "FashionMNIST" / "raw"):
        if directory.is_dir() and not _missing(directory):
            return directory
    missing = _missing(base) if base.is_dir() else list(_STEMS)
    found = "the directory does not exist" if not base.is_dir() else \
        f"missing {', '.join(m + '[.gz]' for m in missing)}"
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {base} ({origin}): {found}. Install it with "
        f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, files in "
        f"{FASHION_MNIST_DEFAULT}, found there by default), or download the four files from "
        f"https://github.com/zalandoresearch/fashion-mnist and point to their directory: "
        f"--set data.root=DIR on the eqlosses command line, root=DIR in Python, or "
        f"${FASHION_MNIST_ENV}=DIR in the environment. The embedded long-tailed subset "
        f"(data.name=embedded, the default; eqlosses.data.load_embedded) needs no download.")


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of one split.

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000, the ``t10k`` files). The
    directory is found by :func:`find_fashion_mnist`; the class names are
    :data:`FASHION_MNIST_CLASSES`.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = find_fashion_mnist(root)
    prefix = _SPLIT_PREFIX[split]
    img_path = _file(directory, f"{prefix}-images-idx3-ubyte")
    lab_path = _file(directory, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected uint8 images [N, 28, 28], found "
                         f"{images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{lab_path}: expected {images.shape[0]} labels (one per image in "
                         f"{img_path.name}), found shape {list(labels.shape)}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise ValueError(f"{lab_path}: labels must be in [0, {len(FASHION_MNIST_CLASSES)}), "
                         f"found {int(labels.min())}..{int(labels.max())}")
    return images, labels
