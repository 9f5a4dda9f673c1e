"""Semantic segmentation data: ADE20K-style folders, paired transforms, class pixel statistics.

Layout (the ADE20K scene-parsing layout, ``ADEChallengeData2016``)::

    root/images/<split>/<stem>.jpg|.jpeg|.png       RGB (or grey) images
    root/annotations/<split>/<stem>.png             single-channel class maps (mode L or P)

Label conventions, both explicit arguments:

- ``reduce_zero_label=True`` (ADE20K): file value 0 is "other / unlabelled" and becomes
  ``ignore_index``; file value ``k`` in ``[1, C]`` becomes class ``k - 1``.
- ``reduce_zero_label=False`` (our embedded benchmark): file value ``k`` in ``[0, C)`` is class
  ``k`` (class 0 is a real class, e.g. "background").

In both, a file value equal to ``ignore_index`` (255 by default) is ignored; any other value is
an error naming the file. Targets are int64 ``[H, W]`` with ignored pixels set to
``ignore_index``; pass the same ``ignore_index`` to the loss and the metric.

Augmentation is deterministic and resumable: the randomness of item ``i`` in epoch ``e`` is a
pure function of ``(seed, e, i)`` (:func:`item_seed`), as with the classification task's
``SeededAugment``. Call ``dataset.set_epoch(e)`` at the start of each epoch (with DataLoader
workers, before the epoch's iterator is created and without ``persistent_workers``).

The class statistics (:func:`pixel_counts`, :func:`image_counts`, :func:`image_labels`) read the
annotation files only (no image decoding, no augmentation) and are cached on the dataset.

Needs numpy and torch; PIL is imported when a file is opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .seeding import item_seed

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SegTransforms", "SegmentationFolder", "ade20k",
           "image_counts", "image_labels", "item_seed", "pixel_counts",
           "segmentation_folder_from_meta"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_SHOW = 5  # file names listed in an error message

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Per-item seeds
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# Paired transforms
# --------------------------------------------------------------------------------------------

def _per_channel(value: Optional[Sequence[float]], name: str) -> Optional[torch.Tensor]:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 values, got {t.numel()}")
    return t.view(-1, 1, 1)


def _nearest_rows(n_in: int, n_out: int) -> torch.Tensor:
    """Source index of each output row for a nearest resize with pixel centres aligned (the
    same geometry as bilinear with ``align_corners=False``)."""
    idx = torch.floor((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out))
    return idx.long().clamp_(0, n_in - 1)


class SegTransforms:
    """Paired image / mask transforms that keep the two aligned.

    Training (``train=True``), in order:

    1. normalise the image: ``(image - mean) / std`` (skipped when ``mean`` and ``std`` are
       None);
    2. random scale by ``s ~ U(scale_range)`` of the image's own size: image bilinear
       (antialiased when shrinking), mask nearest (same pixel-centre geometry);
    3. pad bottom / right up to ``crop_size``: image with 0 (the mean colour once normalised),
       mask with ``ignore_index``;
    4. random ``crop_size`` x ``crop_size`` crop; with ``cat_max_ratio`` the crop is redrawn
       (up to 10 times) while one class covers more than that share of its labelled pixels
       (mmsegmentation's ADE20K recipe uses 0.75);
    5. horizontal flip with probability 0.5 (when ``flip``).

    Evaluation (``train=False``): normalisation only (whole images, labels untouched).

    ``__call__(image [3, H, W] float, target [H, W] int64, generator=None)`` draws all of its
    randomness from ``generator`` (the global torch RNG when None), so a generator seeded with
    :func:`item_seed` makes the result a pure function of ``(seed, epoch, index)``.

    >>> t = SegTransforms(train=True, crop_size=8, mean=None, std=None)
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = t(torch.rand(3, 5, 6), torch.zeros(5, 6, dtype=torch.long), generator=g)
    >>> tuple(x.shape), tuple(y.shape)
    ((3, 8, 8), (8, 8))
    """

    def __init__(self, train: bool, crop_size: Optional[int] = None,
                 scale_range: Tuple[float, float] = (0.5, 2.0), flip: bool = True,
                 mean: Optional[Sequence[float]] = IMAGENET_MEAN,
                 std: Optional[Sequence[float]] = IMAGENET_STD, ignore_index: int = 255,
                 cat_max_ratio: Optional[float] = None) -> None:
        if crop_size is not None and (not isinstance(crop_size, int) or crop_size < 1):
            raise ValueError(f"crop_size must be a positive int or None, got {crop_size!r}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got "
                             f"{scale_range!r}")
        if cat_max_ratio is not None and not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio!r}")
        self.train, self.crop_size, self.scale_range = bool(train), crop_size, (lo, hi)
        self.flip, self.ignore_index, self.cat_max_ratio = flip, ignore_index, cat_max_ratio
        self.mean, self.std = _per_channel(mean, "mean"), _per_channel(std, "std")
        if self.std is not None and bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {self.std.flatten().tolist()}")

    def __repr__(self) -> str:
        return (f"SegTransforms(train={self.train}, crop_size={self.crop_size}, "
                f"scale_range={self.scale_range}, flip={self.flip}, "
                f"ignore_index={self.ignore_index}, cat_max_ratio={self.cat_max_ratio})")

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            image = image - self.mean
        if self.std is not None:
            image = image / self.std
        return image

    def __call__(self, image: torch.Tensor, target: torch.Tensor,
                 generator: Optional[torch.Generator] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        if image.dim() != 3 or target.dim() != 2 or image.shape[-2:] != target.shape:
            raise ValueError(f"expected image [3, H, W] and target [H, W] of the same size, got "
                             f"{tuple(image.shape)} and {tuple(target.shape)}")
        image = self.normalize(image.float())
        if not self.train:
            return image, target
        g = generator
        # 1. random scale
        lo, hi = self.scale_range
        s = lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))
        h, w = target.shape
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear",
                                  align_corners=False, antialias=(nh < h or nw < w))[0]
            target = target[_nearest_rows(h, nh)[:, None], _nearest_rows(w, nw)[None, :]]
        # 2. pad and crop
        if self.crop_size is not None:
            c = self.crop_size
            ph, pw = max(0, c - nh), max(0, c - nw)
            if ph or pw:
                image = F.pad(image, (0, pw, 0, ph), value=0.0)
                target = F.pad(target, (0, pw, 0, ph), value=self.ignore_index)
            image, target = self._crop(image, target, c, g)
        # 3. flip
        if self.flip and float(torch.rand((), generator=g)) < 0.5:
            image, target = image.flip(-1), target.flip(-1)
        return image.contiguous(), target.contiguous()

    def _crop(self, image, target, c, g):
        H, W = target.shape
        tries = 10 if self.cat_max_ratio is not None else 1
        for _ in range(tries):
            top = int(torch.randint(0, H - c + 1, (), generator=g))
            left = int(torch.randint(0, W - c + 1, (), generator=g))
            crop_t = target[top:top + c, left:left + c]
            if self.cat_max_ratio is None:
                break
            labelled = crop_t[crop_t != self.ignore_index]
            if labelled.numel() == 0:
                continue
            counts = torch.unique(labelled, return_counts=True)[1]
            if counts.numel() > 1 and float(counts.max()) / labelled.numel() < self.cat_max_ratio:
                break
        return image[:, top:top + c, left:left + c], crop_t


# --------------------------------------------------------------------------------------------
# The folder dataset
# --------------------------------------------------------------------------------------------

def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:_SHOW])
    return shown + (f" and {len(paths) - _SHOW} more" if len(paths) > _SHOW else "")


def _stems(folder: Path, extensions: Sequence[str]) -> dict:
    out: dict = {}
    dup: List[str] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in extensions:
            continue
        if p.stem in out:
            dup.append(f"{out[p.stem].name} / {p.name}")
        out[p.stem] = p
    if dup:
        raise ValueError(f"{folder}: several files share a name stem (which one is meant?): "
                         f"{', '.join(dup[:_SHOW])}")
    return out


class SegmentationFolder(Dataset):
    """Images and class maps in the ADE20K layout (see the module docstring).

    ``dataset[i]`` is ``(image, target)``: ``image`` float32 ``[3, H, W]`` in ``[0, 1]`` (or as
    the ``transforms`` leave it, e.g. normalised and cropped), ``target`` int64 ``[H, W]`` in
    ``[0, C)`` or ``ignore_index``. ``transforms(image, target, generator=g)`` receives a
    ``torch.Generator`` seeded with ``item_seed(seed, epoch, i)``; use :class:`SegTransforms`
    or any callable with that signature.

    The constructor pairs images and annotations by file stem and fails, naming the files,
    when an image has no annotation, an annotation has no image, or the split is empty. Loading
    an item fails, naming the file, when the mask size differs from the image's, the mask is
    not a single-channel (L) or palette (P) PNG, or it holds values that are not labels.

    Args:
        root: the dataset folder (``ADEChallengeData2016`` for ADE20K).
        split: sub-folder of ``image_dir`` and ``ann_dir`` (``training``, ``validation``).
        num_classes: ``C``, the classes after the label mapping.
        reduce_zero_label: file value 0 is ignored and ``k`` becomes ``k - 1`` (ADE20K).
        ignore_index: the ignore label in the targets and in the files; outside ``[0, C)``.
        transforms: paired transform (see above), or None.
        image_dir: sub-folder name of the images under ``root``.
        ann_dir: sub-folder name of the annotations under ``root``.
        class_names: ``C`` names (default ``"0"``, ``"1"``, ...).
        seed: base seed of the per-item randomness.

    Attributes: ``samples`` (list of ``(image path, annotation path)``), ``class_names``,
    ``num_classes``, ``ignore_index``, ``reduce_zero_label``, ``epoch``.
    """

    def __init__(self, root: PathLike, split: str, num_classes: int, reduce_zero_label: bool,
                 ignore_index: int = 255, transforms: Optional[Callable] = None,
                 image_dir: str = "images", ann_dir: str = "annotations",
                 class_names: Optional[Sequence[str]] = None, seed: int = 0) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index must lie outside the classes [0, {num_classes}), "
                             f"got {ignore_index}")
        top_file_value = num_classes if reduce_zero_label else num_classes - 1
        if top_file_value > 255:
            extra = " and the zero label" if reduce_zero_label else ""
            raise ValueError(f"{num_classes} classes{extra} do not fit in 8-bit annotation "
                             f"files (values 0-255)")
        if reduce_zero_label and ignore_index == num_classes:
            raise ValueError(f"with reduce_zero_label, file value {num_classes} is class "
                             f"{num_classes - 1}; choose another ignore_index (e.g. 255)")
        t_ignore = getattr(transforms, "ignore_index", ignore_index)
        if t_ignore != ignore_index:
            raise ValueError(f"the transforms pad masks with ignore_index={t_ignore} but the "
                             f"dataset uses {ignore_index}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"expected {num_classes} class names, got {len(class_names)}")
        self.root, self.split = Path(root), split
        self.num_classes, self.reduce_zero_label = num_classes, bool(reduce_zero_label)
        self.ignore_index, self.transforms, self.seed = int(ignore_index), transforms, int(seed)
        self.class_names = (list(class_names) if class_names is not None
                            else [str(i) for i in range(num_classes)])
        self.epoch = 0
        self.image_folder = self.root / image_dir / split
        self.ann_folder = self.root / ann_dir / split
        for folder, what in ((self.image_folder, "image"), (self.ann_folder, "annotation")):
            if not folder.is_dir():
                raise FileNotFoundError(f"{what} folder not found: {folder} (expected "
                                        f"root/{image_dir}/<split>/*.jpg|png and "
                                        f"root/{ann_dir}/<split>/*.png under root={self.root})")
        images = _stems(self.image_folder, IMAGE_EXTENSIONS)
        anns = _stems(self.ann_folder, (".png",))
        if not images and not anns:
            raise FileNotFoundError(f"split {split!r} is empty: no image (.jpg/.jpeg/.png) in "
                                    f"{self.image_folder} and no annotation (.png) in "
                                    f"{self.ann_folder}")
        no_ann = [images[s] for s in images if s not in anns]
        if no_ann:
            raise FileNotFoundError(f"{len(no_ann)} of the {len(images)} images in "
                                    f"{self.image_folder} have no annotation <stem>.png in "
                                    f"{self.ann_folder}: {_names(no_ann)}")
        no_img = [anns[s] for s in anns if s not in images]
        if no_img:
            raise FileNotFoundError(f"{len(no_img)} of the {len(anns)} annotations in "
                                    f"{self.ann_folder} have no image <stem>.jpg|.jpeg|.png "
                                    f"in {self.image_folder}: {_names(no_img)}")
        self.samples: List[Tuple[Path, Path]] = [(images[s], anns[s]) for s in sorted(images)]
        # file value -> target label (valid marks the values that are labels)
        lut = np.full(256, self.ignore_index, dtype=np.int64)
        valid = np.zeros(256, dtype=bool)
        first = 1 if self.reduce_zero_label else 0
        lut[first:first + num_classes] = np.arange(num_classes)
        valid[:first + num_classes] = True          # with reduce_zero_label, 0 -> ignore
        if 0 <= self.ignore_index <= 255:
            valid[self.ignore_index] = True
        self._lut, self._valid = torch.from_numpy(lut), torch.from_numpy(valid)
        self._class_pixels: Optional[torch.Tensor] = None

    @classmethod
    def from_meta(cls, root: PathLike, split: str, transforms: Optional[Callable] = None,
                  seed: int = 0, **kwargs: Any) -> "SegmentationFolder":
        """Read ``root/classes.json`` (see :func:`segmentation_folder_from_meta`)."""
        return segmentation_folder_from_meta(root, split, transforms, seed=seed, **kwargs)

    def __repr__(self) -> str:
        return (f"SegmentationFolder(root={str(self.root)!r}, split={self.split!r}, "
                f"num_classes={self.num_classes}, reduce_zero_label={self.reduce_zero_label}, "
                f"ignore_index={self.ignore_index}, size={len(self)})")

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation :meth:`__getitem__` draws."""
        self.epoch = int(epoch)

    def load_image(self, index: int) -> torch.Tensor:
        """Image ``index`` as float32 ``[3, H, W]`` in ``[0, 1]`` (no transform)."""
        from PIL import Image

        with Image.open(self.samples[index][0]) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)

    def load_target(self, index: int) -> torch.Tensor:
        """Annotation ``index`` as int64 ``[H, W]`` after the label mapping (no transform)."""
        from PIL import Image

        path = self.samples[index][1]
        with Image.open(path) as ann:
            if ann.mode not in ("L", "P"):
                hint = (" (a colour-coded mask: convert it to a class-index map first)"
                        if ann.mode in ("RGB", "RGBA") else "")
                raise ValueError(f"{path}: annotation mode {ann.mode} is not supported; expected "
                                 f"a single-channel class map, mode L (grey values are the "
                                 f"labels) or P (palette indices are the labels){hint}")
            raw = torch.from_numpy(np.array(ann, dtype=np.uint8)).long()
        ok = self._valid[raw]
        if not bool(ok.all()):
            bad = torch.unique(raw[~ok]).tolist()
            shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
            allowed = (f"0 (ignored), 1-{self.num_classes}" if self.reduce_zero_label
                       else f"0-{self.num_classes - 1}")
            raise ValueError(f"{path}: label values {shown} are not classes; expected {allowed}"
                             f" or the ignore label {self.ignore_index} "
                             f"({self.num_classes} classes, reduce_zero_label="
                             f"{self.reduce_zero_label})")
        return self._lut[raw]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += len(self)
        image, target = self.load_image(index), self.load_target(index)
        if image.shape[-2:] != target.shape:
            img_path, ann_path = self.samples[index]
            raise ValueError(f"{ann_path}: mask size {target.shape[1]}x{target.shape[0]} "
                             f"(WxH) differs from image {img_path.name} size "
                             f"{image.shape[2]}x{image.shape[1]}")
        if self.transforms is not None:
            g = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
            image, target = self.transforms(image, target, generator=g)
        return image, target

    # ---- class statistics (annotations only, cached) ---------------------------------------

    def class_pixels(self) -> torch.Tensor:
        """Pixels of each class in each image, int64 ``[N, C]`` (read once, then cached)."""
        if self._class_pixels is None:
            c = self.num_classes
            rows = []
            for i in range(len(self)):
                t = self.load_target(i).reshape(-1)
                rows.append(torch.bincount(t[t != self.ignore_index], minlength=c)[:c])
            self._class_pixels = (torch.stack(rows) if rows
                                  else torch.zeros(0, c, dtype=torch.int64))
        return self._class_pixels

    def pixel_counts(self) -> torch.Tensor:
        """Labelled pixels of each class over the split, int64 ``[C]``."""
        return self.class_pixels().sum(dim=0)

    def image_counts(self) -> torch.Tensor:
        """Images containing each class, int64 ``[C]``."""
        return (self.class_pixels() > 0).sum(dim=0)

    def image_labels(self) -> List[List[int]]:
        """The classes present in each image (for repeat-factor sampling)."""
        return [row.nonzero().squeeze(1).tolist() for row in self.class_pixels()]


