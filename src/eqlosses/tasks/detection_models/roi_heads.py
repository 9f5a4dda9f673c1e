"""Two-stage detectors: torchvision's ``RoIHeads`` with the box classifier trained and
scored by a loss of the package (see :mod:`eqlosses.tasks.detection_models`)."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import (RoIHeads, maskrcnn_inference,
                                                    maskrcnn_loss)
from torchvision.ops import boxes as box_ops

from .conventions import check_gt_labels, to_loss_targets

__all__ = ["LossBoxPredictor", "LossRoIHeads"]


class LossBoxPredictor(nn.Module):
    """Fast R-CNN box predictor: ``num_channels`` class logits and class-specific box deltas
    for the ``num_classes`` foreground classes (``[N, 4 C]``, class ``j`` at ``4j:4j+4``).

    Initialisation as in Detectron/mmdetection: normal with std 0.01 (classes) and 0.001
    (boxes), zero biases.

    >>> LossBoxPredictor(16, num_classes=3, num_channels=4)(torch.zeros(2, 16))[1].shape
    torch.Size([2, 12])
    """

    def __init__(self, in_channels: int, num_classes: int, num_channels: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_channels)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class LossRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` whose box classifier is trained by ``box_loss`` and scored by
    ``box_loss.scores`` (see the module docstring). Keypoint heads are not supported.

    Args: those of ``RoIHeads`` (positional), then ``box_loss`` (keyword): the loss, kept as
    the submodule ``box_loss``.
    """

    def __init__(self, *args: Any, box_loss: nn.Module, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.box_loss = box_loss

    @property
    def num_classes(self) -> int:
        return self.box_loss.num_classes

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads, box_loss: nn.Module) -> "LossRoIHeads":
        """The same heads (sharing the modules and settings of ``heads``) with ``box_loss``."""
        new = cls(heads.box_roi_pool, heads.box_head, heads.box_predictor,
                  heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
                  heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
                  heads.box_coder.weights, heads.score_thresh, heads.nms_thresh,
                  heads.detections_per_img, heads.mask_roi_pool, heads.mask_head,
                  heads.mask_predictor, box_loss=box_loss)
        return new

    def check_targets(self, targets):
        super().check_targets(targets)
        for i, t in enumerate(targets):
            if not t["boxes"].is_floating_point():
                raise TypeError(f"target {i}: boxes must be a float tensor, got {t['boxes'].dtype}")
        check_gt_labels(targets, self.num_classes)

    def fastrcnn_loss(self, class_logits: torch.Tensor, box_regression: torch.Tensor,
                      labels: List[torch.Tensor], regression_targets: List[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(classification loss, box loss)`` of the sampled RoIs of the whole batch.

        Classification: ``box_loss(class_logits, to_loss_targets(labels))``, one call.
        Box: smooth L1 (beta 1/9) of the deltas of the foreground class ``label - 1`` on the
        positive RoIs, summed and divided by the number of sampled RoIs (torchvision's).
        """
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        targets = to_loss_targets(labels, self.num_classes, self.box_loss.ignore_index)
        loss_cls = self.box_loss(class_logits, targets)
        pos = torch.where(labels > 0)[0]
        deltas = box_regression.reshape(box_regression.shape[0], -1, 4)
        loss_box = F.smooth_l1_loss(deltas[pos, labels[pos] - 1], regression_targets[pos],
                                    beta=1 / 9, reduction="sum") / max(1, labels.numel())
        return loss_cls, loss_box

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """Boxes, scores and labels (``1..C``) per image: scores ``box_loss.scores`` ``[N, C]``,
        class-specific box decoding, score threshold, per-class NMS, top ``detections_per_img``.
        """
        num_classes = self.num_classes
        boxes_per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)  # [N, C, 4]
        pred_scores = self.box_loss.scores(class_logits)  # [N, C]
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(pred_boxes.split(boxes_per_image, 0),
                                              pred_scores.split(boxes_per_image, 0),
                                              image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(1, num_classes + 1, device=scores.device)
            labels = labels.view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)
            keep = keep[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    def _mask_logits(self, features, boxes, image_shapes) -> torch.Tensor:
        x = self.mask_roi_pool(features, boxes, image_shapes)
        return self.mask_predictor(self.mask_head(x))

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.has_keypoint():
            raise NotImplementedError("LossRoIHeads has no keypoint branch")
        if self.training:
            proposals, matched_idxs, labels, regression_targets = \
                self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)

        result: List[Dict[str, torch.Tensor]] = []
        losses: Dict[str, torch.Tensor] = {}
        if self.training:
            loss_cls, loss_box = self.fastrcnn_loss(class_logits, box_regression, labels,
                                                    regression_targets)
            losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        else:
            boxes, scores, out_labels = self.postprocess_detections(
                class_logits, box_regression, proposals, image_shapes)
            result = [{"boxes": b, "labels": lab, "scores": s}
                      for b, s, lab in zip(boxes, scores, out_labels)]

        if self.has_mask():
            # the mask predictor has C channels: class label l (1..C) uses channel l - 1
            if self.training:
                pos = [torch.where(lab > 0)[0] for lab in labels]
                mask_boxes = [p[i] for p, i in zip(proposals, pos)]
                pos_matched = [m[i] for m, i in zip(matched_idxs, pos)]
                mask_logits = self._mask_logits(features, mask_boxes, image_shapes)
                losses["loss_mask"] = maskrcnn_loss(
                    mask_logits, mask_boxes, [t["masks"] for t in targets],
                    [t["labels"] - 1 for t in targets], pos_matched)
            else:
                mask_logits = self._mask_logits(features, [r["boxes"] for r in result],
                                                image_shapes)
                probs = maskrcnn_inference(mask_logits, [r["labels"] - 1 for r in result])
                for prob, r in zip(probs, result):
                    r["masks"] = prob
        return result, losses
