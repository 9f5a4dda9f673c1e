"""Detectors whose box classifier is trained by an eqlosses loss (R-CNN, RetinaNet, FCOS).

The models are torchvision's, with the classification loss and the test-time scores taken from
a loss object of this package instead of the hard-coded softmax cross-entropy / focal loss.

**How the loss is injected.** No module function of torchvision is patched; subclasses are:

* Two-stage (``faster_rcnn``, ``mask_rcnn``): :class:`LossRoIHeads` subclasses torchvision's
  ``RoIHeads``. Its :meth:`~LossRoIHeads.fastrcnn_loss` converts the sampled RoI labels from
  torchvision's convention (0 = background, 1..C foreground) to the package's (foreground
  ``j -> j - 1``, background ``-> C``, ignored ``-> loss.ignore_index``) and calls the loss
  (``roi_heads.box_loss``) once on all RoIs of the batch; its
  :meth:`~LossRoIHeads.postprocess_detections` scores boxes with ``loss.scores(logits)``
  (``[N, C]``). The box predictor (:class:`LossBoxPredictor`) has ``loss.num_channels`` class
  logits and ``4 C`` class-specific box deltas (no background deltas), indexed by the
  foreground class ``label - 1``. The mask predictor has ``C`` channels; channel ``label - 1``
  is trained and returned for a box of label ``label``.
* One-stage (``retinanet``, ``fcos``): the classification head keeps the loss
  (``head.classification_head.loss``). Anchors matched to a ground-truth box of label ``l``
  get target ``l - 1``; unmatched anchors target ``C`` (background: a negative for every
  class); RetinaNet anchors between the IoU thresholds (``Matcher.BETWEEN_THRESHOLDS``) get
  ``loss.ignore_index`` and count nowhere. The loss is called **once** on the anchors of all
  images of the batch (one statistics update, one all-reduce per step) with

      normalizer = max(1, mean over processes of the number of positive anchors)
                 = max(1, eqlosses.distributed.mean_across_processes(num_pos))

  so every rank divides by the same number (the EFL reference's ``num_total_pos``). For EQFL
  the quality target of a positive anchor is ``IoU(decoded predicted box, matched gt box)``,
  detached. Test-time scores: ``loss.scores(logits)`` (RetinaNet);
  ``sqrt(loss.scores(logits) * sigmoid(centerness))`` (FCOS).

In both cases the loss module is a submodule of the model, so ``model.state_dict()`` holds its
statistics, ``model.to(device)`` moves them and ``model.train()/eval()`` switches whether its
forward updates them; :func:`detection_loss` returns it. The statistics update happens in the
loss's forward during training and needs nothing else.

Conventions of the models (torchvision's): ``model(images, targets)`` in training mode returns
the loss dict (``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``
and ``loss_mask`` for the R-CNNs; ``classification``, ``bbox_regression`` (and
``bbox_ctrness``) for RetinaNet/FCOS); target and output ``labels`` are ``1..C`` and boxes are
``xyxy`` in pixels. The LVIS test protocol is the default: score threshold ``1e-4``, at most
300 detections per image, per-class NMS at IoU 0.5.

Backbones (random initialisation; nothing is ever downloaded):

=============  ======================================  ============================  ==========
backbone       levels (strides), two-stage / dense     anchor sizes (two-stage)      (dense)
=============  ======================================  ============================  ==========
tiny           4-64 / 8-128, 64 FPN channels           16, 32, 64, 128, 256          16-256 x3
mobilenet_v3   8-64 / 8-128 (MobileNetV3-Large FPN)    32, 64, 128, 256              16-256 x3
resnet18       4-64 / 8-128 (ResNet-18 FPN)            32, 64, 128, 256, 512         32-512 x3
resnet50       4-64 / 8-128 (ResNet-50 FPN, for GPUs)  32, 64, 128, 256, 512         32-512 x3
=============  ======================================  ============================  ==========

Each level has one anchor size (two-stage, aspect ratios 0.5, 1, 2) or three (dense: the size
times ``2^0, 2^(1/3), 2^(2/3)``); ``anchor_sizes=`` overrides them. FCOS uses one point per
location (its anchor size is the level's stride). The ResNet models and the R-CNN heads are
torchvision's own compositions, so torchvision checkpoints saved on disk load by name
(``pretrained=``); the class-specific layers of another class count are skipped with a warning.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import mean_across_processes
from .common import load_weights_file

try:
    import torchvision  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("eqlosses.tasks.detection_models needs torchvision: "
                      "pip install 'eqlosses[vision]'") from err

from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (BackboneWithFPN, _mobilenet_extractor,
                                                          _resnet_fpn_extractor)
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import (RetinaNetClassificationHead, RetinaNetHead)
from torchvision.models.detection.roi_heads import (RoIHeads, maskrcnn_inference,
                                                    maskrcnn_loss)
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

__all__ = ["ARCHS", "BACKBONES", "LossBoxPredictor", "LossRoIHeads",
           "LossRetinaNetClassificationHead", "LossRetinaNetHead", "LossRetinaNet",
           "LossFCOSClassificationHead", "LossFCOSHead", "LossFCOS", "TinyBackbone",
           "build_detector", "build_detection_backbone", "detection_loss", "to_loss_targets",
           "load_weights_file"]

ARCHS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")
BACKBONES = ("tiny", "mobilenet_v3", "resnet18", "resnet50")
_TWO_STAGE = ("faster_rcnn", "mask_rcnn")

#: default anchor sizes per pyramid level: (two-stage, dense)
_ANCHORS = {
    "tiny": ((16, 32, 64, 128, 256), (16, 32, 64, 128, 256)),
    "mobilenet_v3": ((32, 64, 128, 256), (16, 32, 64, 128, 256)),
    "resnet18": ((32, 64, 128, 256, 512), (32, 64, 128, 256, 512)),
    "resnet50": ((32, 64, 128, 256, 512), (32, 64, 128, 256, 512)),
}
_FCOS_STRIDES = (8, 16, 32, 64, 128)


# ---------------------------------------------------------------------------------------------
# Label conventions
# ---------------------------------------------------------------------------------------------

def to_loss_targets(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """torchvision RoI labels (``0`` background, ``1..C`` foreground, ``< 0`` ignored) to the
    loss convention (``0..C-1`` foreground, ``C`` background, ``ignore_index``).

    >>> to_loss_targets(torch.tensor([0, 1, 3, -1]), 3, -100)
    tensor([   3,    0,    2, -100])
    """
    out = torch.where(labels == 0, torch.full_like(labels, num_classes), labels - 1)
    return torch.where(labels < 0, torch.full_like(labels, ignore_index), out)


def _check_gt_labels(targets, num_classes: int) -> None:
    for i, t in enumerate(targets):
        labels = t["labels"]
        if labels.dtype != torch.int64:
            raise ValueError(f"target {i}: labels must be int64, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
            raise ValueError(f"target {i}: labels must be in [1, {num_classes}] (torchvision "
                             f"convention, 0 is the background), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")


def _paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (``[N, 4]`` xyxy each) -> ``[N]``."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


# ---------------------------------------------------------------------------------------------
# Which losses fit which head
# ---------------------------------------------------------------------------------------------

def _forward_params(loss: nn.Module) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(loss.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return {}


def _needs_quality(loss: nn.Module) -> bool:
    return "quality" in _forward_params(loss)


def _loss_device(loss: nn.Module) -> torch.device:
    for t in list(loss.parameters()) + list(loss.buffers()):
        return t.device
    return torch.device("cpu")


def _check_common(loss: nn.Module, num_classes: int) -> None:
    if not isinstance(loss, nn.Module) or not callable(getattr(loss, "scores", None)):
        raise ValueError(f"the loss must be an nn.Module with a scores() method (an eqlosses "
                         f"loss), got {type(loss).__name__}")
    if getattr(loss, "num_classes", None) != num_classes:
        raise ValueError(f"the loss was built for num_classes={getattr(loss, 'num_classes', None)}"
                         f", the detector for num_classes={num_classes}")
    if not isinstance(getattr(loss, "num_channels", None), int):
        raise ValueError(f"{type(loss).__name__} has no integer num_channels")


def _check_roi_loss(loss: nn.Module, num_classes: int) -> None:
    """An RoI classifier needs a loss that takes ``(logits, targets)`` with background rows
    (target ``C``); probed once without grad, so no statistics change."""
    _check_common(loss, num_classes)
    name = type(loss).__name__
    if _needs_quality(loss):
        raise ValueError(f"{name} needs a quality target per row and is for the dense heads; "
                         f"use it with arch 'retinanet' or 'fcos'")
    device = _loss_device(loss)
    logits = torch.zeros(2, loss.num_channels, device=device)
    targets = torch.tensor([0, num_classes], device=device)
    try:
        with torch.no_grad():
            loss(logits, targets)
            scores = loss.scores(logits)
    except (ValueError, TypeError, IndexError, RuntimeError) as err:
        raise ValueError(f"{name} cannot train an RoI classifier, which needs background rows "
                         f"(target {num_classes}): {err}. Use e.g. ce (background=True), bce, "
                         f"sigmoid_eql, eql, federated, seesaw or focal/efl") from None
    if tuple(scores.shape) != (2, num_classes):
        raise ValueError(f"{name}.scores() must return [N, {num_classes}], got "
                         f"{tuple(scores.shape)}")


def _takes_normalizer(loss: nn.Module) -> bool:
    return "normalizer" in _forward_params(loss)


def _check_dense_loss(loss: nn.Module, num_classes: int, arch: str) -> None:
    """A dense head needs ``C`` sigmoid columns (background anchors: target ``C``, a negative
    for every class) and a loss it can divide by the number of positives: one with a
    ``normalizer`` argument (focal, efl, eqfl), or one built with ``reduction="sum"``."""
    _check_common(loss, num_classes)
    name = type(loss).__name__
    fits = loss.num_channels == num_classes and (
        _takes_normalizer(loss) or getattr(loss, "reduction", None) == "sum")
    error = None
    if fits:
        device = _loss_device(loss)
        logits = torch.zeros(2, num_classes, device=device)
        targets = torch.tensor([0, num_classes], device=device)
        kwargs: Dict[str, Any] = {"normalizer": 1.0} if _takes_normalizer(loss) else {}
        if _needs_quality(loss):
            kwargs["quality"] = torch.ones(2, device=device)
        try:
            with torch.no_grad():
                loss(logits, targets, **kwargs)
        except (ValueError, TypeError, IndexError, RuntimeError) as err:
            fits, error = False, err
    if not fits:
        raise ValueError(f"arch {arch!r} needs a sigmoid loss with num_classes logit channels "
                         f"that takes background anchors (target {num_classes}) and either a "
                         f"normalizer argument (focal, efl or eqfl) or reduction='sum' (e.g. "
                         f"bce, eql, federated); got {name} with num_channels="
                         f"{loss.num_channels}, reduction={getattr(loss, 'reduction', None)!r}"
                         + (f" ({error})" if error else ""))


def detection_loss(model: nn.Module) -> nn.Module:
    """The loss module inside a detector built by :func:`build_detector`."""
    roi = getattr(model, "roi_heads", None)
    if isinstance(roi, LossRoIHeads):
        return roi.box_loss
    head = getattr(model, "head", None)
    cls_head = getattr(head, "classification_head", None)
    if cls_head is not None and isinstance(getattr(cls_head, "loss", None), nn.Module):
        return cls_head.loss
    raise ValueError(f"{type(model).__name__} holds no eqlosses loss (not built by "
                     f"build_detector)")


# ---------------------------------------------------------------------------------------------
# Two-stage: RoI heads
# ---------------------------------------------------------------------------------------------

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
        _check_gt_labels(targets, self.num_classes)

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


# ---------------------------------------------------------------------------------------------
# One-stage: RetinaNet and FCOS
# ---------------------------------------------------------------------------------------------

def _dense_targets(targets, matched_idxs, num_classes: int, ignore_index: int,
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


def _dense_normalizer(num_pos: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``max(1, mean over processes of num_pos)`` (one all-reduce)."""
    return mean_across_processes(num_pos.float(), device).clamp(min=1.0)