# --------------------------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------------------------

def _ade_class_names(root: Path) -> Optional[List[str]]:
    """The 150 names from ADEChallengeData2016/objectInfo150.txt when present."""
    info = root / "objectInfo150.txt"
    if not info.is_file():
        return None
    names: dict = {}
    try:
        for line in info.read_text(encoding="utf-8").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 5 and parts[0].strip().isdigit():
                names[int(parts[0])] = parts[-1].strip()
    except (OSError, UnicodeDecodeError):
        return None
    if sorted(names) != list(range(1, 151)):
        return None
    return [names[i] for i in range(1, 151)]


def ade20k(root: PathLike, split: str, transforms: Optional[Callable] = None, seed: int = 0,
           ignore_index: int = 255) -> SegmentationFolder:
    """ADE20K scene parsing (SceneParse150): 150 classes, file value 0 ignored, ``k -> k-1``.

    ``root`` is the ``ADEChallengeData2016`` folder or the folder that contains it;
    ``split`` is ``"training"`` (20,210 images) or ``"validation"`` (2,000). Class names come
    from ``objectInfo150.txt`` when the folder has it.
    """
    if split not in ("training", "validation"):
        raise ValueError(f"ADE20K split must be 'training' or 'validation', got {split!r}")
    root = Path(root)
    if not (root / "images").is_dir() and (root / "ADEChallengeData2016" / "images").is_dir():
        root = root / "ADEChallengeData2016"
    return SegmentationFolder(root, split, num_classes=150, reduce_zero_label=True,
                              ignore_index=ignore_index, transforms=transforms,
                              class_names=_ade_class_names(root), seed=seed)


