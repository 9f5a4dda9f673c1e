"""Semantic segmentation metrics (dataset-level mIoU, by frequency group) from one sum-state.

The only state is the pixel confusion matrix ``M`` (int64 ``[C, C]``, ``M[i, j]`` = labelled
pixels of true class ``i`` predicted as ``j``), so the metrics of several processes combine
exactly with one SUM all-reduce, whatever the split of the images or the batching. With
``TP_c = M[c, c]``, ``FP_c = sum_i M[i, c] - TP_c`` and ``FN_c = sum_j M[c, j] - TP_c``:

    IoU_c          = TP_c / (TP_c + FP_c + FN_c)      (NaN when the union is 0)
    mIoU           = mean of IoU_c over the classes whose union is not 0
    pixel_accuracy = sum_c TP_c / sum M
    acc_c          = TP_c / (TP_c + FN_c)              (NaN for a class without test pixels)
    mean_accuracy  = mean of acc_c over the classes with test pixels

IoU is dataset-level: intersection and union are summed over all test pixels before dividing
(the standard ADE20K / Cityscapes protocol, not a mean of per-image IoUs). A class that is
neither in the ground truth nor predicted has no IoU (NaN) and is left out of the means; a
class predicted but absent from the ground truth has IoU 0 and counts (the mmsegmentation
convention). Pixels labelled ``ignore_index`` count nowhere, whatever is predicted there.

Frequency groups (METHOD.md section 4): classes are split by their share of the *training*
pixels, ``head`` above ``head_above`` (default 1 %), ``tail`` below ``tail_below`` (default
0.1 %), ``body`` in between; with 150 ADE20K classes a uniform share would be 0.67 %. A
group's mIoU is the mean IoU of its classes that have one.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Union

import torch

from ..data.frequency import FrequencyGroups
from .confusion import ConfusionMatrixState

__all__ = ["SegmentationMetrics"]

Device = Union[torch.device, str]


class SegmentationMetrics(ConfusionMatrixState):
    """Pixel confusion matrix of a ``num_classes``-way segmenter, and mIoU from it.

    The one state, ``confusion``, and :meth:`reset`, :meth:`sync`, :meth:`state_dict` /
    :meth:`load_state_dict` and :meth:`to` come from :class:`ConfusionMatrixState`.
    Distributed evaluation: each rank calls :meth:`update` on its images, then every rank
    calls :meth:`sync` once (one all-reduce), after which :meth:`compute` gives on every rank
    the result of one process evaluating all images.

    Args:
        num_classes: number of classes ``C``.
        ignore_index: target label of the pixels that count nowhere.
        device: device of the confusion matrix. None (default): it follows the inputs of
            :meth:`update`. With NCCL pass the rank's CUDA device, so that :meth:`sync` works
            on a rank that saw no image.

    Example:
        >>> m = SegmentationMetrics(3, ignore_index=255)
        >>> target = torch.tensor([[[0, 0, 1, 255]]])
        >>> pred = torch.tensor([[[0, 1, 1, 2]]])
        >>> m.update(pred, target)
        >>> r = m.compute()
        >>> r["per_class_iou"], r["miou"], r["pixel_accuracy"]
        ([0.5, 0.5, nan], 0.5, 0.6666666666666666)
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, *,
                 device: Optional[Device] = None) -> None:
        super().__init__(num_classes, ignore_index=int(ignore_index), device=device)

    def __repr__(self) -> str:
        return (f"SegmentationMetrics(num_classes={self.num_classes}, ignore_index="
                f"{self.ignore_index}, num_pixels={self.num_pixels})")

    @property
    def num_pixels(self) -> int:
        """Labelled pixels counted so far."""
        return int(self.confusion.sum())

    @torch.no_grad()
    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Count one batch.

        Args:
            preds: ``[B, H, W]`` integer predicted classes, or ``[B, C, H, W]`` logits /
                scores (the prediction is the arg-max over ``C``).
            targets: ``[B, H, W]`` integer labels in ``[0, C)`` or ``ignore_index``.
        """
        self._check_not_synced()
        if targets.dim() != 3 or targets.is_floating_point() or targets.is_complex() \
                or targets.dtype == torch.bool:
            raise ValueError(f"targets must be integer labels of shape [B, H, W], got dtype "
                             f"{targets.dtype} and shape {tuple(targets.shape)}")
        if preds.dim() == 4:
            if preds.shape[1] != self.num_classes:
                raise ValueError(f"scores must have shape [B, {self.num_classes}, H, W], got "
                                 f"{tuple(preds.shape)}")
            preds = preds.detach().argmax(dim=1)
        elif preds.dim() != 3 or preds.is_floating_point() or preds.dtype == torch.bool:
            raise ValueError(f"preds must be integer classes [B, H, W] or scores "
                             f"[B, {self.num_classes}, H, W], got dtype {preds.dtype} and "
                             f"shape {tuple(preds.shape)}")
        if preds.shape != targets.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} "
                             f"must have the same [B, H, W]")
        self._count(preds, targets)

    def compute(self, pixel_share: Optional[torch.Tensor] = None, head_above: float = 0.01,
                tail_below: float = 0.001, groups: Optional[FrequencyGroups] = None
                ) -> Dict[str, Any]:
        """The metrics as a JSON-serialisable dict (Python floats, ints, lists; NaN allowed).

        Keys: ``miou``, ``per_class_iou`` (``[C]``, NaN where the union is 0),
        ``pixel_accuracy``, ``mean_accuracy``, ``per_class_accuracy`` (``[C]``), ``num_pixels``,
        and ``groups`` (group -> mIoU of its classes; NaN for a group with no IoU),
        ``group_bounds`` (group -> ``[low, high]`` training pixel share; ``head``:
        ``share > head_above``, ``body``: ``tail_below <= share <= head_above``, ``tail``:
        ``share < tail_below``), ``group_of`` (the group of each class) - the last three empty
        without ``pixel_share`` or ``groups``.

        Args:
            pixel_share: ``[C]`` training pixels per class, as counts or fractions (normalised
                here to sum to 1), e.g. ``eqlosses.data.segmentation.pixel_counts(train)``.
            head_above: the head group's threshold, a fraction of the training pixels.
            tail_below: the tail group's threshold, a fraction of the training pixels.
            groups: any other partition of the classes (instead of ``pixel_share``).
        """
        c = self.num_classes
        conf = self.confusion.to("cpu", torch.float64)
        tp = conf.diagonal()
        gt = conf.sum(dim=1)
        pred = conf.sum(dim=0)
        union = gt + pred - tp
        nan = math.nan
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, nan))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, nan))
        total = float(gt.sum())

        def nanmean(x: torch.Tensor) -> float:
            x = x[~x.isnan()]
            return float(x.mean()) if x.numel() else nan

        out: Dict[str, Any] = {
            "miou": nanmean(iou),
            "per_class_iou": iou.tolist(),
            "pixel_accuracy": float(tp.sum()) / total if total else nan,
            "mean_accuracy": nanmean(acc),
            "per_class_accuracy": acc.tolist(),
            "num_pixels": int(total),
        }
        if pixel_share is not None and groups is not None:
            raise ValueError("pass pixel_share or groups, not both")
        group_miou: Dict[str, float] = {}
        bounds: Dict[str, List[float]] = {}
        group_of: List[str] = []
        if pixel_share is not None:
            groups = self.pixel_share_groups(pixel_share, head_above, tail_below)
        if groups is not None:
            for name, mask in groups.masks.items():
                mask = torch.as_tensor(mask, dtype=torch.bool).cpu()
                if mask.shape != (c,):
                    raise ValueError(f"group {name!r} has a class mask of shape "
                                     f"{tuple(mask.shape)}, expected ({c},) for {c} classes")
                group_miou[name] = nanmean(iou[mask])
            bounds = {name: [float(lo), float(hi)] for name, (lo, hi) in groups.bounds.items()}
            group_of = groups.group_of()
        out["groups"] = group_miou
        out["group_bounds"] = bounds
        out["group_of"] = group_of
        return out

    def pixel_share_groups(self, pixel_share: torch.Tensor, head_above: float = 0.01,
                           tail_below: float = 0.001) -> FrequencyGroups:
        """Head / body / tail classes by training pixel share (see :meth:`compute`).

        >>> g = SegmentationMetrics(3).pixel_share_groups(torch.tensor([9000, 50, 1]))
        >>> g.group_of()
        ['head', 'body', 'tail']
        """
        share = torch.as_tensor(pixel_share, dtype=torch.float64).cpu()
        if share.shape != (self.num_classes,):
            raise ValueError(f"pixel_share must have shape ({self.num_classes},), got "
                             f"{tuple(share.shape)}")
        if bool((share < 0).any()) or not bool(share.isfinite().all()) or float(share.sum()) <= 0:
            raise ValueError("pixel_share must be finite, non-negative and not all zero")
        if not 0 <= tail_below <= head_above <= 1:
            raise ValueError(f"need 0 <= tail_below <= head_above <= 1, got tail_below="
                             f"{tail_below}, head_above={head_above}")
        share = share / share.sum()
        head = share > head_above
        tail = share < tail_below
        return FrequencyGroups(
            masks={"head": head, "body": ~head & ~tail, "tail": tail},
            bounds={"head": (head_above, 1.0), "body": (tail_below, head_above),
                    "tail": (0.0, tail_below)})
