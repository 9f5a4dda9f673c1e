"""LVIS-style box and mask AP (AP, AP50, AP75, APs/m/l, APr/c/f, per-class AP).

The matching and accumulation are faster-coco-eval's (``COCOeval_faster`` with
``lvis_style=True``; ``pip install 'eqlosses[eval]'``), which follows the official LVIS API
(``lvis.LVISEval``):

- **Federated annotation.** On each image, a detection of a class that is neither annotated
  in the image nor listed in its ``neg_category_ids`` is not evaluated; an unmatched
  detection of a class in its ``not_exhaustive_category_ids`` is ignored (not a false
  positive). A ground truth without these fields (a COCO-format file) is treated as
  exhaustively annotated: ``neg_category_ids`` = every class not annotated in the image,
  ``not_exhaustive_category_ids`` = none.
- **300 detections per image**, the highest-scoring, over all classes (LVIS's
  ``max_dets``), then AP over the IoU thresholds 0.50:0.05:0.95 and 101 recall points.
- **Averages.** ``AP`` is the mean over the classes that have ground truth of the per-class
  AP; ``APr`` / ``APc`` / ``APf`` the same mean within the rare / common / frequent classes
  (the categories' ``frequency`` field; where a category lacks it, every category gets the
  group of its ``image_count`` or, failing that, of the number of ground-truth images that
  contain it, with LVIS's thresholds 10 and 100); ``APs`` / ``APm`` / ``APl`` restrict the
  ground truth and the unmatched detections to the areas ``[0, 32^2]``, ``[32^2, 96^2]``,
  ``[96^2, 1e10]``.

Ground-truth annotations with an ``area`` that is not in ``(0, inf)`` are left out, as the LVIS
API's ``get_ann_ids`` does (a missing ``area`` is the box area). Crowd annotations (COCO
``iscrowd: 1``; LVIS files have none) are ignore regions, as in COCO evaluation; the LVIS API
would count them as ordinary objects.

Mask AP uses the compressed RLE of ``mask > 0.5``; its detections carry no box, so that their
area (for APs/m/l) is the mask area, as in detectron2's LVIS evaluation.

The tests compare every number (box and mask AP, each group, each class) with the official
``lvis`` package on synthetic federated ground truths: they agree to rounding (< 1e-15).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..data.frequency import lvis_groups
from ..data.lvis import read_json, validate_annotations
from ..distributed import rank, world_size

__all__ = ["LVISEvaluator", "IOU_TYPES"]

IOU_TYPES = ("bbox", "segm")
_SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
_FREQ_CODES = ("r", "c", "f")


def _faster_coco_eval():
    try:
        from faster_coco_eval import COCO, COCOeval_faster
        from faster_coco_eval.core import mask as mask_api
    except ImportError as e:
        raise ImportError("LVISEvaluator needs faster-coco-eval: pip install 'eqlosses[eval]'"
                          ) from e
    return COCO, COCOeval_faster, mask_api


def _quiet(*args: Any, **kwargs: Any) -> None:
    return None


def _mean_valid(s: np.ndarray) -> float:
    """Mean of the entries ``> -1`` (faster-coco-eval's and LVIS's "undefined" marker)."""
    v = s[s > -1]
    return float(v.mean()) if v.size else math.nan


def _complete_gt(data: dict) -> Tuple[bool, str]:
    """Prepare a ground truth for evaluation (in place): drop the annotations that the LVIS
    API does not evaluate, fill the LVIS fields a COCO-format file lacks; return whether the
    file was federated and where the frequency groups came from."""
    for ann in data["annotations"]:
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    # the LVIS API evaluates only the annotations with 0 < area < inf
    data["annotations"] = [a for a in data["annotations"] if 0 < float(a["area"]) < math.inf]
    all_cats = {c["id"] for c in data["categories"]}
    positives: Dict[Any, set] = {img["id"]: set() for img in data["images"]}
    for ann in data["annotations"]:
        positives[ann["image_id"]].add(ann["category_id"])
    federated = all("neg_category_ids" in img for img in data["images"])
    for img in data["images"]:
        if "neg_category_ids" not in img:
            img["neg_category_ids"] = sorted(all_cats - positives[img["id"]])
        img.setdefault("not_exhaustive_category_ids", [])
    cats = data["categories"]
    if all("frequency" in c for c in cats):
        bad = [(c["id"], c["frequency"]) for c in cats if c["frequency"] not in _FREQ_CODES]
        if bad:
            raise ValueError(f"category frequency must be 'r', 'c' or 'f', got (id, frequency) "
                             f"{bad[:5]}")
        return federated, "frequency"
    if all("image_count" in c for c in cats):
        counts = [int(c["image_count"]) for c in cats]
        source = "image_count"
    else:
        images_of: Dict[Any, set] = {c["id"]: set() for c in cats}
        for ann in data["annotations"]:
            images_of[ann["category_id"]].add(ann["image_id"])
        counts = [len(images_of[c["id"]]) for c in cats]
        source = "annotations"
    groups = lvis_groups(torch.tensor(counts, dtype=torch.int64)).group_of()
    code = {"rare": "r", "common": "c", "frequent": "f"}
    for c, g in zip(cats, groups):
        c["frequency"] = code[g]
    return federated, source


class LVISEvaluator:
    """LVIS box / mask AP of a detector, with faster-coco-eval and the LVIS protocol.

    Use: :meth:`update` with each batch of detections, then :meth:`compute` (which calls
    :meth:`gather`). With several processes each rank updates with its own images and
    every rank calls :meth:`compute`; rank 0 gets the metrics of all the images.

    Args:
        gt: the ground truth: an LVIS / COCO JSON file or its parsed dict (copied, never
            modified). It is checked with :func:`eqlosses.data.lvis.validate_annotations`.
        category_ids: the original category id of each contiguous class index (e.g.
            :attr:`eqlosses.data.lvis.LVISDetection.category_ids`); detection labels are
            ``index + 1``.
        iou_types: ``("bbox",)``, ``("segm",)`` or ``("bbox", "segm")``.
        max_dets: detections kept per image, the highest-scoring (LVIS: 300).

    Attributes:
        federated: whether every gt image had ``neg_category_ids`` (an LVIS file); if not,
            the images without them were taken as exhaustively annotated.
        frequency_source: where APr/c/f's groups came from: ``"frequency"``,
            ``"image_count"`` or ``"annotations"`` (see the module docstring).

    Example:
        >>> gt = {"images": [{"id": 1, "height": 50, "width": 50, "neg_category_ids": [],
        ...                   "not_exhaustive_category_ids": []}],
        ...       "categories": [{"id": 4, "name": "a", "frequency": "r"}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 4,
        ...                        "bbox": [10, 10, 20, 20], "area": 400}]}
        >>> ev = LVISEvaluator(gt, category_ids=[4])
        >>> ev.update([{"boxes": torch.tensor([[10., 10., 30., 30.]]),
        ...             "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}], [1])
        >>> r = ev.compute()["bbox"]
        >>> r["AP"], r["APr"], r["per_class_ap"], r["num_detections"]
        (1.0, 1.0, [1.0], 1)
    """

    def __init__(self, gt: str | os.PathLike | Mapping[str, Any], category_ids: Sequence[Any],
                 iou_types: Sequence[str] | str = ("bbox",), max_dets: int = 300) -> None:
        _faster_coco_eval()  # fail early, with the install hint
        if isinstance(gt, (str, os.PathLike)):
            source = str(gt)
            data = read_json(gt)
        elif isinstance(gt, Mapping):
            source = "<gt dict>"
            data = copy.deepcopy(dict(gt))
        else:
            raise ValueError(f"gt must be a JSON file path or an annotation dict, got "
                             f"{type(gt).__name__}")
        validate_annotations(data, source)
        self.federated, self.frequency_source = _complete_gt(data)
        self._gt = data

        if isinstance(iou_types, str):
            iou_types = (iou_types,)
        iou_types = tuple(iou_types)
        if (not iou_types or len(set(iou_types)) != len(iou_types)
                or any(t not in IOU_TYPES for t in iou_types)):
            raise ValueError(f"iou_types must be a non-empty sequence of distinct values from "
                             f"{IOU_TYPES}, got {iou_types!r}")
        self.iou_types = iou_types
        cids = list(category_ids)
        if not cids or len(set(cids)) != len(cids):
            raise ValueError(f"category_ids must be a non-empty list of distinct category ids, "
                             f"got {cids[:10]!r}{' ...' if len(cids) > 10 else ''}")
        self.category_ids = cids
        if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1:
            raise ValueError(f"max_dets must be a positive int, got {max_dets!r}")
        self.max_dets = max_dets
        self._sizes = {img["id"]: (int(img["height"]), int(img["width"]))
                       for img in data["images"]}
        self.reset()

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __repr__(self) -> str:
        return (f"LVISEvaluator(num_classes={self.num_classes}, iou_types={self.iou_types}, "
                f"images_seen={len(self._seen)}, detections={len(self._records)})")

    def reset(self) -> None:
        """Forget every detection (start a new evaluation)."""
        self._seen: Dict[int, None] = {}  # image ids in update order (a dict keeps order)
        self._records: List[Dict[str, Any]] = []
        self._gathered = False

    # -- update -----------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, outputs: Sequence[Mapping[str, Any]], image_ids: Iterable[Any]) -> None:
        """Add the detections of a batch of images.

        Args:
            outputs: one dict per image (torchvision's detector output): ``boxes``
                ``[n, 4]`` (``x1, y1, x2, y2``, pixels of the original image), ``scores``
                ``[n]``, ``labels`` ``[n]`` (contiguous class index + 1) and, for ``"segm"``,
                ``masks`` ``[n, 1, H, W]`` (probabilities, binarised at 0.5) or ``[n, H, W]``
                (bool) at the image's size.
            image_ids: the gt image id of each output (``target["image_id"]``).

        An image already given (to this process) is skipped: its first detections count.
        Only the ``max_dets`` highest-scoring detections of an image are kept.
        """
        if self._gathered:
            raise RuntimeError("LVISEvaluator.update() after gather(): the records already "
                               "hold all processes' detections; call reset() first")
        outputs = list(outputs)
        ids = [int(i) for i in image_ids]
        if len(ids) != len(outputs):
            raise ValueError(f"expected one image id per output ({len(outputs)}), got "
                             f"{len(ids)}")
        for out, image_id in zip(outputs, ids):
            if image_id not in self._sizes:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            if image_id in self._seen:
                continue
            records = self._records_of(out, image_id)
            self._seen[image_id] = None
            self._records.extend(records)

    def _records_of(self, out: Mapping[str, Any], image_id: int) -> List[Dict[str, Any]]:
        for key in ("boxes", "scores", "labels"):
            if key not in out:
                raise ValueError(f"each output needs 'boxes', 'scores' and 'labels'; the output "
                                 f"of image {image_id} has {sorted(out)}")
        boxes = torch.as_tensor(out["boxes"]).detach().to("cpu", torch.float64)
        scores = torch.as_tensor(out["scores"]).detach().to("cpu", torch.float64)
        labels = torch.as_tensor(out["labels"]).detach().cpu()
        n = scores.shape[0] if scores.dim() == 1 else -1
        if n < 0 or boxes.shape != (n, 4) or labels.shape != (n,):
            raise ValueError(f"image {image_id}: expected boxes [n, 4], scores [n], labels [n], "
                             f"got {tuple(boxes.shape)}, {tuple(scores.shape)}, "
                             f"{tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"image {image_id}: labels must be integers, got {labels.dtype}")
        if n and (int(labels.min()) < 1 or int(labels.max()) > self.num_classes):
            bad = labels[(labels < 1) | (labels > self.num_classes)][0].item()
            raise ValueError(f"image {image_id}: labels must be in [1, {self.num_classes}] "
                             f"(contiguous class index + 1), found {bad}")
        order = torch.argsort(scores, descending=True, stable=True)[: self.max_dets]
        rles = None
        if "segm" in self.iou_types:
            rles = self._encode_masks(out.get("masks"), n, image_id, order)
        records = []
        for j, i in enumerate(order.tolist()):
            x1, y1, x2, y2 = boxes[i].tolist()
            rec = {"image_id": image_id,
                   "category_id": self.category_ids[int(labels[i]) - 1],
                   "bbox": [x1, y1, x2 - x1, y2 - y1],
                   "score": float(scores[i])}
            if rles is not None:
                rec["segmentation"] = rles[j]
            records.append(rec)
        return records

    def _encode_masks(self, masks: Any, n: int, image_id: int, order: torch.Tensor
                      ) -> List[Dict[str, Any]]:
        height, width = self._sizes[image_id]
        if masks is None:
            raise ValueError(f"image {image_id}: iou_types has 'segm', so each output needs "
                             f"'masks'")
        m = torch.as_tensor(masks).detach()
        if m.dim() == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if m.dim() != 3 or m.shape[0] != n or tuple(m.shape[1:]) != (height, width):
            raise ValueError(f"image {image_id}: masks must have shape [{n}, 1, {height}, "
                             f"{width}] or [{n}, {height}, {width}] (one per box, at the "
                             f"image's size), got {tuple(torch.as_tensor(masks).shape)}")
        m = m[order.to(m.device)]
        binary = (m > 0.5) if m.is_floating_point() else (m != 0)
        if binary.shape[0] == 0:
            return []
        # [k, W, H] C-order is [H, W, k] Fortran order, the layout the RLE encoder reads.
        arr = np.ascontiguousarray(binary.cpu().numpy().transpose(0, 2, 1), dtype=np.uint8).T
        _, _, mask_api = _faster_coco_eval()
        rles = mask_api.encode(arr)
        return [{"size": [int(s) for s in r["size"]],
                 "counts": r["counts"].decode("ascii") if isinstance(r["counts"], bytes)
                 else r["counts"]} for r in rles]

    # -- gather / compute -------------------------------------------------------------------

    def gather(self) -> None:
        """Collect every process's detections (``all_gather_object``) on every rank.

        Collective: with an initialised process group of more than one process, every rank
        must call it (once; a second call before :meth:`reset` is a no-op). An image
        evaluated on several ranks (e.g. the padding of a ``DistributedSampler``) keeps the
        detections of the lowest rank that evaluated it, so no image counts twice. Without a
        group it does nothing.
        """
        if self._gathered:
            return
        self._gathered = True
        if world_size() <= 1:
            return
        gathered: List[Any] = [None] * world_size()
        dist.all_gather_object(gathered, (list(self._seen), self._records))
        owner: Dict[int, int] = {}
        for r, (ids, _) in enumerate(gathered):
            for image_id in ids:
                owner.setdefault(image_id, r)
        self._seen = {image_id: None for image_id in sorted(owner)}
        self._records = [rec for r, (_, recs) in enumerate(gathered) for rec in recs
                         if owner[rec["image_id"]] == r]

    def compute(self) -> Dict[str, Any]:
        """The metrics of every iou type, on rank 0; ``{}`` on the other ranks.

        Calls :meth:`gather` first (collective: every rank must call ``compute``). The
        images evaluated are those given to :meth:`update` (on any rank); if none was, all
        the gt images (every object missed, AP 0).

        Returns:
            ``{iou_type: metrics}`` where ``metrics`` has ``AP``, ``AP50``, ``AP75``,
            ``APs``, ``APm``, ``APl``, ``APr``, ``APc``, ``APf`` (floats in ``[0, 1]``, NaN
            when no class of the average has ground truth), ``per_class_ap`` (``[K]`` in
            contiguous class order; NaN for a class without ground truth in the evaluated
            images or absent from the gt categories), ``num_detections`` and ``num_images``.
        """
        self.gather()
        if rank() != 0:
            return {}
        image_ids = sorted(self._seen) if self._seen else sorted(self._sizes)
        return {t: self._evaluate(t, image_ids) for t in self.iou_types}

    def _evaluate(self, iou_type: str, image_ids: List[int]) -> Dict[str, Any]:
        COCO, COCOeval_faster, _ = _faster_coco_eval()
        wanted = set(image_ids)
        dts = []
        for rec in self._records:
            if rec["image_id"] not in wanted:
                continue
            d = {"image_id": rec["image_id"], "category_id": rec["category_id"],
                 "score": rec["score"]}
            if iou_type == "bbox":
                d["bbox"] = list(rec["bbox"])
            else:
                d["segmentation"] = dict(rec["segmentation"])
            dts.append(d)
        gt = COCO(copy.deepcopy(self._gt), print_function=_quiet)
        dt = gt.loadRes(dts)
        ev = COCOeval_faster(gt, dt, iouType=iou_type, lvis_style=True,
                             print_function=_quiet)
        ev.params.imgIds = list(image_ids)
        ev.params.maxDets = [self.max_dets]
        ev.evaluate()
        ev.accumulate()
        p = ev.params
        prec = np.asarray(ev.eval["precision"])[..., -1]  # [T, R, K, A] at max_dets
        cat_ids = [int(c) if isinstance(c, np.integer) else c for c in p.catIds]
        t50 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.50))[0])
        t75 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.75))[0])
        area = {lbl: i for i, lbl in enumerate(p.areaRngLbl)}
        freq = {c["id"]: c["frequency"] for c in self._gt["categories"]}
        group = {code: [k for k, c in enumerate(cat_ids) if freq[c] == code]
                 for code in _FREQ_CODES}
        a = area["all"]
        out: Dict[str, Any] = {
            "AP": _mean_valid(prec[:, :, :, a]),
            "AP50": _mean_valid(prec[t50, :, :, a]),
            "AP75": _mean_valid(prec[t75, :, :, a]),
            "APs": _mean_valid(prec[:, :, :, area["small"]]),
            "APm": _mean_valid(prec[:, :, :, area["medium"]]),
            "APl": _mean_valid(prec[:, :, :, area["large"]]),
        }
        for code in _FREQ_CODES:
            out[f"AP{code}"] = _mean_valid(prec[:, :, group[code], a])
        position = {c: k for k, c in enumerate(cat_ids)}
        out["per_class_ap"] = [_mean_valid(prec[:, :, position[c], a]) if c in position
                               else math.nan for c in self.category_ids]
        out["num_detections"] = len(dts)
        out["num_images"] = len(image_ids)
        return out
