"""LVIS v1 / v0.5 and COCO-format annotation files for detection and instance segmentation.

:func:`load_annotations` reads and checks a JSON file; :class:`LVISDetection` turns it into a
``torch.utils.data.Dataset`` of ``(image, target)`` pairs in torchvision's detection
convention; :func:`collate_detection` batches them as lists.

Conventions:

- **Classes.** The categories sorted by id get the contiguous indices ``0..K-1``
  (``category_ids[k]`` is the original id of index ``k``). Target ``labels`` are
  ``index + 1``: torchvision's detectors reserve label 0 for the background.
- **Boxes.** The file's ``[x, y, w, h]`` boxes (absolute pixels) are clipped to the image; an
  annotation whose box is non-finite or has ``w <= 0`` or ``h <= 0`` after clipping is a
  *documented skip*: it is dropped with one warning that counts them and names the first
  few annotation ids. Targets carry ``[x1, y1, x2, y2]``.
- **Masks.** ``segmentation`` may be polygons (a list of flat ``[x1, y1, x2, y2, ...]``
  lists), an uncompressed RLE (``{"size": [h, w], "counts": [ints]}``, column-major runs
  that start with zeros) or a compressed RLE (``counts`` a string). Polygons and uncompressed
  RLE are decoded with numpy here, so loading needs no evaluation package; compressed RLE
  needs ``faster-coco-eval`` (``pip install 'eqlosses[eval]'``). A polygon covers the pixels
  whose centre lies inside it (even-odd rule), the convention of the COCO mask API, which it
  reproduces exactly for axis-aligned rectangles.
- **Crowd regions** (COCO ``iscrowd: 1``; LVIS has none) are left out of targets and counts,
  as torchvision's detection references do.
- **Images without annotations** are kept (in LVIS they are valid negatives: the image says
  which classes are absent) unless ``skip_empty=True``.

Torch and numpy at import time; PIL when an image is loaded.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import pil_to_tensor
from .frequency import FrequencyGroups, image_counts, lvis_groups

__all__ = ["load_annotations", "validate_annotations", "segmentation_to_mask",
           "LVISDetection", "collate_detection", "FREQUENCY_SOURCES"]

_REQUIRED_KEYS = ("images", "annotations", "categories")
_SHOW = 5  # how many ids or paths an error or warning message lists
FREQUENCY_SOURCES = ("auto", "frequency", "image_count", "annotations")
_FREQ_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def _first(items: Sequence[Any], n: int = _SHOW) -> str:
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (", ..." if len(items) > n else "")


def validate_annotations(data: Any, source: str = "<annotations>") -> None:
    """Check the structure of an LVIS / COCO annotation dict; raise ``ValueError`` naming
    ``source`` (the file) and the offending ids.

    Checked: the top-level keys ``images``, ``annotations`` and ``categories`` (lists of
    objects with an ``id``); no duplicate id within each list; every image has a positive
    ``height`` and ``width``; every annotation names a known ``image_id`` and
    ``category_id`` and has a ``bbox`` of 4 numbers. Boxes are not judged here (see
    :func:`load_annotations`).

    >>> validate_annotations({"images": [], "annotations": [], "categories": []})
    >>> validate_annotations({"images": []}, source="x.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: x.json: missing top-level key(s) ['annotations', 'categories'] (...)
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object with keys 'images', "
                         f"'annotations' and 'categories', got {type(data).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{source}: missing top-level key(s) {missing} (an LVIS/COCO file has "
                         f"'images', 'annotations' and 'categories')")
    ids: Dict[str, set] = {}
    for key in _REQUIRED_KEYS:
        entries = data[key]
        if not isinstance(entries, list):
            raise ValueError(f"{source}: '{key}' must be a list, got {type(entries).__name__}")
        seen: set = set()
        dups: List[Any] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "id" not in entry:
                raise ValueError(f"{source}: {key}[{i}] must be an object with an 'id', got "
                                 f"{str(entry)[:80]}")
            if entry["id"] in seen:
                dups.append(entry["id"])
            seen.add(entry["id"])
        if dups:
            raise ValueError(f"{source}: duplicate {key} id(s) {_first(dups)} "
                             f"({len(dups)} duplicate(s)); ids must be unique")
        ids[key] = seen
    for img in data["images"]:
        for side in ("height", "width"):
            v = img.get(side)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{source}: image id {img['id']} must have a positive "
                                 f"'{side}', got {v!r}")
    for ann in data["annotations"]:
        aid = ann["id"]
        if ann.get("category_id") not in ids["categories"]:
            raise ValueError(f"{source}: annotation id {aid} has category_id "
                             f"{ann.get('category_id')!r}, which is not among the "
                             f"{len(ids['categories'])} categories of the file")
        if ann.get("image_id") not in ids["images"]:
            raise ValueError(f"{source}: annotation id {aid} has image_id "
                             f"{ann.get('image_id')!r}, which is not among the "
                             f"{len(ids['images'])} images of the file")
        box = ann.get("bbox")
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"{source}: annotation id {aid} must have a 'bbox' [x, y, w, h] of "
                             f"4 numbers, got {box!r}")


