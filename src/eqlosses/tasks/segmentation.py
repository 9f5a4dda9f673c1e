"""Long-tailed semantic segmentation: data, per-pixel loss, model and mIoU evaluation.

``build_job(cfg)`` builds the data (the generated canvas benchmark, ADE20K or any folder in
the ADE20K layout with a ``classes.json``), the per-pixel loss on ``[B, C, H, W]`` logits with
the ignore label, and a segmentation model with as many output channels as the loss asks
for; ``train(cfg)`` hands them to the shared loop :func:`eqlosses.tasks.engine.fit`.

Losses: ``ce``, ``balanced_softmax`` (prior = training pixel counts), ``softmax_eql``
(statistics per class over pixels, one all-reduce per step) and ``focal`` (pixels as rows).
Evaluation: dataset-level mIoU from one confusion matrix (one all-reduce), per-class IoU,
pixel accuracy and mIoU of the head / body / tail classes by training pixel share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed
from ..config import LossConfig, SegmentationConfig
from ..losses import ClassStatistics, LongTailLoss, build_loss_for
from .common import ensure_canvas
from .engine import (Job, amp_dtype, evaluate_checkpoint_of, evaluation_loader, run_dir_for,
                     train)

__all__ = ["SegmentationData", "build_data", "build_criterion", "build_job", "evaluate",
           "train", "evaluate_checkpoint", "run_dir_for", "RUN_NAME"]

#: the default run name (``output_dir/<name>``), formatted with the configuration
RUN_NAME = "seg-{cfg.data.name}-{cfg.model.arch}-{cfg.loss.name}-seed{cfg.seed}"

#: evaluate a checkpoint of this task (refuses those of another task)
evaluate_checkpoint = evaluate_checkpoint_of("seg")


@dataclass
class SegmentationData:
    train: Dataset
    val: Dataset
    num_classes: int
    class_names: List[str]
    pixel_counts: torch.Tensor  # training pixels per class (int64 [C])
    image_labels: List[List[int]]  # classes present per training image


def build_data(cfg: SegmentationConfig) -> SegmentationData:
    """The training and validation sets named by ``cfg.data``."""
    from ..data.segmentation import (SegTransforms, ade20k, image_labels, pixel_counts,
                                     segmentation_folder_from_meta)

    d = cfg.data
    if d.root is None:
        raise ValueError(f"data.name={d.name} needs data.root")
    root = Path(d.root)
    train_tf = SegTransforms(train=d.augment, crop_size=d.crop_size if d.augment else None,
                             scale_range=(d.scale_min, d.scale_max), ignore_index=d.ignore_index)
    val_tf = SegTransforms(train=False, ignore_index=d.ignore_index)
    if d.name in ("canvas", "folder"):
        if d.name == "canvas":
            ensure_canvas(root, "segmentation")
        train = segmentation_folder_from_meta(root, "training", train_tf, seed=cfg.seed)
        val = segmentation_folder_from_meta(root, "validation", val_tf)
    elif d.name == "ade20k":
        train = ade20k(root, "training", train_tf, seed=cfg.seed, ignore_index=d.ignore_index)
        val = ade20k(root, "validation", val_tf, ignore_index=d.ignore_index)
    else:
        raise ValueError(f"unknown data.name '{d.name}'; choose canvas, ade20k or folder")
    if train.ignore_index != d.ignore_index:
        raise ValueError(f"{root}/classes.json uses ignore_index {train.ignore_index}, but "
                         f"data.ignore_index is {d.ignore_index}")
    counts = pixel_counts(train)
    return SegmentationData(train, val, train.num_classes, list(train.class_names), counts,
                            image_labels(train))


def build_criterion(loss_cfg: LossConfig, num_classes: int, pixel_counts: torch.Tensor,
                    ignore_index: int, generator: Optional[torch.Generator] = None
                    ) -> LongTailLoss:
    """The per-pixel loss (head ``seg``) by :func:`eqlosses.losses.build_loss_for`, with the
    data's ignore label and the training pixel counts for the statistics it declares (e.g.
    balanced softmax's prior)."""
    kwargs = dict(loss_cfg.kwargs)
    if kwargs.setdefault("ignore_index", ignore_index) != ignore_index:
        raise ValueError(f"loss.ignore_index={kwargs['ignore_index']} differs from the data's "
                         f"ignore label data.ignore_index={ignore_index}; set "
                         f"data.ignore_index (the loss takes it from there)")
    counts = pixel_counts.to(torch.float64)
    statistics = ClassStatistics(counts, total=max(float(counts.sum()), 1.0), unit="pixels")
    return build_loss_for("seg", loss_cfg.name, num_classes, statistics, generator=generator,
                          **kwargs)


