"""LVIS / COCO JSON (the canvas benchmark, or real LVIS) as an Ultralytics YOLO dataset, and
YOLO's predictions back as LVIS results scored by the package's evaluator.

:func:`lvis_to_yolo` writes, under ``out_dir``::

    images/{train,val}/<stem>.<ext>   hard links to (or copies of) the images
    labels/{train,val}/<stem>.txt     one "class cx cy w h" line per box (normalised to [0, 1])
    data.yaml                         path, train, val, names (what YOLO's trainers read)
    eqlosses.json                     category ids, annotation files, image ids by split/stem

Classes are the categories sorted by id, indices ``0..K-1`` (the convention of
:mod:`eqlosses.data.lvis`: YOLO class ``k`` is contiguous index ``k`` and evaluator label
``k + 1``). Boxes are clipped to the image; degenerate boxes are dropped (as
:mod:`eqlosses.data.lvis` does, with one warning); crowd regions are left out. Images keep
their stems (which must be unique within a split: YOLO finds a label file by the image's
name).

:func:`evaluate_yolo` runs a YOLO model over the validation images at the LVIS protocol
(confidence >= 0.001, <= 300 detections per image, per-class NMS) and returns
:class:`~eqlosses.metrics.detection.LVISEvaluator`'s metrics (AP, AP_r, AP_c, AP_f, ...).
ultralytics is imported there only.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from .lvis import _image_path, load_annotations

__all__ = ["lvis_to_yolo", "make_detection_yolo", "read_yolo_meta", "yolo_results_to_outputs",
           "evaluate_yolo", "yolo_label_counts"]

PathLike = Union[str, os.PathLike]
META_FILE = "eqlosses.json"


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _yaml_quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar


def lvis_to_yolo(annotations: Mapping[str, PathLike], image_root: PathLike,
                 out_dir: PathLike, overwrite: bool = False) -> Path:
    """Write an LVIS / COCO detection dataset as an Ultralytics YOLO dataset.

    Args:
        annotations: ``{"train": path, "val": path}`` (any split names; YOLO's trainer
            reads ``train`` and ``val``) of LVIS / COCO JSON files with the same categories.
        image_root: the folder the files' ``file_name`` (or ``coco_url``'s
            ``<split>/<file>``) are relative to.
        out_dir: a new or empty folder (``overwrite=True`` replaces its content).

    Returns:
        the path of ``data.yaml``.

    Example:
        >>> import tempfile, pathlib
        >>> from eqlosses.data.canvas import make_detection
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = make_detection(root / "lvis", n_max=4, imbalance=2, val_per_class=1,
        ...                    check_groups=False)
        >>> data = lvis_to_yolo({s: root / f"lvis/annotations/lvis_v1_{s}.json"
        ...                      for s in ("train", "val")}, root / "lvis/images", root / "yolo")
        >>> data.name, (root / "yolo/labels/val").is_dir()
        ('data.yaml', True)
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    image_root = Path(image_root)
    categories: Optional[List[int]] = None
    names: List[str] = []
    meta: Dict[str, Any] = {"annotations": {}, "image_ids": {}, "image_root":
                            str(image_root.resolve())}
    dropped: List[Any] = []
    for split, ann_path in annotations.items():
        data = load_annotations(ann_path)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        ids = [c["id"] for c in cats]
        if categories is None:
            categories, names = ids, [str(c.get("name", c["id"])) for c in cats]
        elif ids != categories:
            raise ValueError(f"{ann_path}: its categories differ from the first split's; all "
                             f"splits must share one category list")
        index = {cid: k for k, cid in enumerate(categories)}
        by_image: Dict[int, List[dict]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        stems: Dict[str, int] = {}
        for img in data["images"]:
            src = _image_path(image_root, img, str(ann_path))
            if not src.is_file():
                raise FileNotFoundError(f"{ann_path}: image id {img['id']}: {src} does not exist")
            stem = src.stem
            if stem in stems:
                raise ValueError(f"{ann_path}: images {stems[stem]} and {img['id']} share the "
                                 f"file name stem {stem!r}; YOLO finds labels by name")
            stems[stem] = int(img["id"])
            _link_or_copy(src, out / "images" / split / src.name)
            h, w = float(img["height"]), float(img["width"])
            lines = []
            for ann in by_image.get(img["id"], []):
                if ann.get("iscrowd", 0):
                    continue
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                x0, y0 = min(max(x, 0.0), w), min(max(y, 0.0), h)
                x1, y1 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
                if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0):
                    dropped.append(ann.get("id"))
                    continue
                lines.append(f"{index[ann['category_id']]} {(x0 + x1) / 2 / w:.6f} "
                             f"{(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}")
            label = out / "labels" / split / f"{stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("\n".join(lines) + ("\n" if lines else ""))
        meta["annotations"][split] = str(Path(ann_path).resolve())
        meta["image_ids"][split] = stems
    if dropped:
        warnings.warn(f"lvis_to_yolo: dropped {len(dropped)} degenerate boxes (annotation ids "
                      f"{', '.join(map(str, dropped[:5]))}{', ...' if len(dropped) > 5 else ''})")
    assert categories is not None, "no split given"
    meta["category_ids"] = categories
    yaml = [f"path: {_yaml_quote(str(out.resolve()))}"]
    yaml += [f"{split}: images/{split}" for split in annotations]
    yaml.append("names:")
    yaml += [f"  {k}: {_yaml_quote(n)}" for k, n in enumerate(names)]
    (out / "data.yaml").write_text("\n".join(yaml) + "\n")
    (out / META_FILE).write_text(json.dumps(meta))
    return out / "data.yaml"