def _clip_boxes(data: dict, source: str) -> None:
    """Clip boxes to their image in place; drop (with one warning) the degenerate ones."""
    size = {img["id"]: (float(img["width"]), float(img["height"])) for img in data["images"]}
    kept, dropped = [], []
    for ann in data["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            dropped.append(ann["id"])
            continue
        iw, ih = size[ann["image_id"]]
        x1, y1 = min(max(x, 0.0), iw), min(max(y, 0.0), ih)
        x2, y2 = min(max(x + w, 0.0), iw), min(max(y + h, 0.0), ih)
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            dropped.append(ann["id"])
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        kept.append(ann)
    if dropped:
        warnings.warn(f"{source}: dropped {len(dropped)} annotation(s) whose box is degenerate "
                      f"(width or height <= 0 after clipping to the image, or not finite): "
                      f"annotation id(s) {_first(dropped)}", stacklevel=3)
        data["annotations"] = kept


def load_annotations(path: str | os.PathLike) -> dict:
    """Read an LVIS / COCO annotation JSON file, check it and clean its boxes.

    Checks are those of :func:`validate_annotations` (``ValueError`` naming the file and the
    ids). Boxes partly outside their image are clipped to it (``bbox`` rewritten); an
    annotation whose box is not finite or has ``w <= 0`` or ``h <= 0`` after clipping is
    dropped, with one ``UserWarning`` giving the count and the first few annotation ids.

    Args:
        path: the JSON file.

    Returns:
        The parsed dict, with the degenerate annotations removed.

    >>> import tempfile, json, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "tiny.json"
    >>> _ = f.write_text(json.dumps({
    ...     "images": [{"id": 1, "width": 10, "height": 8, "file_name": "a.png"}],
    ...     "categories": [{"id": 3, "name": "cat"}],
    ...     "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [-2, 1, 5, 4]}]}))
    >>> load_annotations(f)["annotations"][0]["bbox"]
    [0.0, 1.0, 3.0, 4.0]
    """
    source = str(path)
    data = read_json(path)
    validate_annotations(data, source)
    _clip_boxes(data, source)
    return data


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON file; ``ValueError`` naming the file when it is not valid JSON."""
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------

def _polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int
                      ) -> np.ndarray:
    """Union of polygons; a pixel is inside a polygon when its centre is (even-odd rule).

    Each row's centre line ``y = j + 0.5`` crosses the edges with ``min(y0, y1) < y <=
    max(y0, y1)``; pixel ``i`` of the row is inside when an odd number of crossings lie left
    of its centre ``i + 0.5`` (a parity prefix sum over the columns).
    """
    out = np.zeros((height, width), dtype=bool)
    yc = np.arange(height, dtype=np.float64) + 0.5
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64).reshape(-1)
        if p.size < 6 or p.size % 2:
            raise ValueError(f"a polygon must be a flat list of at least 3 (x, y) pairs, got "
                             f"{p.size} numbers")
        p = p.reshape(-1, 2)
        x0, y0 = p[:, 0], p[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
        edge, row = np.nonzero((lo[:, None] < yc[None, :]) & (yc[None, :] <= hi[:, None]))
        t = (yc[row] - y0[edge]) / (y1[edge] - y0[edge])  # never 0/0: crossing edges slope
        xs = x0[edge] + t * (x1[edge] - x0[edge])
        # first column whose centre is right of the crossing: i + 0.5 > xs
        col = np.clip(np.floor(xs + 0.5), 0, width).astype(np.int64)
        toggles = np.zeros((height, width + 1), dtype=np.int64)
        np.add.at(toggles, (row, col), 1)
        out |= (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)
    return out


def _rle_to_mask(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    runs = np.asarray(counts, dtype=np.int64)
    if runs.ndim != 1 or (runs.size and runs.min() < 0):
        raise ValueError("uncompressed RLE counts must be a flat list of non-negative ints")
    if int(runs.sum()) != height * width:
        raise ValueError(f"uncompressed RLE counts must sum to height * width = "
                         f"{height * width}, got {int(runs.sum())}")
    values = (np.arange(runs.size) % 2).astype(bool)  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, runs)
    return flat.reshape(width, height).T  # column-major (COCO)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode one LVIS / COCO ``segmentation`` into a ``uint8`` mask ``[height, width]``.

    Polygons (list of flat coordinate lists) and uncompressed RLE (``counts`` a list of run
    lengths, column-major, starting with a run of zeros) are decoded with numpy. Compressed
    RLE (``counts`` a string) needs ``faster_coco_eval.core.mask.decode``. An RLE's ``size``
    must be ``[height, width]``.

    >>> segmentation_to_mask([[1, 0, 3, 0, 3, 2, 1, 2]], height=3, width=4)
    array([[0, 1, 1, 0],
           [0, 1, 1, 0],
           [0, 0, 0, 0]], dtype=uint8)
    >>> segmentation_to_mask({"size": [3, 4], "counts": [3, 2, 1, 2, 4]}, 3, 4)
    array([[0, 1, 1, 0],
           [0, 1, 1, 0],
           [0, 0, 0, 0]], dtype=uint8)
    """
    if isinstance(segmentation, list):
        return _polygons_to_mask(segmentation, height, width).astype(np.uint8)
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise ValueError(f"segmentation must be a list of polygons or an RLE dict with "
                         f"'size' and 'counts', got {str(segmentation)[:80]}")
    size = [int(v) for v in segmentation.get("size", ())]
    if size != [height, width]:
        raise ValueError(f"RLE size must be [height, width] = {[height, width]}, got "
                         f"{segmentation.get('size')!r}")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        return _rle_to_mask(counts, height, width).astype(np.uint8)
    try:
        from faster_coco_eval.core import mask as mask_api
    except ImportError as e:
        raise ImportError("decoding a compressed RLE segmentation needs faster-coco-eval: "
                          "pip install 'eqlosses[eval]'") from e
    rle = {"size": size, "counts": counts}
    return np.ascontiguousarray(mask_api.decode(rle), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------

def _image_path(image_root: Path, img: dict, source: str) -> Path:
    if img.get("file_name"):
        return image_root / img["file_name"]
    url = img.get("coco_url")
    if url:
        parts = [p for p in urlparse(url).path.split("/") if p]
        if len(parts) >= 2:
            return image_root / parts[-2] / parts[-1]
        raise ValueError(f"{source}: image id {img['id']} has a coco_url {url!r} without a "
                         f"'<split>/<file>' path")
    raise ValueError(f"{source}: image id {img['id']} has neither 'file_name' nor 'coco_url'")


class LVISDetection(Dataset):
    """An LVIS v1 / v0.5 (or COCO-format) detection dataset: ``(image, target)`` pairs.

    Item ``i`` is ``(image, target)`` with ``image`` a float32 tensor ``[3, H, W]`` in
    ``[0, 1]`` and ``target`` a dict: ``boxes`` float32 ``[n, 4]`` (``x1, y1, x2, y2``,
    absolute pixels), ``labels`` int64 ``[n]`` (contiguous class index + 1; 0 is the
    background), ``image_id`` (int, the file's id), ``area`` float32 ``[n]`` (the file's
    ``area``, else the box area) and, with ``with_masks``, ``masks`` uint8 ``[n, H, W]``.
    ``transforms(image, target) -> (image, target)`` is applied last (torchvision v2 style).

    Image ``image_root / file_name`` when the image has a ``file_name``; otherwise (LVIS v1,
    which gives ``coco_url = http://images.cocodataset.org/train2017/000000391895.jpg``)
    ``image_root / "train2017/000000391895.jpg"``: the last two components of the URL. Every
    image file is checked at construction (one ``FileNotFoundError`` lists the missing ones);
    an image whose size on disk differs from the file's ``height`` / ``width`` raises
    ``ValueError`` when it is loaded.

    Args:
        ann_file: the LVIS / COCO JSON file (read with :func:`load_annotations`).
        image_root: the folder the image paths are relative to.
        with_masks: decode the instance masks into ``target["masks"]``.
        transforms: optional callable ``(image, target) -> (image, target)``.
        skip_empty: drop the images without (non-crowd) annotations. By default they are
            kept: in LVIS an image without annotations still tells which classes are absent.

    Attributes:
        category_ids: original category id of each contiguous index (categories sorted by id).
        class_names: category ``name`` of each contiguous index.
        num_classes: ``K``.
        images: the image records kept, in file order.

    Example:
        >>> import tempfile, json, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (6, 4)).save(root / "a.png")
        >>> _ = (root / "ann.json").write_text(json.dumps({
        ...     "images": [{"id": 5, "width": 6, "height": 4, "file_name": "a.png"}],
        ...     "categories": [{"id": 9, "name": "dog"}, {"id": 2, "name": "cat"}],
        ...     "annotations": [{"id": 1, "image_id": 5, "category_id": 9,
        ...                      "bbox": [1, 1, 2, 3], "area": 6.0}]}))
        >>> ds = LVISDetection(root / "ann.json", root)
        >>> ds.class_names, ds.num_classes
        (['cat', 'dog'], 2)
        >>> image, target = ds[0]
        >>> tuple(image.shape), target["boxes"].tolist(), target["labels"].tolist()
        ((3, 4, 6), [[1.0, 1.0, 3.0, 4.0]], [2])
    """

    def __init__(self, ann_file: str | os.PathLike, image_root: str | os.PathLike,
                 with_masks: bool = False,
                 transforms: Callable[[torch.Tensor, dict], Tuple[Any, Any]] | None = None,
                 skip_empty: bool = False) -> None:
        self.ann_file = str(ann_file)
        self.image_root = Path(image_root)
        self.with_masks = bool(with_masks)
        self.transforms = transforms
        data = load_annotations(ann_file)

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self._categories = categories
        self.category_ids: List[Any] = [c["id"] for c in categories]
        self.class_names: List[str] = [str(c.get("name", c["id"])) for c in categories]
        self.num_classes = len(categories)
        self._index = {cid: k for k, cid in enumerate(self.category_ids)}

        per_image: Dict[Any, List[dict]] = defaultdict(list)
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                per_image[ann["image_id"]].append(ann)
        self.images: List[dict] = [img for img in data["images"]
                                   if not (skip_empty and not per_image.get(img["id"]))]
        self._anns: List[List[dict]] = [per_image.get(img["id"], []) for img in self.images]
        self._paths = [_image_path(self.image_root, img, self.ann_file) for img in self.images]
        missing = [str(p) for p in self._paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{self.ann_file}: {len(missing)} of {len(self._paths)} "
                                    f"image file(s) not found under {self.image_root}: "
                                    f"{_first(missing)}")

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"LVISDetection({self.ann_file!r}, images={len(self)}, "
                f"num_classes={self.num_classes}, with_masks={self.with_masks})")

    def image_path(self, i: int) -> Path:
        """The file of image ``i``."""
        return self._paths[i]

    def __getitem__(self, i: int) -> Tuple[Any, Any]:
        from PIL import Image

        info = self.images[i]
        height, width = int(info["height"]), int(info["width"])
        path = self._paths[i]
        with Image.open(path) as im:
            if im.size != (width, height):
                raise ValueError(f"{path}: the image is {im.size[0]}x{im.size[1]} (width x "
                                 f"height) on disk but {self.ann_file} says {width}x{height} "
                                 f"for image id {info['id']}")
            image = pil_to_tensor(im)
        target = self._target(i, height, width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _target(self, i: int, height: int, width: int) -> Dict[str, Any]:
        anns = self._anns[i]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self._index[a["category_id"]] + 1 for a in anns],
                              dtype=torch.int64)
        area = torch.tensor([float(a["area"]) if "area" in a
                             else float(a["bbox"][2]) * float(a["bbox"][3]) for a in anns],
                            dtype=torch.float32)
        target: Dict[str, Any] = {"boxes": boxes, "labels": labels,
                                  "image_id": self.images[i]["id"], "area": area}
        if self.with_masks:
            masks = np.zeros((len(anns), height, width), dtype=np.uint8)
            for j, a in enumerate(anns):
                if "segmentation" not in a:
                    raise ValueError(f"{self.ann_file}: annotation id {a['id']} has no "
                                     f"'segmentation' (with_masks=True needs one)")
                try:
                    masks[j] = segmentation_to_mask(a["segmentation"], height, width)
                except ValueError as e:
                    raise ValueError(f"{self.ann_file}: annotation id {a['id']}: {e}") from None
            target["masks"] = torch.from_numpy(masks)
        return target

    # -- class statistics -----------------------------------------------------------------

    def image_labels(self) -> List[List[int]]:
        """Per image, the sorted contiguous class indices present (each once).

        This is the ``labels`` argument of :func:`eqlosses.data.repeat_factors` for LVIS
        repeat-factor sampling (with ``num_classes=self.num_classes``).
        """
        return [sorted({self._index[a["category_id"]] for a in anns}) for anns in self._anns]

    def class_image_counts(self) -> torch.Tensor:
        """Number of images of this dataset containing each class, int64 ``[K]``.

        Counted from the annotations (after the degenerate-box drops and ``skip_empty``);
        with the training file, ``counts / len(self)`` is EQL's class frequency.
        """
        return image_counts(self.image_labels(), self.num_classes)

    def frequency_groups(self, source: str = "auto") -> FrequencyGroups:
        """LVIS rare / common / frequent groups of the classes.

        The groups are ``rare`` (1-10 training images), ``common`` (11-100) and ``frequent``
        (> 100), from (``source="auto"`` takes the first available):

        - ``"frequency"``: the categories' ``frequency`` field (``'r'``, ``'c'``, ``'f'``;
          LVIS files carry the *training* groups, also in the validation file);
        - ``"image_count"``: the categories' ``image_count`` field, through
          :func:`eqlosses.data.lvis_groups`;
        - ``"annotations"``: :meth:`class_image_counts` of this file, through
          :func:`eqlosses.data.lvis_groups` (meaningful with the training file).

        A source is available when every category has the field.
        """
        if source not in FREQUENCY_SOURCES:
            raise ValueError(f"source must be one of {FREQUENCY_SOURCES}, got {source!r}")
        cats = self._categories
        has_freq = bool(cats) and all("frequency" in c for c in cats)
        has_count = bool(cats) and all("image_count" in c for c in cats)
        if source == "auto":
            source = "frequency" if has_freq else "image_count" if has_count else "annotations"
        if source == "frequency":
            if not has_freq:
                raise ValueError(f"{self.ann_file}: not every category has a 'frequency'")
            bad = [(c["id"], c["frequency"]) for c in cats if c["frequency"] not in _FREQ_NAMES]
            if bad:
                raise ValueError(f"{self.ann_file}: category frequency must be 'r', 'c' or "
                                 f"'f', got (id, frequency) {_first(bad)}")
            freq = [c["frequency"] for c in cats]
            bounds = lvis_groups(torch.zeros(self.num_classes, dtype=torch.int64)).bounds
            masks = {name: torch.tensor([f == code for f in freq], dtype=torch.bool)
                     for code, name in _FREQ_NAMES.items()}
            return FrequencyGroups(masks=masks, bounds=bounds)
        if source == "image_count":
            if not has_count:
                raise ValueError(f"{self.ann_file}: not every category has an 'image_count'")
            counts = torch.tensor([int(c["image_count"]) for c in cats], dtype=torch.int64)
            return lvis_groups(counts)
        return lvis_groups(self.class_image_counts())


def collate_detection(batch: Sequence[Tuple[Any, Any]]) -> Tuple[List[Any], List[Any]]:
    """Batch ``(image, target)`` pairs as ``(list of images, list of targets)``.

    Detection images differ in size, so they are not stacked (torchvision's detectors take
    lists). Use as ``DataLoader(dataset, collate_fn=collate_detection)``.

    >>> images, targets = collate_detection([("a", {"i": 0}), ("b", {"i": 1})])
    >>> images, targets
    (['a', 'b'], [{'i': 0}, {'i': 1}])
    """
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets
