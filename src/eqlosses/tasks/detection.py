"""Long-tailed object detection: LVIS-format data, detectors trained by any loss, LVIS AP.

``build_job(cfg)`` builds the data (the generated canvas benchmark, or LVIS / COCO files),
the classification loss (any loss whose declared traits fit the head: ``losses_for("roi")``
for the R-CNN box classifier, e.g. Sigmoid-EQL, CE, Seesaw; ``losses_for("dense")`` for
RetinaNet / FCOS, e.g. focal, EFL, EQFL) and the detector that the loss is injected into (:mod:`eqlosses.tasks.detection_models`); ``train(cfg)`` hands them to the shared loop
:func:`eqlosses.tasks.engine.fit`. Evaluation follows the LVIS protocol (score threshold
1e-4, 300 detections per image, per-class NMS) and reports AP, AP50, AP75, AP_r, AP_c, AP_f
for boxes (and masks with Mask R-CNN) with faster-coco-eval; every rank evaluates its own
images and rank 0 gathers the detections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .. import distributed
from ..config import DetectionConfig, LossConfig
from ..data.lvis import collate_detection
from ..data.seeding import SeededDataset
from ..losses import ClassStatistics, LongTailLoss, build_loss_for, head_for
from .common import ensure_canvas
from .engine import (Job, amp_dtype, evaluate_checkpoint_of, evaluation_loader, run_dir_for,
                     train)

__all__ = ["DetectionData", "SeededFlip", "build_data", "build_criterion", "build_job",
           "evaluate", "train", "evaluate_checkpoint", "run_dir_for", "RUN_NAME"]

#: the default run name (``output_dir/<name>``), formatted with the configuration
RUN_NAME = ("det-{cfg.data.name}-{cfg.model.arch}-{cfg.loss.name}-{cfg.data.sampler}-"
            "seed{cfg.seed}")

#: evaluate a checkpoint of this task (refuses those of another task)
evaluate_checkpoint = evaluate_checkpoint_of("det")


@dataclass
class DetectionData:
    train: Dataset
    val: Dataset
    val_ann: Path
    num_classes: int
    class_names: List[str]
    category_ids: List[int]
    image_counts: torch.Tensor  # training images per class (int64 [C])
    image_labels: List[List[int]]  # classes present per training image
    groups: Any  # FrequencyGroups (rare / common / frequent)


class SeededFlip(SeededDataset):
    """Random horizontal flip of image, boxes and masks with probability 1/2, drawn from
    ``item_seed(seed, epoch, index)`` (:mod:`eqlosses.data.seeding`): a pure function of the
    three, so resume is exact and workers do not matter. Call :meth:`set_epoch` each epoch."""

    def __getitem__(self, index: int):
        image, target = self.base[index]
        g = self.generator(index)
        if torch.rand((), generator=g) < 0.5:
            width = image.shape[-1]
            image = image.flip(-1)
            target = dict(target)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def build_data(cfg: DetectionConfig) -> DetectionData:
    """The training and validation sets named by ``cfg.data``."""
    from ..data.lvis import LVISDetection

    d = cfg.data
    with_masks = cfg.model.arch == "mask_rcnn"
    if d.name == "canvas":
        if d.root is None:
            raise ValueError("data.name=canvas needs data.root (where the benchmark is, or "
                             "is generated)")
        if d.eval_split not in ("val", "dev"):
            raise ValueError(f"data.eval_split must be val or dev, got {d.eval_split!r}")
        root = Path(d.root)
        ensure_canvas(root, "detection")
        train_ann, val_ann = (root / "annotations" / f"lvis_v1_{s}.json" for s in ("train",
                                                                                   d.eval_split))
        if d.eval_split == "dev" and not val_ann.is_file():
            raise ValueError(f"data.eval_split=dev: {root} has no development split ({val_ann} "
                             f"is missing); generate the benchmark with one: eqlosses data "
                             f"make-detection --out {root} --dev-per-class 6 --overwrite")
        train_images = val_images = root / "images"
    elif d.name in ("lvis", "coco"):
        if d.eval_split != "val":
            raise ValueError(f"data.eval_split is for the canvas benchmark; with data.name="
                             f"{d.name} give your development annotations as data.val_ann")
        missing = [k for k in ("train_ann", "val_ann", "train_images", "val_images")
                   if getattr(d, k) is None]
        if missing:
            raise ValueError(f"data.name={d.name} needs data.{', data.'.join(missing)} "
                             f"(annotation JSON files and the folders their image paths are "
                             f"relative to; for LVIS v1 the folder holding train2017/ and "
                             f"val2017/)")
        train_ann, val_ann = Path(d.train_ann), Path(d.val_ann)
        train_images, val_images = Path(d.train_images), Path(d.val_images)
    else:
        raise ValueError(f"unknown data.name '{d.name}'; choose canvas, lvis or coco")
    train = LVISDetection(train_ann, train_images, with_masks=with_masks,
                          skip_empty=d.skip_empty)
    val = LVISDetection(val_ann, val_images, with_masks=False)
    if val.category_ids != train.category_ids:
        raise ValueError(f"{train_ann} and {val_ann} have different category lists "
                         f"({train.num_classes} vs {val.num_classes} categories)")
    groups = train.frequency_groups()
    counts = train.class_image_counts()
    labels = train.image_labels()
    train_set: Dataset = SeededFlip(train, cfg.seed) if d.flip else train
    val_set: Dataset = val
    if d.max_val_images is not None and d.max_val_images < len(val):
        val_set = Subset(val, list(range(d.max_val_images)))
    return DetectionData(train_set, val_set, val_ann, train.num_classes,
                         list(train.class_names), list(train.category_ids), counts, labels,
                         groups)


def build_criterion(loss_cfg: LossConfig, arch: str, num_classes: int,
                    image_counts: torch.Tensor, num_images: int,
                    generator: Optional[torch.Generator] = None) -> LongTailLoss:
    """The classification loss of the detector's head (``roi`` for the R-CNNs, ``dense``
    for RetinaNet / FCOS), built by :func:`eqlosses.losses.build_loss_for` with the head's
    conventions (a background column for softmax CE, an objectness column for BCE and
    Sigmoid-EQL, ``reduction="sum"`` for a dense loss without a normaliser) and the training
    statistics it declares: image counts per class, and image frequencies = counts / images
    (EQL, ``lambda_`` 0.0011 as for LVIS v1)."""
    statistics = ClassStatistics(image_counts, total=max(num_images, 1))
    return build_loss_for(head_for("det", arch), loss_cfg.name, num_classes, statistics,
                          generator=generator, **loss_cfg.kwargs)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, val_ann: Path, category_ids: List[int],
             iou_types: Tuple[str, ...], device: torch.device, max_dets: int = 300,
             batch_size: int = 8, num_workers: int = 0) -> Dict[str, Any]:
    """LVIS AP of ``model`` on ``dataset``; each rank runs its own images and rank 0 gathers
    every rank's detections (the other ranks return ``{}``).

    Returns ``{"bbox": {...}, "segm": {...}}`` (faster-coco-eval ``lvis_style``) plus the
    box metrics at the top level (``AP``, ``AP50``, ``AP75``, ``APr``, ``APc``, ``APf``,
    ``groups``: rare / common / frequent AP, ``per_class_ap``).
    """
    from ..metrics.detection import LVISEvaluator

    loader = evaluation_loader(model, dataset, batch_size, num_workers, collate_detection)
    evaluator = LVISEvaluator(val_ann, category_ids, iou_types=iou_types, max_dets=max_dets)
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        evaluator.update([{k: v.cpu() for k, v in out.items()} for out in outputs],
                         [int(t["image_id"]) for t in targets])
    result = evaluator.compute()
    if distributed.rank() != 0 or not result:
        return {}
    box = result["bbox"]
    metrics: Dict[str, Any] = dict(result)
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf", "per_class_ap"):
        metrics[key] = box[key]
    metrics["groups"] = {"rare": box["APr"], "common": box["APc"], "frequent": box["APf"]}
    return metrics


def build_job(cfg: DetectionConfig, device: torch.device) -> Job:
    """Data, loss (which sets the classifier's logit channels) and detector, as a Job."""
    from .detection_models import build_detector

    data = build_data(cfg)
    generator = torch.Generator(device).manual_seed(cfg.seed * 7919 + distributed.rank())
    num_images = len(data.image_labels)
    criterion = build_criterion(cfg.loss, cfg.model.arch, data.num_classes, data.image_counts,
                                num_images, generator)
    m, e = cfg.model, cfg.eval
    model = build_detector(m.arch, data.num_classes, criterion, backbone=m.backbone,
                           min_size=m.min_size, max_size=m.max_size, pretrained=m.pretrained,
                           pretrained_backbone=m.pretrained_backbone,
                           score_thresh=e.score_thresh, detections_per_img=e.detections_per_img,
                           nms_thresh=e.nms_thresh, **m.options).to(device)
    amp = amp_dtype(cfg.optim.amp, device)
    iou_types = ("bbox", "segm") if m.arch == "mask_rcnn" else ("bbox",)

    def step(train_model: nn.Module, batch) -> Tuple[torch.Tensor, int, Dict[str, Any]]:
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            losses = train_model(images, targets)
        total = sum(losses.values())
        return total, len(images), {k: v.detach() for k, v in losses.items()}

    def run_evaluation() -> Dict[str, Any]:
        return evaluate(model, data.val, data.val_ann, data.category_ids, iou_types, device,
                        e.detections_per_img, cfg.data.eval_batch_size, cfg.data.num_workers)

    d = cfg.data
    counts = data.image_counts.tolist()
    return Job(kind="det", model=model, criterion=criterion, train_set=data.train,
               sampler_labels=data.image_labels, num_classes=data.num_classes, step=step,
               evaluate=run_evaluation, summary_keys=("AP", "APr", "APc", "APf"),
               layout={"data": d.name, "root": str(d.root), "train_ann": d.train_ann,
                       "flip": d.flip, "skip_empty": d.skip_empty},
               collate_fn=collate_detection,
               start_info={"train_image_counts": counts,
                           "groups": data.groups.group_of()},
               result_info={"train_counts": counts, "count_unit": "images",
                            "class_names": data.class_names,
                            "group_of": data.groups.group_of()},
               loss_generator=generator)
