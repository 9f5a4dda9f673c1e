"""Label conventions between torchvision's detectors and the package's losses, and the
per-anchor targets, quality and normaliser of the dense heads."""

from __future__ import annotations

from typing import Optional

import torch

from ...distributed import mean_across_processes

__all__ = ["to_loss_targets", "check_gt_labels", "paired_iou", "dense_targets",
           "dense_normalizer", "dense_quality", "matched_gt_boxes"]


def to_loss_targets(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """torchvision RoI labels (``0`` background, ``1..C`` foreground, ``< 0`` ignored) to the
    loss convention (``0..C-1`` foreground, ``C`` background, ``ignore_index``).

    >>> to_loss_targets(torch.tensor([0, 1, 3, -1]), 3, -100)
    tensor([   3,    0,    2, -100])
    """
    out = torch.where(labels == 0, torch.full_like(labels, num_classes), labels - 1)
    return torch.where(labels < 0, torch.full_like(labels, ignore_index), out)


def check_gt_labels(targets, num_classes: int) -> None:
    for i, t in enumerate(targets):
        labels = t["labels"]
        if labels.dtype != torch.int64:
            raise ValueError(f"target {i}: labels must be int64, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
            raise ValueError(f"target {i}: labels must be in [1, {num_classes}] (torchvision "
                             f"convention, 0 is the background), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (``[N, 4]`` xyxy each) -> ``[N]``."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


def dense_targets(targets, matched_idxs, num_classes: int, ignore_index: int,
                   between: Optional[int]) -> torch.Tensor:
    """Per-anchor loss targets of all images, concatenated: matched -> ``label - 1``,
    unmatched (``-1``) -> ``C``, ``between`` (RetinaNet's -2) -> ``ignore_index``."""
    out = []
    for t, m in zip(targets, matched_idxs):
        if t["labels"].numel():
            cls = t["labels"][m.clamp(min=0)] - 1
        else:
            cls = torch.zeros_like(m)
        cls = torch.where(m >= 0, cls, torch.full_like(cls, num_classes))
        if between is not None:
            cls = torch.where(m == between, torch.full_like(cls, ignore_index), cls)
        out.append(cls)
    return torch.cat(out)


def dense_normalizer(num_pos: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``max(1, mean over processes of num_pos)`` (one all-reduce)."""
    return mean_across_processes(num_pos.float(), device).clamp(min=1.0)


def dense_quality(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor,
                   positive: torch.Tensor) -> torch.Tensor:
    """``[A]`` IoU(predicted, matched gt) on positive anchors, 0 elsewhere; detached."""
    quality = torch.zeros(positive.shape, dtype=pred_boxes.dtype, device=pred_boxes.device)
    if bool(positive.any()):
        quality[positive] = paired_iou(pred_boxes[positive].detach().float(),
                                        gt_boxes[positive].float()).to(quality.dtype)
    return quality.detach()


def matched_gt_boxes(targets, matched_idxs) -> torch.Tensor:
    out = []
    for t, m in zip(targets, matched_idxs):
        boxes = t["boxes"]
        if boxes.numel() == 0:
            out.append(boxes.new_zeros((m.shape[0], 4)))
        else:
            out.append(boxes[m.clamp(min=0)])
    return torch.stack(out)
