"""Image classification datasets: in-memory arrays, list files (ImageNet-LT style), folders.

Every dataset exposes ``labels`` (numpy int64 ``[N]``, one class per sample, in sample order,
e.g. for :func:`eqlosses.data.class_counts` or :class:`eqlosses.data.LongTailSampler`) and
``num_classes``. Without a ``transform`` each returns ``(image, label)`` with ``image`` a float
tensor ``[C, H, W]`` in ``[0, 1]`` and ``label`` an ``int``.

:class:`ArrayImageDataset` needs torch and numpy only. :class:`ImageListDataset` imports PIL
when it loads an image, :func:`image_folder` imports torchvision when called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ArrayImageDataset", "ImageListDataset", "image_folder", "pil_to_tensor"]


def pil_to_tensor(image: Any) -> torch.Tensor:
    """A PIL image (converted to RGB) as a float tensor ``[3, H, W]`` in ``[0, 1]``."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _labels_array(labels: Any, n: int | None, what: str) -> np.ndarray:
    lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"{what}: labels must be 1-d, got shape {list(lab.shape)}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers, got dtype {lab.dtype}")
    if n is not None and lab.shape[0] != n:
        raise ValueError(f"{what}: expected {n} labels (one per image), found {lab.shape[0]}")
    lab = lab.astype(np.int64)
    if lab.size and lab.min() < 0:
        raise ValueError(f"{what}: labels must be >= 0, found {int(lab.min())}")
    return lab


def _num_classes(labels: np.ndarray, num_classes: int | None, what: str) -> int:
    top = int(labels.max()) + 1 if labels.size else 0
    if num_classes is None:
        return top
    if num_classes < top:
        raise ValueError(f"{what}: labels must be in [0, {num_classes}), found {top - 1}")
    return int(num_classes)


class ArrayImageDataset(Dataset):
    """Images held in memory as a ``uint8`` array ``[N, H, W]`` (grey) or ``[N, H, W, 3]``.

    Item ``i`` is ``(x, label)`` with ``x = (transform(images[i] / 255) - mean) / std``, a float
    tensor ``[C, H, W]`` (``C = 1`` or ``3``): the ``transform`` (optional) receives the
    ``[0, 1]`` float tensor (e.g. torchvision v2 crops and flips), then ``mean`` and ``std``
    (optional, one value or one per channel) normalise it.

    >>> ds = ArrayImageDataset(np.full((2, 4, 4), 255, np.uint8), [0, 3], mean=0.5, std=0.5)
    >>> x, y = ds[1]
    >>> tuple(x.shape), x.max().item(), y, ds.num_classes
    ((1, 4, 4), 1.0, 3, 4)
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray,
                 transform: Callable[[torch.Tensor], Any] | None = None,
                 mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None,
                 num_classes: int | None = None) -> None:
        imgs = images if isinstance(images, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(images))
        if imgs.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (0-255), got {imgs.dtype}")
        if imgs.dim() == 3:
            imgs = imgs.unsqueeze(1)                      # [N, 1, H, W]
        elif imgs.dim() == 4 and imgs.shape[-1] in (1, 3):
            imgs = imgs.permute(0, 3, 1, 2)               # [N, C, H, W] view
        else:
            raise ValueError(f"images must be [N, H, W] or [N, H, W, 3], got shape "
                             f"{list(imgs.shape)}")
        self.images = imgs
        self.labels = _labels_array(labels, imgs.shape[0], "ArrayImageDataset")
        self.num_classes = _num_classes(self.labels, num_classes, "ArrayImageDataset")
        self.transform = transform
        channels = imgs.shape[1]
        self.mean = self._per_channel(mean, channels, "mean")
        self.std = self._per_channel(std, channels, "std")
        if self.std is not None and bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {self.std.flatten().tolist()}")

    @staticmethod
    def _per_channel(value, channels: int, name: str) -> torch.Tensor | None:
        if value is None:
            return None
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
        if t.numel() not in (1, channels):
            raise ValueError(f"{name} must have 1 or {channels} values (one per channel), got "
                             f"{t.numel()}")
        return t.view(-1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x = self.images[index].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return x, int(self.labels[index])


class ImageListDataset(Dataset):
    """Images listed in a text file, the ImageNet-LT / Places-LT / iNaturalist-LT layout.

    Each non-empty line of ``list_file`` is ``relative/path.jpg label``: the label is the last
    whitespace-separated field (so paths may contain spaces), an integer ``>= 0``; paths are
    relative to ``root``. All images must exist: the constructor checks them and reports the
    missing ones in one :class:`FileNotFoundError`. Images are loaded with PIL and converted to
    RGB; ``transform`` receives the PIL image (default: a float tensor ``[3, H, W]`` in
    ``[0, 1]``, :func:`pil_to_tensor`). ``samples`` lists ``(path, label)``.
    """

    def __init__(self, root: str | os.PathLike, list_file: str | os.PathLike,
                 transform: Callable[[Any], Any] | None = None,
                 num_classes: int | None = None) -> None:
        self.root = Path(root)
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise FileNotFoundError(f"image list file not found: {self.list_file}")
        paths: list[Path] = []
        labels: list[int] = []
        with open(self.list_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                parts = line.rsplit(maxsplit=1)
                try:
                    if len(parts) != 2:
                        raise ValueError
                    label = int(parts[1])
                except ValueError:
                    raise ValueError(f"{self.list_file}:{lineno}: expected 'path label' with an "
                                     f"integer label, found {line!r}") from None
                if label < 0:
                    raise ValueError(f"{self.list_file}:{lineno}: labels must be >= 0, found "
                                     f"{label}")
                paths.append(self.root / parts[0])
                labels.append(label)
        if not paths:
            raise ValueError(f"{self.list_file}: no image listed")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{len(missing)} of the {len(paths)} images listed in "
                                    f"{self.list_file} are missing under {self.root}: "
                                    f"{shown}{more}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = _num_classes(self.labels, num_classes, str(self.list_file))
        self.samples = list(zip(paths, labels))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert("RGB")
        x = pil_to_tensor(img) if self.transform is None else self.transform(img)
        return x, label


def image_folder(root: str | os.PathLike, transform: Callable[[Any], Any] | None = None):
    """A torchvision ``ImageFolder`` (``root/<class name>/<image>``), classes sorted by name.

    Raises a :class:`FileNotFoundError` saying what is wrong when ``root`` is missing, has no
    class sub-directory, or holds no image. ``transform`` receives the RGB PIL image
    (default: :func:`pil_to_tensor`). The returned dataset also has ``labels`` (numpy int64)
    and ``num_classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (expected root/<class "
                                f"name>/<image files>)")
    if not any(p.is_dir() for p in root.iterdir()):
        raise FileNotFoundError(f"image folder {root} has no class sub-directory (expected "
                                f"root/<class name>/<image files>)")
    try:
        from torchvision.datasets import ImageFolder
    except ImportError as e:
        raise ImportError("image_folder needs torchvision: pip install 'eqlosses[vision]'"
                          ) from e
    try:
        ds = ImageFolder(str(root), transform=transform or pil_to_tensor)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image folder {root}: no image file found in its class "
                                f"sub-directories ({e})") from None
    ds.labels = np.asarray(ds.targets, dtype=np.int64)
    ds.num_classes = len(ds.classes)
    return ds
