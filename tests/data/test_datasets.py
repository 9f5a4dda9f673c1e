import subprocess
import sys

import numpy as np
import pytest
import torch

from eqlosses.data import ArrayImageDataset, ImageListDataset, image_folder, load_embedded


@pytest.mark.slow  # a fresh interpreter: seconds
def test_core_import_does_not_load_pil_or_torchvision():
    code = ("import sys, eqlosses.data; "
            "print(sorted(m for m in ('PIL', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_array_dataset_grey_scales_to_unit_range():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    ds = ArrayImageDataset(images, [2])
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (1, 2, 2)
    torch.testing.assert_close(x, torch.tensor([[[0.0, 1.0], [0.2, 0.4]]]))
    assert y == 2 and isinstance(y, int)
    assert ds.labels.dtype == np.int64 and ds.num_classes == 3 and len(ds) == 1


def test_array_dataset_rgb_channels_first_and_normalised():
    images = np.zeros((2, 3, 4, 3), dtype=np.uint8)
    images[..., 0], images[..., 1], images[..., 2] = 255, 0, 51
    ds = ArrayImageDataset(torch.from_numpy(images), torch.tensor([0, 1]),
                           mean=[0.5, 0.0, 0.2], std=[0.5, 1.0, 0.1], num_classes=5)
    x, _ = ds[1]
    assert x.shape == (3, 3, 4)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert ds.num_classes == 5


def test_array_dataset_transform_sees_unit_range_before_normalisation():
    seen = []

    def flip(x):
        seen.append(float(x.max()))
        return x.flip(-1)

    images = np.array([[[0, 255]]], dtype=np.uint8)
    x, _ = ArrayImageDataset(images, [0], transform=flip, mean=0.5, std=0.5)[0]
    assert seen == [1.0]
    torch.testing.assert_close(x, torch.tensor([[[1.0, -1.0]]]))


def test_array_dataset_works_with_a_dataloader_on_embedded_data():
    images, labels = load_embedded("test")
    ds = ArrayImageDataset(images[:64], labels[:64])
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=np.zeros((2, 4, 4), np.float32), labels=[0, 1]), "uint8"),
    (dict(images=np.zeros((2, 4), np.uint8), labels=[0, 1]), r"\[N, H, W\]"),
    (dict(images=np.zeros((2, 4, 4, 2), np.uint8), labels=[0, 1]), r"\[N, H, W, 3\]"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=[0]), "expected 2 labels"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=[0, -1]), ">= 0, found -1"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=[0.0, 1.0]), "integers"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=[0, 3], num_classes=3),
     r"\[0, 3\), found 3"),
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8), labels=[0, 1], mean=[0.1, 0.2]),
     "mean must have 1 or 3 values"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=[0, 1], std=0.0), "std must be positive"),
])
def test_array_dataset_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArrayImageDataset(**kwargs)


def _save_png(path, colour, size=(5, 4)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_list_dataset_reads_paths_with_spaces_and_greyscale(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    _save_png(tmp_path / "train" / "a b.png", (255, 0, 0))
    (tmp_path / "train").mkdir(exist_ok=True)
    Image.new("L", (3, 2), 128).save(tmp_path / "train" / "grey.png")
    lst = tmp_path / "train.txt"
    lst.write_text("train/a b.png 3\n\n  train/grey.png\t0  \n")
    ds = ImageListDataset(tmp_path, lst)
    assert len(ds) == 2 and ds.labels.tolist() == [3, 0] and ds.labels.dtype == np.int64
    assert ds.num_classes == 4
    x, y = ds[0]
    assert y == 3 and x.shape == (3, 4, 5)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    x, y = ds[1]
    assert x.shape == (3, 2, 3)  # converted to RGB
    torch.testing.assert_close(x[:, 0, 0], torch.full((3,), 128 / 255))
    ds = ImageListDataset(tmp_path, lst, transform=lambda img: img.size, num_classes=10)
    assert ds[0] == ((5, 4), 3) and ds.num_classes == 10


def test_image_list_dataset_reports_missing_images_at_once(tmp_path):
    pytest.importorskip("PIL")
    _save_png(tmp_path / "ok.png", (0, 0, 0))
    lst = tmp_path / "list.txt"
    lst.write_text("ok.png 0\nmissing/one.jpg 1\nok.png 2\nmissing/two.jpg 1\n")
    with pytest.raises(FileNotFoundError) as e:
        ImageListDataset(tmp_path, lst)
    msg = str(e.value)
    assert msg.startswith("2 of the 4 images listed in") and str(lst) in msg
    assert "missing/one.jpg" in msg and "missing/two.jpg" in msg


def test_image_list_dataset_format_errors(tmp_path):
    pytest.importorskip("PIL")
    _save_png(tmp_path / "ok.png", (0, 0, 0))
    lst = tmp_path / "list.txt"
    for text, err, match in [
        ("ok.png 0\nok.png\n", ValueError, r"list.txt:2: expected 'path label'"),
        ("ok.png one\n", ValueError, "integer label"),
        ("ok.png -1\n", ValueError, ">= 0, found -1"),
        ("\n\n", ValueError, "no image listed"),
    ]:
        lst.write_text(text)
        with pytest.raises(err, match=match):
            ImageListDataset(tmp_path, lst)
    lst.write_text("ok.png 4\n")
    with pytest.raises(ValueError, match=r"\[0, 3\), found 4"):
        ImageListDataset(tmp_path, lst, num_classes=3)
    with pytest.raises(FileNotFoundError, match="image list file not found"):
        ImageListDataset(tmp_path, tmp_path / "none.txt")


def test_image_folder_labels_and_errors(tmp_path):
    pytest.importorskip("torchvision")
    _save_png(tmp_path / "imgs" / "cat" / "1.png", (10, 20, 30))
    _save_png(tmp_path / "imgs" / "dog" / "1.png", (0, 0, 0))
    _save_png(tmp_path / "imgs" / "dog" / "2.png", (0, 0, 0))
    ds = image_folder(tmp_path / "imgs")
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1, 1]
    x, y = ds[0]
    assert y == 0 and x.shape == (3, 4, 5)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([10, 20, 30]) / 255)

    with pytest.raises(FileNotFoundError, match="image folder not found"):
        image_folder(tmp_path / "absent")
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-directory"):
        image_folder(tmp_path / "flat")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no image file found"):
        image_folder(tmp_path / "empty")
