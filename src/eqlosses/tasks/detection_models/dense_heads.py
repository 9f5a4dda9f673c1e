"""One-stage detectors: torchvision's RetinaNet and FCOS with the classification branch
trained and scored by a loss of the package (see :mod:`eqlosses.tasks.detection_models`)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetHead
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

from .conventions import (check_gt_labels, dense_normalizer, dense_quality, dense_targets,
                          matched_gt_boxes)

__all__ = ["dense_loss", "LossRetinaNetClassificationHead", "LossRetinaNetHead",
           "LossRetinaNet", "LossFCOSClassificationHead", "LossFCOSHead", "LossFCOS"]


def dense_loss(loss: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
               quality: Optional[torch.Tensor],
               normalizer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One call of ``loss`` on all anchors, normalised by the positives averaged over
    processes (at least 1) unless ``normalizer`` is given. The loss's declared traits say
    whether it takes the normaliser (else it sums and is divided here) and needs quality."""
    if normalizer is None:
        num_classes = loss.num_classes
        positive = (targets != loss.ignore_index) & (targets >= 0) & (targets < num_classes)
        normalizer = dense_normalizer(positive.sum(), logits.device)
    kwargs: Dict[str, Any] = {}
    traits = loss.traits
    if traits.quality:
        if quality is None:
            raise ValueError(f"{type(loss).__name__} needs quality targets")
        kwargs["quality"] = quality
    if traits.normalizer:
        return loss(logits, targets, normalizer=normalizer, **kwargs)
    return loss(logits, targets, **kwargs) / normalizer  # a loss with reduction="sum"


class LossRetinaNetClassificationHead(RetinaNetClassificationHead):
    """RetinaNet classification head with ``loss.num_channels`` outputs per anchor, trained by
    ``loss`` (a submodule) in one call over all anchors of the batch (module docstring)."""

    def __init__(self, in_channels: int, num_anchors: int, loss: nn.Module,
                 prior_probability: float = 0.01, norm_layer=None):
        super().__init__(in_channels, num_anchors, loss.num_channels, prior_probability,
                         norm_layer=norm_layer)
        self.loss = loss

    def anchor_targets(self, targets, matched_idxs) -> torch.Tensor:
        """``[B * A]`` loss targets: ``label - 1``, ``C`` (background) or ``ignore_index``
        (between the IoU thresholds)."""
        return dense_targets(targets, matched_idxs, self.loss.num_classes,
                              self.loss.ignore_index, self.BETWEEN_THRESHOLDS)

    def compute_loss(self, targets, head_outputs, matched_idxs, quality=None):
        check_gt_labels(targets, self.loss.num_classes)
        logits = head_outputs["cls_logits"]
        logits = logits.reshape(-1, logits.shape[-1])
        return dense_loss(self.loss, logits, self.anchor_targets(targets, matched_idxs),
                           quality)


class LossRetinaNetHead(RetinaNetHead):
    """RetinaNet head whose classification branch is :class:`LossRetinaNetClassificationHead`;
    for a quality loss (EQFL) it hands the IoU of the decoded predicted boxes to the
    classification loss. The box regression loss is torchvision's (L1)."""

    def __init__(self, in_channels: int, num_anchors: int, loss: nn.Module, norm_layer=None):
        super().__init__(in_channels, num_anchors, loss.num_channels, norm_layer=norm_layer)
        self.classification_head = LossRetinaNetClassificationHead(
            in_channels, num_anchors, loss, norm_layer=norm_layer)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        quality = None
        if self.classification_head.loss.traits.quality:
            positive = torch.cat([m >= 0 for m in matched_idxs])
            reg = head_outputs["bbox_regression"]
            pred = self.regression_head.box_coder.decode_single(
                reg.reshape(-1, 4).detach(), torch.cat(anchors))
            gt = matched_gt_boxes(targets, matched_idxs).reshape(-1, 4)
            quality = dense_quality(pred, gt, positive)
        return {
            "classification": self.classification_head.compute_loss(
                targets, head_outputs, matched_idxs, quality=quality),
            "bbox_regression": self.regression_head.compute_loss(
                targets, head_outputs, anchors, matched_idxs),
        }


def _select_level(scores: torch.Tensor, score_thresh: float, topk: int):
    """Flattened ``[A, C]`` scores above the threshold, top ``topk``: (scores, anchor index,
    label 1..C)."""
    num_classes = scores.shape[-1]
    scores = scores.flatten()
    idxs = torch.where(scores > score_thresh)[0]
    scores = scores[idxs]
    scores, order = scores.topk(det_utils._topk_min(idxs, topk, 0))
    idxs = idxs[order]
    return scores, torch.div(idxs, num_classes, rounding_mode="floor"), idxs % num_classes + 1