def _pixel_rows(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor,
                                                                     torch.Tensor]:
    """``[B, C, H, W]``, ``[B, H, W]`` -> ``[B*H*W, C]``, ``[B*H*W]``."""
    c = logits.shape[1]
    return logits.permute(0, 2, 3, 1).reshape(-1, c), targets.reshape(-1)


def _loss(criterion: LongTailLoss, logits: torch.Tensor, targets: torch.Tensor
          ) -> torch.Tensor:
    """The loss of per-pixel logits, fed as the loss declares (``traits.pixels``)."""
    if criterion.traits.pixels == "rows":
        return criterion(*_pixel_rows(logits, targets))
    return criterion(logits, targets)


@torch.no_grad()
def evaluate(model: nn.Module, criterion: LongTailLoss, dataset: Dataset, num_classes: int,
             pixel_share: torch.Tensor, device: torch.device, head_above: float,
             tail_below: float, ignore_index: int, batch_size: int = 16, num_workers: int = 0,
             amp: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """mIoU, per-class IoU, pixel accuracy and group mIoU over ``dataset``.

    Each rank evaluates a disjoint shard (no padding) and the confusion matrices are
    all-reduced once. Images of different sizes are evaluated one by one.
    """
    from ..metrics.segmentation import SegmentationMetrics

    loader = evaluation_loader(model, dataset, batch_size, num_workers, _stack_or_list)
    metrics = SegmentationMetrics(num_classes, ignore_index=ignore_index, device=device)
    for images, targets in loader:
        for x, y in (zip(images, targets) if isinstance(images, list) else [(images, targets)]):
            x = x.to(device) if x.ndim == 4 else x[None].to(device)
            y = y.to(device) if y.ndim == 3 else y[None].to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32,
                                enabled=amp is not None):
                logits = model(x)
            metrics.update(criterion.scores(logits.float()).argmax(1), y)
    metrics.sync()
    return metrics.compute(pixel_share=pixel_share, head_above=head_above,
                           tail_below=tail_below)


def _stack_or_list(batch):
    images, targets = zip(*batch)
    if len({tuple(t.shape) for t in targets}) == 1:
        return torch.stack(images), torch.stack(targets)
    return list(images), list(targets)


def build_job(cfg: SegmentationConfig, device: torch.device) -> Job:
    """Data, loss (which sets the number of output channels) and model, as a :class:`Job`."""
    from .segmentation_models import build_segmenter

    data = build_data(cfg)
    # Stochastic losses draw from their own generator (per rank), saved in checkpoints.
    generator = torch.Generator(device).manual_seed(cfg.seed * 7919 + distributed.rank())
    criterion = build_criterion(cfg.loss, data.num_classes, data.pixel_counts,
                                cfg.data.ignore_index, generator).to(device)
    m = cfg.model
    model = build_segmenter(m.arch, criterion.num_channels, m.backbone, m.pretrained,
                            m.pretrained_backbone, **m.options).to(device)
    amp = amp_dtype(cfg.optim.amp, device)
    share = data.pixel_counts.to(torch.float64) / data.pixel_counts.sum().clamp(min=1)

    def step(train_model: nn.Module, batch) -> Tuple[torch.Tensor, int, Dict[str, Any]]:
        images, targets = batch
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = train_model(images)
        return _loss(criterion, logits.float(), targets), len(images), {}

    def run_evaluation() -> Dict[str, Any]:
        return evaluate(model, criterion, data.val, data.num_classes, share, device,
                        cfg.eval.head_above, cfg.eval.tail_below, cfg.data.ignore_index,
                        cfg.data.eval_batch_size, cfg.data.num_workers, amp)

    d = cfg.data
    pixels = data.pixel_counts.tolist()
    return Job(kind="seg", model=model, criterion=criterion, train_set=data.train,
               sampler_labels=data.image_labels, num_classes=data.num_classes, step=step,
               evaluate=run_evaluation, summary_keys=("miou", "pixel_accuracy"),
               layout={"data": d.name, "root": str(d.root), "augment": d.augment,
                       "crop_size": d.crop_size},
               start_info={"train_pixel_counts": pixels},
               loss_generator=generator,
               result_info={"train_counts": pixels, "count_unit": "pixels",
                            "class_names": data.class_names})