def _dense_loss(loss: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                quality: Optional[torch.Tensor],
                normalizer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One call of ``loss`` on all anchors, normalised by the positives averaged over
    processes (at least 1) unless ``normalizer`` is given."""
    if normalizer is None:
        num_classes = loss.num_classes
        positive = (targets != loss.ignore_index) & (targets >= 0) & (targets < num_classes)
        normalizer = _dense_normalizer(positive.sum(), logits.device)
    kwargs: Dict[str, Any] = {}
    if _needs_quality(loss):
        if quality is None:
            raise ValueError(f"{type(loss).__name__} needs quality targets")
        kwargs["quality"] = quality
    if _takes_normalizer(loss):
        return loss(logits, targets, normalizer=normalizer, **kwargs)
    return loss(logits, targets, **kwargs) / normalizer  # a loss with reduction="sum"


def _dense_quality(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor,
                   positive: torch.Tensor) -> torch.Tensor:
    """``[A]`` IoU(predicted, matched gt) on positive anchors, 0 elsewhere; detached."""
    quality = torch.zeros(positive.shape, dtype=pred_boxes.dtype, device=pred_boxes.device)
    if bool(positive.any()):
        quality[positive] = _paired_iou(pred_boxes[positive].detach().float(),
                                        gt_boxes[positive].float()).to(quality.dtype)
    return quality.detach()


def _matched_gt_boxes(targets, matched_idxs) -> torch.Tensor:
    out = []
    for t, m in zip(targets, matched_idxs):
        boxes = t["boxes"]
        if boxes.numel() == 0:
            out.append(boxes.new_zeros((m.shape[0], 4)))
        else:
            out.append(boxes[m.clamp(min=0)])
    return torch.stack(out)


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
        return _dense_targets(targets, matched_idxs, self.loss.num_classes,
                              self.loss.ignore_index, self.BETWEEN_THRESHOLDS)

    def compute_loss(self, targets, head_outputs, matched_idxs, quality=None):
        _check_gt_labels(targets, self.loss.num_classes)
        logits = head_outputs["cls_logits"]
        logits = logits.reshape(-1, logits.shape[-1])
        return _dense_loss(self.loss, logits, self.anchor_targets(targets, matched_idxs),
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
        if _needs_quality(self.classification_head.loss):
            positive = torch.cat([m >= 0 for m in matched_idxs])
            reg = head_outputs["bbox_regression"]
            pred = self.regression_head.box_coder.decode_single(
                reg.reshape(-1, 4).detach(), torch.cat(anchors))
            gt = _matched_gt_boxes(targets, matched_idxs).reshape(-1, 4)
            quality = _dense_quality(pred, gt, positive)
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
        _check_gt_labels(targets, loss.num_classes)
        cls_logits = head_outputs["cls_logits"]
        bbox_regression = head_outputs["bbox_regression"]
        ctrness = head_outputs["bbox_ctrness"].squeeze(dim=2)
        cls_targets = _dense_targets(targets, matched_idxs, loss.num_classes,
                                     loss.ignore_index, None)
        gt_boxes = _matched_gt_boxes(targets, matched_idxs)
        anchors = torch.stack(anchors)
        foreground = torch.stack(matched_idxs) >= 0
        normalizer = _dense_normalizer(foreground.sum(), cls_logits.device)
        pred_boxes = self.box_coder.decode(bbox_regression, anchors)
        quality = None
        if _needs_quality(loss):
            quality = _dense_quality(pred_boxes.reshape(-1, 4), gt_boxes.reshape(-1, 4),
                                     foreground.reshape(-1))
        loss_cls = _dense_loss(loss, cls_logits.reshape(-1, cls_logits.shape[-1]), cls_targets,
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


# ---------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------

def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class TinyBackbone(nn.Sequential):
    """A CPU-sized convolutional body: a stride-2 stem, then four stages (strides 4, 8, 16, 32)
    of a stride-2 and a stride-1 3x3 convolution with batch norm. ``widths`` are the stage
    channels (``out_channels`` lists them)."""

    def __init__(self, widths: Sequence[int] = (32, 64, 96, 128), stem: int = 16):
        layers: "OrderedDict[str, nn.Module]" = OrderedDict(stem=_conv_bn(3, stem, 2))
        cin = stem
        for i, w in enumerate(widths, start=1):
            layers[f"stage{i}"] = nn.Sequential(_conv_bn(cin, w, 2), _conv_bn(w, w))
            cin = w
        super().__init__(layers)
        self.out_channels = list(widths)


def _freeze(body: nn.Module, names: Sequence[str], trainable: int) -> None:
    """Freeze all but the last ``trainable`` of the named children of ``body``."""
    if not 0 <= trainable <= len(names):
        raise ValueError(f"trainable_backbone_layers must be in [0, {len(names)}], got "
                         f"{trainable}")
    frozen = names[: len(names) - trainable]
    for name, p in body.named_parameters():
        if name.split(".")[0] in frozen:
            p.requires_grad_(False)


def build_detection_backbone(backbone: str, dense: bool, trainable_layers: Optional[int] = None,
                             frozen_bn: bool = False, tiny_channels: int = 64) -> BackboneWithFPN:
    """A randomly initialised FPN backbone (``out_channels`` features per level).

    ``dense=False``: the levels of the R-CNNs (ResNet C2-C5 and a max-pooled level);
    ``dense=True``: those of RetinaNet/FCOS (C3-C5, P6, P7). ``frozen_bn`` uses
    ``FrozenBatchNorm2d`` (for a pretrained body) instead of trainable batch norm.
    """
    extra = LastLevelP6P7(256, 256) if dense else LastLevelMaxPool()
    if backbone == "tiny":
        body = TinyBackbone()
        names = ["stem", "stage1", "stage2", "stage3", "stage4"]
        _freeze(body, names, len(names) if trainable_layers is None else trainable_layers)
        stages = (2, 3, 4) if dense else (1, 2, 3, 4)
        extra = LastLevelP6P7(tiny_channels, tiny_channels) if dense else LastLevelMaxPool()
        return BackboneWithFPN(body, {f"stage{s}": str(i) for i, s in enumerate(stages)},
                               [body.out_channels[s - 1] for s in stages], tiny_channels,
                               extra_blocks=extra)
    norm = misc_nn_ops.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    if backbone in ("resnet18", "resnet50"):
        net = getattr(torchvision.models, backbone)(weights=None, norm_layer=norm)
        layers = 5 if trainable_layers is None else trainable_layers
        if not 0 <= layers <= 5:
            raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {layers}")
        return _resnet_fpn_extractor(net, layers, [2, 3, 4] if dense else [1, 2, 3, 4], extra)
    if backbone == "mobilenet_v3":
        net = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm)
        layers = 6 if trainable_layers is None else trainable_layers
        if not 0 <= layers <= 6:
            raise ValueError(f"trainable_backbone_layers must be in [0, 6], got {layers}")
        # strides 8, 16, 32 (torchvision's default uses two stride-32 maps only)
        return _mobilenet_extractor(net, True, layers, [2, 3, 4], extra)
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")


# ---------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------

def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")


def build_detector(arch: str, num_classes: int, loss: nn.Module, backbone: str = "mobilenet_v3",
                   min_size: int = 128, max_size: Optional[int] = None,
                   image_mean: Optional[Sequence[float]] = None,
                   image_std: Optional[Sequence[float]] = None,
                   pretrained: Optional[str] = None, pretrained_backbone: Optional[str] = None,
                   score_thresh: float = 1e-4, detections_per_img: int = 300,
                   nms_thresh: float = 0.5, trainable_backbone_layers: Optional[int] = None,
                   anchor_sizes: Optional[Sequence[int]] = None,
                   representation_size: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """Build a detector for ``num_classes`` foreground classes trained by ``loss``.

    Args:
        arch: ``"faster_rcnn"``, ``"mask_rcnn"``, ``"retinanet"`` or ``"fcos"``.
        num_classes: foreground classes ``C`` (target and output labels are ``1..C``).
        loss: an eqlosses loss built for ``num_classes``. The R-CNNs take any loss that
            accepts background rows (target ``C``): ``ce`` with ``background=True``, ``bce``,
            ``sigmoid_eql``, ``eql``, ``federated``, ``seesaw``, ``focal``, ``efl``...;
            RetinaNet/FCOS take ``focal``, ``efl`` or ``eqfl`` (``C`` channels and a
            ``normalizer`` argument), or a ``C``-channel sigmoid loss built with
            ``reduction="sum"`` (``bce``, ``eql``, ``federated``), divided by the normaliser
            here. The loss becomes a submodule of the model.
        backbone: ``"tiny"``, ``"mobilenet_v3"``, ``"resnet18"`` or ``"resnet50"`` (module
            docstring), randomly initialised.
        min_size, max_size: torchvision's resizing (shorter side ``min_size``, longer side at
            most ``max_size``, default ``min_size * 1333 / 800``).
        image_mean, image_std: input normalisation (ImageNet's by default).
        pretrained: a local state-dict file for the whole detector, loaded last; entries of
            another shape are skipped with a warning listing them.
        pretrained_backbone: a local state-dict file for the backbone body (e.g. a
            classification checkpoint of the same torchvision network). Batch norm is then
            frozen (``FrozenBatchNorm2d``) and ``trainable_backbone_layers`` defaults to 3, as
            in torchvision; without it batch norm trains and every layer is trainable.
        score_thresh, detections_per_img, nms_thresh: test protocol (LVIS: ``1e-4``, 300,
            per-class NMS at 0.5).
        trainable_backbone_layers: backbone stages left trainable, counted from the top.
        anchor_sizes: one size per pyramid level, replacing the default of the backbone.
        representation_size: width of the R-CNN box head's two FC layers (1024; 256 for
            ``tiny``). A ``box_head=`` of your own that is not a ``TwoMLPHead`` must output
            ``representation_size`` features.
        **kwargs: passed to torchvision's ``FasterRCNN`` / ``MaskRCNN`` / ``RetinaNet`` /
            ``FCOS`` (e.g. ``rpn_pre_nms_top_n_train``, ``rpn_post_nms_top_n_train``,
            ``rpn_pre_nms_top_n_test``, ``rpn_post_nms_top_n_test``,
            ``box_batch_size_per_image``, ``topk_candidates``, ``fg_iou_thresh``). For a CPU
            benchmark of the R-CNNs, fewer proposals and sampled RoIs cut the step time by
            3x (measured with ``tiny``, 128-pixel images): ``rpn_pre_nms_top_n_train=600,
            rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
            rpn_post_nms_top_n_test=150, box_batch_size_per_image=128``.

    Raises:
        ValueError: an unknown ``arch`` or ``backbone``, or a loss that does not fit ``arch``.
        FileNotFoundError: a ``pretrained`` or ``pretrained_backbone`` file does not exist.

    Example:
        >>> from eqlosses.losses import build_loss
        >>> model = build_detector("faster_rcnn", 3, build_loss("sigmoid_eql", 3),
        ...                        backbone="tiny", min_size=64).eval()
        >>> model.roi_heads.box_predictor.cls_score.out_features  # loss.num_channels
        4
        >>> with torch.no_grad():
        ...     out = model([torch.rand(3, 64, 64)])
        >>> sorted(out[0]), bool(out[0]["labels"].min() >= 1)
        (['boxes', 'labels', 'scores'], True)
    """
    _check_choice("arch", arch, ARCHS)
    _check_choice("backbone", backbone, BACKBONES)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    two_stage = arch in _TWO_STAGE
    if two_stage:
        _check_roi_loss(loss, num_classes)
    else:
        _check_dense_loss(loss, num_classes, arch)
    for name, file in (("pretrained", pretrained), ("pretrained_backbone", pretrained_backbone)):
        if file is not None and not Path(file).is_file():
            raise FileNotFoundError(f"{name} weights file {file} does not exist")
    if pretrained_backbone is not None and trainable_backbone_layers is None:
        trainable_backbone_layers = 3
    body = build_detection_backbone(backbone, dense=not two_stage,
                                    trainable_layers=trainable_backbone_layers,
                                    frozen_bn=pretrained_backbone is not None and
                                    backbone != "tiny")
    if pretrained_backbone is not None:
        load_weights_file(body.body, pretrained_backbone,
                          prefixes=("module.", "backbone.body.", "body.", "features.",
                                    "backbone."))
    if max_size is None:
        max_size = max(min_size, int(round(min_size * 1333 / 800)))
    common = dict(min_size=min_size, max_size=max_size, image_mean=image_mean,
                  image_std=image_std)
    sizes = tuple(anchor_sizes) if anchor_sizes is not None else \
        _ANCHORS[backbone][0 if two_stage else 1]
    channels = body.out_channels

    if two_stage:
        if "rpn_anchor_generator" not in kwargs:
            kwargs["rpn_anchor_generator"] = AnchorGenerator(
                tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
        width = representation_size or (256 if backbone == "tiny" else 1024)
        kwargs.setdefault("box_head", TwoMLPHead(channels * 7 * 7, width))
        if isinstance(kwargs["box_head"], TwoMLPHead):  # a box head of the caller's
            width = kwargs["box_head"].fc7.out_features
        predictor = LossBoxPredictor(width, num_classes, loss.num_channels)
        box = dict(box_score_thresh=score_thresh, box_nms_thresh=nms_thresh,
                   box_detections_per_img=detections_per_img)
        if arch == "faster_rcnn":
            model = FasterRCNN(body, None, box_predictor=predictor, **common, **box, **kwargs)
        else:
            layers = (channels,) * 2 if backbone == "tiny" else (256,) * 4
            kwargs.setdefault("mask_head", MaskRCNNHeads(channels, layers, 1))
            mask_predictor = MaskRCNNPredictor(layers[-1], layers[-1], num_classes)
            model = MaskRCNN(body, None, box_predictor=predictor, mask_predictor=mask_predictor,
                             **common, **box, **kwargs)
        model.roi_heads = LossRoIHeads.from_roi_heads(model.roi_heads, loss)
    elif arch == "retinanet":
        if "anchor_generator" not in kwargs:
            kwargs["anchor_generator"] = AnchorGenerator(
                tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes),
                ((0.5, 1.0, 2.0),) * len(sizes))
        num_anchors = kwargs["anchor_generator"].num_anchors_per_location()[0]
        head = LossRetinaNetHead(channels, num_anchors, loss,
                                 norm_layer=partial(nn.GroupNorm, 32))
        model = LossRetinaNet(body, loss.num_channels, head=head, score_thresh=score_thresh,
                              nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                              **common, **kwargs)
    else:
        if anchor_sizes is not None:
            raise ValueError("FCOS's points are its strides; anchor_sizes does not apply")
        kwargs.setdefault("anchor_generator", AnchorGenerator(
            tuple((s,) for s in _FCOS_STRIDES), ((1.0,),) * len(_FCOS_STRIDES)))
        head = LossFCOSHead(channels, 1, loss)
        model = LossFCOS(body, loss.num_channels, head=head, score_thresh=score_thresh,
                         nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                         **common, **kwargs)
    if pretrained is not None:
        loss_prefix = ("roi_heads.box_loss." if two_stage
                       else "head.classification_head.loss.")
        load_weights_file(model, pretrained, prefixes=("module.",), atomic=(loss_prefix,))
    return model