def _dense_postprocess(model, head_outputs, anchors, image_shapes, decode, level_scores):
    detections = []
    for index, image_shape in enumerate(image_shapes):
        image_boxes, image_scores, image_labels = [], [], []
        for level, anchors_level in enumerate(anchors[index]):
            scores = level_scores(head_outputs, index, level)
            scores, anchor_idxs, labels = _select_level(scores, model.score_thresh,
                                                        model.topk_candidates)
            reg = head_outputs["bbox_regression"][level][index]
            boxes = decode(reg[anchor_idxs], anchors_level[anchor_idxs])
            image_boxes.append(box_ops.clip_boxes_to_image(boxes, image_shape))
            image_scores.append(scores)
            image_labels.append(labels)
        boxes, scores = torch.cat(image_boxes), torch.cat(image_scores)
        labels = torch.cat(image_labels)
        keep = box_ops.batched_nms(boxes, scores, labels, model.nms_thresh)
        keep = keep[: model.detections_per_img]
        detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return detections


class LossRetinaNet(RetinaNet):
    """torchvision RetinaNet whose test-time scores are ``loss.scores`` and whose labels are
    ``1..C`` (the head has ``C`` columns, no unused background column)."""

    @property
    def loss(self) -> nn.Module:
        return self.head.classification_head.loss

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        return _dense_postprocess(
            self, head_outputs, anchors, image_shapes, self.box_coder.decode_single,
            lambda out, i, lvl: self.loss.scores(out["cls_logits"][lvl][i]))


class LossFCOSClassificationHead(FCOSClassificationHead):
    """FCOS classification head with ``loss.num_channels`` outputs, holding ``loss``."""

    def __init__(self, in_channels: int, num_anchors: int, loss: nn.Module, num_convs: int = 4,
                 prior_probability: float = 0.01, norm_layer=None):
        super().__init__(in_channels, num_anchors, loss.num_channels, num_convs,
                         prior_probability, norm_layer)
        self.loss = loss


class LossFCOSHead(FCOSHead):
    """FCOS head: classification by ``loss`` (one call, ``C`` for unmatched points), GIoU box
    loss and centerness BCE as torchvision's, all three divided by the same normaliser
    ``max(1, mean over processes of the number of positive points)`` (torchvision divides by
    the local count)."""

    def __init__(self, in_channels: int, num_anchors: int, loss: nn.Module, num_convs: int = 4):
        super().__init__(in_channels, num_anchors, loss.num_channels, num_convs)
        self.classification_head = LossFCOSClassificationHead(in_channels, num_anchors, loss,
                                                              num_convs)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        loss = self.classification_head.loss
        check_gt_labels(targets, loss.num_classes)
        cls_logits = head_outputs["cls_logits"]
        bbox_regression = head_outputs["bbox_regression"]
        ctrness = head_outputs["bbox_ctrness"].squeeze(dim=2)
        cls_targets = dense_targets(targets, matched_idxs, loss.num_classes,
                                     loss.ignore_index, None)
        gt_boxes = matched_gt_boxes(targets, matched_idxs)
        anchors = torch.stack(anchors)
        foreground = torch.stack(matched_idxs) >= 0
        normalizer = dense_normalizer(foreground.sum(), cls_logits.device)
        pred_boxes = self.box_coder.decode(bbox_regression, anchors)
        quality = None
        if loss.traits.quality:
            quality = dense_quality(pred_boxes.reshape(-1, 4), gt_boxes.reshape(-1, 4),
                                     foreground.reshape(-1))
        loss_cls = dense_loss(loss, cls_logits.reshape(-1, cls_logits.shape[-1]), cls_targets,
                               quality, normalizer)
        loss_box = generalized_box_iou_loss(pred_boxes[foreground], gt_boxes[foreground],
                                            reduction="sum") / normalizer
        reg_targets = self.box_coder.encode(anchors, gt_boxes)
        lr, tb = reg_targets[..., [0, 2]], reg_targets[..., [1, 3]]
        ctr_targets = torch.sqrt((lr.min(dim=-1)[0] / lr.max(dim=-1)[0]).clamp(min=0)
                                 * (tb.min(dim=-1)[0] / tb.max(dim=-1)[0]).clamp(min=0))
        loss_ctr = F.binary_cross_entropy_with_logits(
            ctrness[foreground], ctr_targets[foreground], reduction="sum") / normalizer
        return {"classification": loss_cls, "bbox_regression": loss_box,
                "bbox_ctrness": loss_ctr}


class LossFCOS(FCOS):
    """torchvision FCOS with scores ``sqrt(loss.scores(logits) * sigmoid(centerness))`` and
    labels ``1..C``."""

    @property
    def loss(self) -> nn.Module:
        return self.head.classification_head.loss

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        def level_scores(out, i, lvl):
            scores = self.loss.scores(out["cls_logits"][lvl][i])
            return torch.sqrt(scores * torch.sigmoid(out["bbox_ctrness"][lvl][i]))

        return _dense_postprocess(self, head_outputs, anchors, image_shapes,
                                  self.box_coder.decode, level_scores)