def make_detection_yolo(out_dir: PathLike, overwrite: bool = False, **kwargs: Any
                        ) -> Dict[str, Any]:
    """The canvas benchmark (:func:`eqlosses.data.canvas.make_detection`, same arguments) in
    ``out_dir`` (LVIS JSON and PNGs, used for evaluation) plus its YOLO dataset in
    ``out_dir/yolo`` (:func:`lvis_to_yolo`). Returns the canvas summary with ``data_yaml``."""
    from .canvas import make_detection

    summary = make_detection(out_dir, overwrite=overwrite, **kwargs)
    root = Path(out_dir)
    data_yaml = lvis_to_yolo({s: root / "annotations" / f"lvis_v1_{s}.json"
                              for s in ("train", "val")}, root / "images", root / "yolo",
                             overwrite=True)
    summary["data_yaml"] = str(data_yaml)
    return summary


def read_yolo_meta(data_yaml: PathLike) -> Dict[str, Any]:
    """The ``eqlosses.json`` written next to ``data_yaml`` by :func:`lvis_to_yolo`."""
    path = Path(data_yaml).parent / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: evaluate_yolo needs a dataset written by "
                                f"eqlosses.data.yolo.lvis_to_yolo")
    return json.loads(path.read_text())


def yolo_label_counts(data_yaml: PathLike, split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """(images per class, instances per class) of a split, read from its label files."""
    meta = read_yolo_meta(data_yaml)
    k = len(meta["category_ids"])
    images, instances = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for label in sorted((Path(data_yaml).parent / "labels" / split).glob("*.txt")):
        cls = [int(line.split()[0]) for line in label.read_text().splitlines() if line.strip()]
        np.add.at(instances, cls, 1)
        images[sorted(set(cls))] += 1
    return images, instances


def yolo_results_to_outputs(results: Iterable[Any]) -> List[Dict[str, Any]]:
    """ultralytics ``Results`` (boxes in original-image pixels) as the evaluator's outputs:
    ``boxes`` xyxy, ``scores``, ``labels`` = YOLO class + 1."""
    outputs = []
    for r in results:
        b = r.boxes
        outputs.append({"boxes": b.xyxy.detach().cpu().float(),
                        "scores": b.conf.detach().cpu().float(),
                        "labels": b.cls.detach().cpu().long() + 1})
    return outputs


def evaluate_yolo(model: Any, data_yaml: PathLike, split: str = "val", imgsz: int = 128,
                  conf: float = 0.001, max_det: int = 300, batch: int = 16,
                  device: Optional[str] = None) -> Dict[str, Any]:
    """LVIS box AP of a YOLO model (an ``ultralytics.YOLO`` or a path to its weights) on a
    split of a dataset written by :func:`lvis_to_yolo`, with the package's
    :class:`~eqlosses.metrics.detection.LVISEvaluator`: predictions at ``conf`` >= 0.001,
    at most ``max_det`` = 300 per image, YOLO's per-class NMS. Returns the ``bbox`` metrics.
    """
    from ..metrics.detection import LVISEvaluator

    meta = read_yolo_meta(data_yaml)
    if not isinstance(model, (str, os.PathLike)) and not hasattr(model, "predict"):
        raise ValueError(f"model must be an ultralytics YOLO or a weights path, got "
                         f"{type(model).__name__}")
    if isinstance(model, (str, os.PathLike)):
        from ultralytics import YOLO

        model = YOLO(str(model))
    evaluator = LVISEvaluator(meta["annotations"][split], meta["category_ids"], max_dets=max_det)
    stems: Dict[str, int] = meta["image_ids"][split]
    folder = Path(data_yaml).parent / "images" / split
    files = sorted(p for p in folder.iterdir() if p.stem in stems)
    for i in range(0, len(files), batch):
        chunk = files[i: i + batch]
        results = model.predict([str(p) for p in chunk], imgsz=imgsz, conf=conf,
                                max_det=max_det, verbose=False, device=device,
                                agnostic_nms=False)
        evaluator.update(yolo_results_to_outputs(results), [stems[p.stem] for p in chunk])
    return evaluator.compute()["bbox"]
