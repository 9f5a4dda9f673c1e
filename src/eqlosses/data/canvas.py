"""A long-tailed detection / segmentation benchmark drawn from Fashion-MNIST items.

There is no LVIS-sized data on a laptop, so this module *generates* one deterministically on
the user's machine from the Fashion-MNIST images shipped with the package
(:mod:`eqlosses.data.embedded`): each canvas (``size x size`` RGB, a dark noisy background)
holds a few items, each item scaled, tinted and pasted with its silhouette as instance mask.

Classes are *item type x colour tint*: 10 Fashion-MNIST types x 6 tints = 60 classes, named
``"<type>|<tint>"``. Class ``k`` gets a long-tailed number of training instances

    n_k = max(1, round(n_max * imbalance ** (-rank_k / (K - 1))))

where ``rank_k`` is a seeded permutation of the classes (rarity is not tied to item type or
tint). Instances are shuffled and dealt to canvases of ``min_objects..max_objects`` items.
With the defaults (``n_max=200``, ``imbalance=200``) the LVIS frequency groups by training
*image* count are all populated with LVIS's own thresholds: rare 1-10, common 11-100,
frequent > 100 images. The validation canvases hold ``val_per_class`` instances of every
class (LVIS val covers every class too).

Items for training and validation canvases never overlap: per type, the last 100 items of the
embedded balanced test subset form the validation pool, all others the training pool. Later
items occlude earlier ones; masks, boxes and areas are those of the *visible* pixels, and an
item left with fewer than ``min_visible`` visible pixels is dropped before anything is
written (the counts in the files are always the written truth).

A *development* split, for choosing settings without reading the validation canvases (which
then serve as the test set), is carved from the training data when ``dev_per_class > 0``: per
type, the 100 items before the validation pool's leave the training pool and form the dev
pool, and ``dev_per_class`` instances of every class are dealt to dev canvases. Training, dev
and validation items are disjoint. With ``dev_per_class=0`` (the default) the training pool,
and so every training canvas, is what it always was; with a dev split the training canvases
differ (their pool is smaller), which the specification written next to the data records.

Two writers share the same scenes (same seed -> the same canvases):

- :func:`make_detection` writes LVIS v1 JSON (``annotations/lvis_v1_{train,val}.json``) and
  PNG images (``images/{train,val}/NNNNNN.png``); masks are uncompressed COCO RLE, every
  image is exhaustively annotated (``neg_category_ids`` = all absent classes), categories
  carry ``frequency`` / ``image_count`` / ``instance_count`` from the training split.
- :func:`make_segmentation` writes the ADE20K scene-parsing layout
  (``images/{training,validation}/NNNNNN.png``, ``annotations/{training,validation}/NNNNNN.png``)
  with class maps ``0 = background`` (a real class), ``k + 1`` = item class ``k``, ``255`` =
  ignore (unused by the generator), and ``classes.json``.

Fashion-MNIST is MIT licensed, Copyright (c) 2017 Zalando SE; the licence text is copied
next to the generated files. Numpy only (PIL to write PNGs).

Example:
    >>> import tempfile, json, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "det"
    >>> info = make_detection(out, n_max=12, imbalance=12, val_per_class=1, check_groups=False)
    >>> gt = json.loads((out / "annotations" / "lvis_v1_train.json").read_text())
    >>> len(gt["categories"]), gt["categories"][0]["name"]
    (60, 'T-shirt/top|red')
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, Iterator, List, Tuple, Union

import numpy as np

from .embedded import load_embedded
from .idx import FASHION_MNIST_CLASSES

__all__ = ["CanvasSpec", "TINTS", "canvas_classes", "render_scenes", "make_detection",
           "make_segmentation", "rle_encode", "rle_decode"]

#: Colour tints (RGB multipliers of the grey item), in class order within a type.
TINTS: Dict[str, Tuple[float, float, float]] = {
    "red": (1.0, 0.25, 0.2), "green": (0.25, 1.0, 0.3), "blue": (0.3, 0.45, 1.0),
    "yellow": (1.0, 0.95, 0.2), "magenta": (1.0, 0.25, 1.0), "cyan": (0.2, 1.0, 1.0),
}

_VAL_ITEMS_PER_TYPE = 100  # taken from the end of the balanced embedded test subset
_DEV_ITEMS_PER_TYPE = 100  # the items before those, held out of training for a dev split
#: the splits :func:`render_scenes` knows ("dev" only with ``dev_per_class > 0``)
SPLITS = ("train", "val", "dev")
_FORMAT = "eqlosses-canvas-1"


@dataclass(frozen=True)
class CanvasSpec:
    """Everything that determines the generated scenes (written next to the data)."""

    n_max: int = 200
    imbalance: float = 200.0
    val_per_class: int = 6
    dev_per_class: int = 0  # > 0: a development split carved from the training items
    size: int = 128
    min_objects: int = 2
    max_objects: int = 5
    min_scale: float = 0.8  # item side = 28 * scale pixels
    max_scale: float = 1.8
    min_visible: int = 40  # pixels; fewer visible pixels -> the item is dropped
    seed: int = 0

    def check(self) -> "CanvasSpec":
        problems = []
        if self.n_max < 1:
            problems.append(f"n_max must be >= 1, got {self.n_max}")
        if self.imbalance < 1:
            problems.append(f"imbalance must be >= 1, got {self.imbalance}")
        if self.val_per_class < 0:
            problems.append(f"val_per_class must be >= 0, got {self.val_per_class}")
        if self.dev_per_class < 0:
            problems.append(f"dev_per_class must be >= 0, got {self.dev_per_class}")
        if not 1 <= self.min_objects <= self.max_objects:
            problems.append(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, "
                            f"{self.max_objects}")
        if not 0 < self.min_scale <= self.max_scale:
            problems.append(f"need 0 < min_scale <= max_scale, got {self.min_scale}, "
                            f"{self.max_scale}")
        if self.size < int(np.ceil(28 * self.max_scale)):
            problems.append(f"size {self.size} is smaller than the largest item "
                            f"({int(np.ceil(28 * self.max_scale))} px at max_scale "
                            f"{self.max_scale})")
        if problems:
            raise ValueError("invalid canvas specification: " + "; ".join(problems))
        return self


def canvas_classes() -> List[str]:
    """The 60 class names, ``"<type>|<tint>"``, type-major.

    >>> canvas_classes()[:2], len(canvas_classes())
    (['T-shirt/top|red', 'T-shirt/top|green'], 60)
    """
    return [f"{t}|{tint}" for t in FASHION_MNIST_CLASSES for tint in TINTS]


def _item_pools(dev: bool = False) -> Dict[str, List[np.ndarray]]:
    """Per split, per item type: the pool of ``uint8 [n, 28, 28]`` items (``"dev"`` only when
    ``dev``, which takes its items out of the training pool)."""
    train_x, train_y = load_embedded("train")
    test_x, test_y = load_embedded("test")
    pools: Dict[str, List[np.ndarray]] = {"train": [], "val": [], "dev": []}
    for t in range(len(FASHION_MNIST_CLASSES)):
        test_items = test_x[test_y == t]
        rest, val = test_items[:-_VAL_ITEMS_PER_TYPE], test_items[-_VAL_ITEMS_PER_TYPE:]
        if dev:
            rest, held = rest[:-_DEV_ITEMS_PER_TYPE], rest[-_DEV_ITEMS_PER_TYPE:]
            pools["dev"].append(held)
        pools["train"].append(np.concatenate([train_x[train_y == t], rest]))
        pools["val"].append(val)
    return pools


def _train_instances(spec: CanvasSpec, rng: np.random.Generator) -> np.ndarray:
    k = len(canvas_classes())
    rank = rng.permutation(k)
    counts = np.maximum(1, np.round(spec.n_max * spec.imbalance ** (-rank / (k - 1))))
    return np.repeat(np.arange(k), counts.astype(np.int64))


def _deal(labels: np.ndarray, spec: CanvasSpec, rng: np.random.Generator) -> List[np.ndarray]:
    """Shuffle instance labels and cut them into canvases of min..max objects."""
    labels = labels[rng.permutation(len(labels))]
    scenes, start = [], 0
    while start < len(labels):
        n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
        scenes.append(labels[start:start + n])
        start += n
    return scenes


def _resize_nearest(item: np.ndarray, side: int) -> np.ndarray:
    idx = (np.arange(side) * item.shape[0] / side).astype(np.int64)
    return item[idx][:, idx]


def _render(labels: np.ndarray, pools: List[np.ndarray], spec: CanvasSpec,
            rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """One canvas: ``uint8 [S, S, 3]`` image, ``int32 [S, S]`` instance map (-1 = none) and
    the class of each instance (index into the map)."""
    s = spec.size
    image = np.clip(rng.normal(38.0, 10.0, size=(s, s, 1)) + rng.normal(0, 4, size=(s, s, 3)),
                    0, 255)
    instance_map = np.full((s, s), -1, dtype=np.int32)
    tints = list(TINTS.values())
    for i, cls in enumerate(labels):
        item_type, tint = divmod(int(cls), len(TINTS))
        pool = pools[item_type]
        item = pool[int(rng.integers(len(pool)))]
        side = int(round(28 * rng.uniform(spec.min_scale, spec.max_scale)))
        item = _resize_nearest(item, side).astype(np.float64)
        if rng.random() < 0.5:
            item = item[:, ::-1]
        y, x = (int(v) for v in rng.integers(0, s - side + 1, size=2))
        mask = item > 40
        brightness = rng.uniform(0.75, 1.0)
        colour = item[..., None] * np.asarray(tints[tint]) * brightness
        region = image[y:y + side, x:x + side]
        region[mask] = colour[mask]
        instance_map[y:y + side, x:x + side][mask] = i
    return image.round().astype(np.uint8), instance_map, [int(c) for c in labels]


def render_scenes(spec: CanvasSpec, split: str) -> Iterator[Tuple[np.ndarray, List[np.ndarray],
                                                                 List[int]]]:
    """Yield ``(image uint8 [S,S,3], visible masks (bool [S,S] each), classes)`` per canvas
    of ``split`` (``"train"``, ``"val"`` or, with ``spec.dev_per_class > 0``, ``"dev"``),
    deterministically from ``spec``. Items with fewer than ``spec.min_visible`` visible pixels
    are left out of masks and classes."""
    spec.check()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "dev" and not spec.dev_per_class:
        raise ValueError("the dev split needs dev_per_class > 0 in the specification")
    pools = _item_pools(dev=spec.dev_per_class > 0)[split]
    # Independent streams: the training scenes do not change with val_per_class or
    # dev_per_class (but with a dev split, through the smaller pool), and back.
    seeds = np.random.SeedSequence(spec.seed).spawn(3)
    rng = np.random.default_rng(seeds[SPLITS.index(split)])
    if split == "train":
        labels = _train_instances(spec, rng)
    else:
        per_class = spec.val_per_class if split == "val" else spec.dev_per_class
        labels = np.repeat(np.arange(len(canvas_classes())), per_class)
    for scene in _deal(labels, spec, rng):
        image, instance_map, classes = _render(scene, pools, spec, rng)
        masks, kept = [], []
        for i, cls in enumerate(classes):
            mask = instance_map == i
            if mask.sum() >= spec.min_visible:
                masks.append(mask)
                kept.append(cls)
        yield image, masks, kept


# --------------------------------------------------------------------------------------------
# RLE (COCO convention: column-major runs, starting with a run of zeros)
# --------------------------------------------------------------------------------------------

def rle_encode(mask: np.ndarray) -> Dict[str, list]:
    """Uncompressed COCO RLE of a binary ``[H, W]`` mask.

    >>> rle_encode(np.array([[0, 1], [0, 1]], dtype=bool))
    {'size': [2, 2], 'counts': [2, 2]}
    """
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_decode(rle: Dict[str, list]) -> np.ndarray:
    """Inverse of :func:`rle_encode` (uncompressed RLE only).

    >>> m = np.eye(3, dtype=bool)
    >>> bool((rle_decode(rle_encode(m)) == m).all())
    True
    """
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h} * {w} = {h * w}")
    return flat.reshape((w, h)).T


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------

def _prepare(out_dir: Union[str, Path], overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose another directory or pass "
                                  f"overwrite=True (--overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    licence = resources.files("eqlosses.data").joinpath("FASHION_MNIST_LICENSE.txt")
    (out / "FASHION_MNIST_LICENSE.txt").write_text(licence.read_text())
    return out


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=False, compress_level=1)


def _lvis_frequency(image_count: int) -> str:
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


def _check_groups(frequency: List[str], spec: CanvasSpec) -> None:
    missing = [name for code, name in (("r", "rare"), ("c", "common"), ("f", "frequent"))
               if code not in frequency]
    if missing:
        raise ValueError(f"with n_max={spec.n_max} and imbalance={spec.imbalance} the LVIS "
                         f"group(s) {', '.join(missing)} are empty (rare: 1-10 training "
                         f"images, common: 11-100, frequent: > 100); raise n_max (frequent "
                         f"needs n_max > 100) or imbalance, or pass check_groups=False "
                         f"(--allow-empty-groups)")


def make_detection(out_dir: Union[str, Path], overwrite: bool = False,
                   check_groups: bool = True, **spec_kwargs) -> Dict[str, object]:
    """Write the canvas benchmark as LVIS v1 JSON plus PNG images under ``out_dir``.

    Layout: ``images/{train,val}/NNNNNN.png``, ``annotations/lvis_v1_{train,val}.json``
    (``file_name`` relative to ``images/``), ``canvas.json`` (the specification and the
    per-class training counts) and the Fashion-MNIST licence; with ``dev_per_class > 0`` also
    ``images/dev/`` and ``annotations/lvis_v1_dev.json``. ``spec_kwargs`` are the fields of
    :class:`CanvasSpec`. Returns the summary written to ``canvas.json``.
    """
    spec = CanvasSpec(**spec_kwargs).check()
    names = canvas_classes()
    splits = {split: list(render_scenes(spec, split))
              for split in SPLITS if split != "dev" or spec.dev_per_class}
    # Frequencies come from the training split actually rendered.
    k = len(names)
    image_count = np.zeros(k, dtype=np.int64)
    instance_count = np.zeros(k, dtype=np.int64)
    for _, _, classes in splits["train"]:
        np.add.at(instance_count, classes, 1)
        image_count[sorted(set(classes))] += 1
    frequency = [_lvis_frequency(int(c)) for c in image_count]
    if check_groups:
        _check_groups(frequency, spec)
    categories = [{"id": c + 1, "name": names[c], "synset": names[c].lower(),
                   "def": f"a {names[c].split('|')[1]} {names[c].split('|')[0].lower()}",
                   "frequency": frequency[c], "image_count": int(image_count[c]),
                   "instance_count": int(instance_count[c])} for c in range(k)]

    out = _prepare(out_dir, overwrite)
    ann_id = 1
    for split, scenes in splits.items():
        images, annotations = [], []
        for i, (image, masks, classes) in enumerate(scenes):
            image_id = i + 1
            file_name = f"{split}/{image_id:06d}.png"
            _save_png(image, out / "images" / file_name)
            present = {c + 1 for c in classes}
            images.append({"id": image_id, "file_name": file_name,
                           "height": spec.size, "width": spec.size,
                           "neg_category_ids": [c for c in range(1, k + 1) if c not in present],
                           "not_exhaustive_category_ids": []})
            for mask, cls in zip(masks, classes):
                ys, xs = np.nonzero(mask)
                x0, y0 = int(xs.min()), int(ys.min())
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": cls + 1,
                                    "bbox": [x0, y0, int(xs.max()) + 1 - x0,
                                             int(ys.max()) + 1 - y0],
                                    "area": int(mask.sum()), "segmentation": rle_encode(mask),
                                    "iscrowd": 0})
                ann_id += 1
        doc = {"info": {"description": "eqlosses canvas benchmark (Fashion-MNIST items)",
                        "format": _FORMAT, "spec": asdict(spec)},
               "licenses": [{"id": 1, "name": "MIT (Fashion-MNIST, Zalando SE)"}],
               "images": images, "annotations": annotations, "categories": categories}
        path = out / "annotations" / f"lvis_v1_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
    summary = {"format": _FORMAT, "kind": "detection", "spec": asdict(spec),
               "num_classes": k, "train_images": len(splits["train"]),
               "val_images": len(splits["val"]),
               **({"dev_images": len(splits["dev"])} if "dev" in splits else {}),
               "train_instances": int(instance_count.sum()),
               "groups": {g: frequency.count(g[0]) for g in ("rare", "common", "frequent")},
               "image_count": image_count.tolist()}
    (out / "canvas.json").write_text(json.dumps(summary, indent=1))
    return summary


def make_segmentation(out_dir: Union[str, Path], overwrite: bool = False,
                      **spec_kwargs) -> Dict[str, object]:
    """Write the same canvases as per-pixel class maps in the ADE20K layout.

    ``images/{training,validation}/NNNNNN.png`` (RGB), ``annotations/{training,validation}/
    NNNNNN.png`` (``uint8``: 0 = background, ``k + 1`` = class ``k``, 255 = ignore),
    ``classes.json`` (``{"classes": [...], "ignore_index": 255, "reduce_zero_label": false}``
    plus the training pixel and image counts per class) and ``canvas.json``.
    """
    spec = CanvasSpec(**spec_kwargs).check()
    if spec.dev_per_class:
        raise ValueError("dev_per_class: the ADE20K layout has no development split; the "
                         "segmentation writer takes dev_per_class=0")
    names = ["background"] + canvas_classes()
    out = _prepare(out_dir, overwrite)
    pixels = np.zeros(len(names), dtype=np.int64)
    images_with = np.zeros(len(names), dtype=np.int64)
    sizes = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        n = 0
        for i, (image, masks, classes) in enumerate(render_scenes(spec, split)):
            label = np.zeros((spec.size, spec.size), dtype=np.uint8)
            for mask, cls in zip(masks, classes):
                label[mask] = cls + 1
            stem = f"{i + 1:06d}"
            _save_png(image, out / "images" / folder / f"{stem}.png")
            _save_png(label, out / "annotations" / folder / f"{stem}.png")
            if split == "train":
                pixels += np.bincount(label.ravel(), minlength=len(names))
                images_with[np.unique(label)] += 1
            n += 1
        sizes[split] = n
    meta = {"classes": names, "ignore_index": 255, "reduce_zero_label": False,
            "train_pixel_counts": pixels.tolist(), "train_image_counts": images_with.tolist()}
    (out / "classes.json").write_text(json.dumps(meta, indent=1))
    summary = {"format": _FORMAT, "kind": "segmentation", "spec": asdict(spec),
               "num_classes": len(names), "train_images": sizes["train"],
               "val_images": sizes["val"]}
    (out / "canvas.json").write_text(json.dumps(summary, indent=1))
    return summary
