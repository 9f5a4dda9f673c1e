import gzip
import struct

import numpy as np
import pytest

from eqlosses.data import FASHION_MNIST_CLASSES, find_fashion_mnist, load_fashion_mnist, read_idx
from eqlosses.data.idx import FASHION_MNIST_DEFAULT, FASHION_MNIST_ENV

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
          np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file written from the format description (independently of read_idx)."""
    header = bytes([0, 0, _CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I",
                                                                       *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path, arr, gz=False):
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32,
                                   np.float64])
def test_round_trip_raw_and_gzip(tmp_path, dtype, gz):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(write(tmp_path / ("a.gz" if gz else "a"), arr, gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 1  # a writable copy


def test_gzip_is_detected_from_content_not_name(tmp_path):
    arr = np.array([1, 2, 3], np.int32)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "labels", arr, gz=True)), arr)


def test_bad_magic(tmp_path):
    p = tmp_path / "bad-idx1-ubyte"
    p.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match=r"bad-idx1-ubyte: bad IDX magic number 0x01000801"):
        read_idx(p)
    p.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match="unknown IDX dtype code 0x07"):
        read_idx(p)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(p)


def test_truncated_payload_header_and_trailing_bytes(tmp_path):
    good = idx_bytes(np.zeros((4, 5), np.uint8))
    p = tmp_path / "short.gz"
    p.write_bytes(gzip.compress(good[:-3]))
    with pytest.raises(ValueError, match=r"short.gz: truncated IDX payload.*expects 20 bytes, "
                                         r"found 17"):
        read_idx(p)
    p = tmp_path / "header"
    p.write_bytes(good[:9])
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(p)
    p = tmp_path / "long"
    p.write_bytes(good + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(p)


def test_corrupt_gzip_and_missing_file(tmp_path):
    p = tmp_path / "cut.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:20])
    with pytest.raises(ValueError, match="cut.gz: corrupt or truncated gzip"):
        read_idx(p)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        read_idx(tmp_path / "nothing-here")


def _fake_fashion(directory, n_train=6, n_test=4, gz=True):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        suffix = ".gz" if gz else ""
        write(directory / f"{prefix}-images-idx3-ubyte{suffix}",
              rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        write(directory / f"{prefix}-labels-idx1-ubyte{suffix}",
              (np.arange(n) % 10).astype(np.uint8), gz)
    return directory


@pytest.mark.parametrize("gz", [False, True])
def test_load_fake_fashion_mnist(tmp_path, gz):
    root = _fake_fashion(tmp_path / "fm", gz=gz)
    images, labels = load_fashion_mnist(root, "train")
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4, 5]
    images, labels = load_fashion_mnist(root, "test")
    assert images.shape == (4, 28, 28) and labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        load_fashion_mnist(root, "val")


def test_find_order_root_env_default_and_torchvision_layout(tmp_path, monkeypatch):
    a = _fake_fashion(tmp_path / "a")
    b = _fake_fashion(tmp_path / "b" / "FashionMNIST" / "raw")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(a))
    assert find_fashion_mnist() == a
    assert find_fashion_mnist(tmp_path / "b") == b  # the argument wins; torchvision's layout
    monkeypatch.delenv(FASHION_MNIST_ENV)
    if FASHION_MNIST_DEFAULT.is_dir():
        assert find_fashion_mnist() == FASHION_MNIST_DEFAULT
    else:
        with pytest.raises(FileNotFoundError, match="default location"):
            find_fashion_mnist()


def test_find_errors_say_what_is_missing_and_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        find_fashion_mnist()
    msg = str(e.value)
    assert "nowhere" in msg and FASHION_MNIST_ENV in msg and "does not exist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    root = _fake_fashion(tmp_path / "partial")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[.gz\]"):
        load_fashion_mnist(root, "train")


def test_mismatched_label_count(tmp_path):
    root = _fake_fashion(tmp_path / "fm")
    write(root / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8), gz=True)
    with pytest.raises(ValueError, match="expected 6 labels"):
        load_fashion_mnist(root, "train")


def test_real_fashion_mnist_when_installed():
    try:
        root = find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files not installed (apt-get install dataset-fashion-mnist "
                    f"or set {FASHION_MNIST_ENV})")
    images, labels = load_fashion_mnist(root, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"