def segmentation_folder_from_meta(root: PathLike, split: str,
                                  transforms: Optional[Callable] = None, seed: int = 0,
                                  **kwargs: Any) -> SegmentationFolder:
    """A :class:`SegmentationFolder` described by ``root/classes.json``.

    The file holds ``{"classes": [names...], "ignore_index": 255, "reduce_zero_label": false}``
    (the last two optional, with those defaults); ``num_classes`` is the number of names.
    ``kwargs`` go to :class:`SegmentationFolder` (``image_dir``, ``ann_dir``).
    """
    meta_file = Path(root) / "classes.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"class file not found: {meta_file} (expected {{\"classes\": "
                                f"[names...], \"ignore_index\": 255, \"reduce_zero_label\": "
                                f"false}})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_file}: not valid JSON ({e})") from None
    names = meta.get("classes") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{meta_file}: 'classes' must be a non-empty list of class names")
    ignore = meta.get("ignore_index", 255)
    reduce = meta.get("reduce_zero_label", False)
    if not isinstance(ignore, int) or isinstance(ignore, bool):
        raise ValueError(f"{meta_file}: 'ignore_index' must be an int, got {ignore!r}")
    if not isinstance(reduce, bool):
        raise ValueError(f"{meta_file}: 'reduce_zero_label' must be true or false, got "
                         f"{reduce!r}")
    return SegmentationFolder(root, split, num_classes=len(names), reduce_zero_label=reduce,
                              ignore_index=ignore, transforms=transforms, class_names=names,
                              seed=seed, **kwargs)


# --------------------------------------------------------------------------------------------
# Class statistics
# --------------------------------------------------------------------------------------------

def _folder_of(data: Any) -> Tuple[Optional[SegmentationFolder], Optional[List[int]]]:
    """(folder, indices) when ``data`` is a SegmentationFolder or a Subset of one."""
    if isinstance(data, SegmentationFolder):
        return data, None
    if isinstance(data, Subset):
        inner, idx = _folder_of(data.dataset)
        if inner is not None:
            sub = [int(i) for i in data.indices]
            return inner, (sub if idx is None else [idx[i] for i in sub])
    return None, None


def _per_image(data: Any, num_classes: Optional[int], ignore_index: Optional[int]
               ) -> torch.Tensor:
    folder, idx = _folder_of(data)
    if folder is not None:
        for name, given, own in (("num_classes", num_classes, folder.num_classes),
                                 ("ignore_index", ignore_index, folder.ignore_index)):
            if given is not None and given != own:
                raise ValueError(f"{name}={given} differs from the dataset's {own}")
        rows = folder.class_pixels()
        return rows if idx is None else rows[torch.as_tensor(idx, dtype=torch.long)]
    if num_classes is None:
        raise ValueError("num_classes is needed when the data is not a SegmentationFolder")
    ignore = 255 if ignore_index is None else ignore_index
    rows = []
    for item in data:
        if isinstance(item, (tuple, list)):          # (image, target) pairs
            item = item[1]
        t = torch.as_tensor(np.asarray(item) if not isinstance(item, torch.Tensor) else item)
        if t.is_floating_point():
            raise ValueError(f"masks must hold integer labels, got dtype {t.dtype}")
        t = t.reshape(-1).long()
        t = t[t != ignore]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            bad = torch.unique(t[(t < 0) | (t >= num_classes)]).tolist()[:10]
            raise ValueError(f"mask {len(rows)}: labels {bad} are outside [0, {num_classes}) "
                             f"and not the ignore label {ignore}")
        rows.append(torch.bincount(t, minlength=num_classes))
    return torch.stack(rows) if rows else torch.zeros(0, num_classes, dtype=torch.int64)


def pixel_counts(data: Any, num_classes: Optional[int] = None,
                 ignore_index: Optional[int] = None) -> torch.Tensor:
    """Labelled pixels of each class, int64 ``[C]``.

    ``data`` is a :class:`SegmentationFolder` (or a ``Subset`` of one: its raw annotations are
    read, no image is decoded, no augmentation applied; ``num_classes`` and ``ignore_index``
    default to the dataset's) or an iterable of integer masks (or ``(image, mask)`` pairs),
    for which ``num_classes`` is required and ``ignore_index`` defaults to 255.

    >>> pixel_counts([torch.tensor([[0, 1], [1, 255]])], num_classes=3)
    tensor([1, 2, 0])
    """
    return _per_image(data, num_classes, ignore_index).sum(dim=0)


def image_counts(data: Any, num_classes: Optional[int] = None,
                 ignore_index: Optional[int] = None) -> torch.Tensor:
    """Images containing each class (at least one pixel), int64 ``[C]``; ``data`` as in
    :func:`pixel_counts`.

    >>> image_counts([torch.tensor([[0, 1]]), torch.tensor([[1, 1]])], num_classes=3)
    tensor([1, 2, 0])
    """
    return (_per_image(data, num_classes, ignore_index) > 0).sum(dim=0)


def image_labels(data: Any, num_classes: Optional[int] = None,
                 ignore_index: Optional[int] = None) -> List[List[int]]:
    """The classes present in each image, sorted, e.g. for
    :func:`eqlosses.data.samplers.repeat_factors`; ``data`` as in :func:`pixel_counts`.

    >>> image_labels([torch.tensor([[2, 0]]), torch.tensor([[255]])], num_classes=3)
    [[0, 2], []]
    """
    return [row.nonzero().squeeze(1).tolist()
            for row in _per_image(data, num_classes, ignore_index)]
