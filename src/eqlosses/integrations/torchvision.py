"""Put a loss of the package into a torchvision model you built yourself.

:func:`use_loss` takes a torchvision detector (Faster R-CNN, Mask R-CNN, RetinaNet, FCOS) or
semantic segmentation model (DeepLabV3, FCN, LR-ASPP), built by you (any backbone, weights,
anchors or sizes), and a loss built for your classes, checks with
:func:`eqlosses.losses.check_fits` that the loss fits the model's head, and changes the model
in place so that the loss trains its classifier and scores its outputs. It is the same code
the package's own pipelines run (:mod:`eqlosses.tasks.detection_models`,
:mod:`eqlosses.tasks.segmentation`), exposed as a stable function:

=============================  ======  =====================================================
model (torchvision class)      head    what changes
=============================  ======  =====================================================
``FasterRCNN``, ``MaskRCNN``   roi     ``roi_heads`` becomes a
                                       :class:`~eqlosses.tasks.detection_models.LossRoIHeads`
                                       holding the loss (``roi_heads.box_loss``): the box
                                       classifier has ``loss.num_channels`` logits, the box
                                       deltas (and Mask R-CNN's mask logits) ``C`` classes, no
                                       background entry
``RetinaNet``, ``FCOS``        dense   the classification head has ``loss.num_channels``
                                       logits per anchor and holds the loss
                                       (``head.classification_head.loss``); the model becomes
                                       a ``LossRetinaNet`` / ``LossFCOS`` (subclasses that only
                                       change how detections are scored)
``DeepLabV3``, ``FCN``,        seg     the last classifier convolution(s) output
``LRASPP``                             ``loss.num_channels`` channels (kept as they are when
                                       they already do); the loss is the submodule ``loss``;
                                       :func:`segmentation_loss` computes it from the output
=============================  ======  =====================================================

Conventions stay torchvision's: detection targets and outputs have labels ``1..C`` (the model
is built with ``num_classes=C + 1`` in torchvision's count, which includes the background),
``model(images, targets)`` returns the loss dict in training mode and detections in eval mode.
The package's conventions (foreground ``0..C-1``, background ``C``, one loss call per batch,
the dense normaliser ``max(1, mean over processes of the positive anchors)``) are applied
inside; :mod:`eqlosses.tasks.detection_models` documents them.

What is kept and what is new: the backbone, the RPN, the box head, the convolution towers of
the dense heads and the regression branches are kept with their weights. The class-logit
layer is new (its columns follow the loss's background convention, not torchvision's). The
class-specific box deltas and mask logits of the foreground classes are kept when the model
was built for the loss's ``C`` classes, and new otherwise (a model built for COCO's 91
classes can be given a loss for your 5).

The loss is moved to the model's device and becomes a submodule of the model:
``model.state_dict()`` holds its statistics, ``model.to(device)`` moves them and
``model.train()`` / ``eval()`` switch their updates.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

try:
    import torchvision  # noqa: F401
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
    from torchvision.models.segmentation import FCN, LRASPP, DeepLabV3
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("eqlosses.integrations.torchvision needs torchvision: "
                      "pip install 'eqlosses[vision]'") from err

from ..losses import check_fits
from ..tasks.detection_models.dense_heads import (LossFCOS, LossFCOSHead, LossRetinaNet,
                                                  LossRetinaNetHead)
from ..tasks.detection_models.roi_heads import LossBoxPredictor, LossRoIHeads
from ..tasks.segmentation import _loss as _pixel_loss

__all__ = ["use_loss", "hosted_loss", "segmentation_loss", "head_of"]

_SEGMENTERS = (DeepLabV3, FCN, LRASPP)
_SUPPORTED = ("torchvision.models.detection.FasterRCNN, MaskRCNN, RetinaNet, FCOS; "
              "torchvision.models.segmentation.DeepLabV3, FCN, LRASPP")


def head_of(model: nn.Module) -> str:
    """The head (:data:`eqlosses.losses.HEADS`) whose loss ``model`` hosts: ``"roi"`` for
    the R-CNNs, ``"dense"`` for RetinaNet and FCOS, ``"seg"`` for the segmentation models.

    Raises:
        ValueError: for another kind of model (the message lists the supported ones).
    """
    if isinstance(model, FasterRCNN):  # MaskRCNN and KeypointRCNN are subclasses
        return "roi"
    if isinstance(model, (RetinaNet, FCOS)):
        return "dense"
    if isinstance(model, _SEGMENTERS):
        return "seg"
    raise ValueError(f"use_loss hosts a loss in {_SUPPORTED}; got a {type(model).__name__}")


def use_loss(model: nn.Module, loss: nn.Module) -> nn.Module:
    """Make ``loss`` train and score the classifier of a torchvision ``model``, in place.

    Args:
        model: a torchvision ``FasterRCNN``, ``MaskRCNN``, ``RetinaNet``, ``FCOS``,
            ``DeepLabV3``, ``FCN`` or ``LRASPP`` (any weights, backbone and settings; the
            detection class itself for RetinaNet and FCOS, not a subclass of yours). Calling
            ``use_loss`` again replaces the loss.
        loss: a loss built for your ``C`` classes that fits the model's head
            (:func:`head_of`; ``eqlosses.losses.losses_for(head)`` lists the losses that
            fit): ``ce`` (with ``background=True``), ``bce``, ``sigmoid_eql``, ``eql``,
            ``eql_softmax``, ``federated``, ``seesaw`` for the R-CNNs; ``focal``, ``efl``,
            ``eqfl``, and ``bce``, ``eql``, ``federated`` with ``reduction="sum"`` for
            RetinaNet and FCOS; ``ce``, ``balanced_softmax``, ``softmax_eql``, ``focal`` ...
            for segmentation. ``eqlosses.losses.build_loss_for(head, name, C, statistics)``
            builds one with the head's conventions and your training counts.

    Returns:
        ``model`` itself (changed in place), for chaining.

    Raises:
        ValueError: the model is not one of the supported kinds, is a Keypoint R-CNN, or the
            loss does not fit its head (one message naming the problem and the losses that
            fit, from :func:`eqlosses.losses.check_fits`).

    Example:
        A Faster R-CNN on a small random-init backbone (any torchvision one works):

        >>> import torch
        >>> from torchvision.models.detection import FasterRCNN
        >>> from eqlosses.losses import build_loss_for
        >>> from eqlosses.tasks.detection_models import build_detection_backbone
        >>> backbone = build_detection_backbone("tiny", dense=False)
        >>> model = FasterRCNN(backbone, num_classes=4, min_size=64, max_size=64)  # C = 3
        >>> model = use_loss(model, build_loss_for("roi", "sigmoid_eql", 3))
        >>> model.roi_heads.box_predictor.cls_score.out_features  # 3 classes + objectness
        4
        >>> images = [torch.rand(3, 64, 64)]
        >>> targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]),
        ...             "labels": torch.tensor([3])}]                  # labels 1..C
        >>> sorted(model.train()(images, targets))
        ['loss_box_reg', 'loss_classifier', 'loss_objectness', 'loss_rpn_box_reg']
        >>> int(hosted_loss(model).stats.num_updates)
        1
    """
    head = head_of(model)
    if head == "roi":
        _use_roi_loss(model, loss)
    elif head == "dense":
        _use_dense_loss(model, loss)
    else:
        _use_seg_loss(model, loss)
    return model


def hosted_loss(model: nn.Module) -> nn.Module:
    """The loss inside a model prepared by :func:`use_loss` (its statistics are
    ``hosted_loss(model).stats`` for a gradient-driven loss).

    Raises:
        ValueError: the model holds no loss of the package.
    """
    head = head_of(model)
    found: Optional[nn.Module] = None
    if head == "roi":
        found = getattr(model.roi_heads, "box_loss", None)
    elif head == "dense":
        found = getattr(model.head.classification_head, "loss", None)
    else:
        found = getattr(model, "loss", None)
    if not isinstance(found, nn.Module):
        raise ValueError(f"this {type(model).__name__} holds no eqlosses loss; call "
                         f"eqlosses.integrations.torchvision.use_loss(model, loss) first")
    return found


def segmentation_loss(model: nn.Module,
                      output: Union[torch.Tensor, Mapping[str, torch.Tensor]],
                      targets: torch.Tensor) -> torch.Tensor:
    """The loss a segmentation model prepared by :func:`use_loss` hosts, on its output.

    ``output`` is what the model returned (torchvision's dict; its ``"out"`` logits
    ``[B, C', H, W]`` are used) or the logits themselves; ``targets`` are ``[B, H, W]`` int64
    class indices, pixels equal to the loss's ``ignore_index`` (e.g. 255) counting nowhere.
    The logits are fed as the loss declares (``traits.pixels``: as they are, or as
    ``[B*H*W, C']`` rows), in float32, exactly as the package's segmentation pipeline does.

    torchvision's auxiliary head (``aux_loss=True``) is resized by :func:`use_loss` too, but
    its ``"aux"`` output is not included here: feeding it to the same gradient-driven loss
    would update the statistics twice per step. Add its term yourself if you want one, e.g.
    ``0.5 * F.cross_entropy(output["aux"], targets, ignore_index=255)``.
    """
    if head_of(model) != "seg":
        raise ValueError(f"segmentation_loss needs a segmentation model; a "
                         f"{type(model).__name__} returns its losses from "
                         f"model(images, targets)")
    loss = hosted_loss(model)
    logits = output["out"] if isinstance(output, Mapping) else output
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        raise ValueError(f"expected the model's output (a dict with 'out') or [B, C, H, W] "
                         f"logits, got {type(logits).__name__}"
                         + (f" of shape {tuple(logits.shape)}"
                            if isinstance(logits, torch.Tensor) else ""))
    if logits.shape[1] != loss.num_channels:
        raise ValueError(f"the logits have {logits.shape[1]} channels, the loss needs "
                         f"{loss.num_channels}")
    return _pixel_loss(loss, logits.float(), targets)


def _to_device_of(model: nn.Module, loss: nn.Module) -> None:
    """Move the loss to the device of the model's parameters (its statistics stay float64)."""
    param = next(model.parameters(), None)
    if param is not None:
        loss.to(param.device)


# ---------------------------------------------------------------------------------------------
# Two-stage detectors
# ---------------------------------------------------------------------------------------------

def _linear_like(old: nn.Linear, out_features: int) -> nn.Linear:
    return nn.Linear(old.in_features, out_features, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def _use_roi_loss(model: nn.Module, loss: nn.Module) -> None:
    roi = model.roi_heads
    if roi.has_keypoint():
        raise ValueError("use_loss does not host a loss in a Keypoint R-CNN (its keypoint "
                         "branch is not supported); use a FasterRCNN or MaskRCNN")
    check_fits(loss, "roi")
    _to_device_of(model, loss)
    num_classes = int(loss.num_classes)
    predictor = roi.box_predictor
    cls_score = getattr(predictor, "cls_score", None)
    bbox_pred = getattr(predictor, "bbox_pred", None)
    if not isinstance(cls_score, nn.Linear) or not isinstance(bbox_pred, nn.Linear):
        raise ValueError(f"the box predictor must have Linear cls_score and bbox_pred layers "
                         f"(torchvision's FastRCNNPredictor); got a "
                         f"{type(predictor).__name__}")
    converted = isinstance(roi, LossRoIHeads)
    # torchvision's layers have a background entry first; ours (already converted) have none
    old_classes = bbox_pred.out_features // 4 - (0 if converted else 1)
    new = LossBoxPredictor(cls_score.in_features, num_classes, loss.num_channels)
    new.to(device=cls_score.weight.device, dtype=cls_score.weight.dtype)
    if old_classes == num_classes:  # keep the deltas of the foreground classes
        skip = 0 if converted else 4
        with torch.no_grad():
            new.bbox_pred.weight.copy_(bbox_pred.weight[skip:])
            new.bbox_pred.bias.copy_(bbox_pred.bias[skip:])
    roi.box_predictor = new
    if roi.has_mask():
        roi.mask_predictor = _mask_predictor_for(roi.mask_predictor, num_classes, converted)
    model.roi_heads = LossRoIHeads.from_roi_heads(roi, loss)


def _mask_predictor_for(predictor: nn.Module, num_classes: int, converted: bool) -> nn.Module:
    """The mask predictor with ``C`` output channels (channel ``label - 1``)."""
    last = getattr(predictor, "mask_fcn_logits", None)
    if not isinstance(predictor, MaskRCNNPredictor) or not isinstance(last, nn.Conv2d):
        raise ValueError(f"the mask predictor must be torchvision's MaskRCNNPredictor; got a "
                         f"{type(predictor).__name__}")
    old_classes = last.out_channels - (0 if converted else 1)
    if converted and old_classes == num_classes:
        return predictor
    conv = nn.Conv2d(last.in_channels, num_classes, 1, device=last.weight.device,
                     dtype=last.weight.dtype)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's
    nn.init.zeros_(conv.bias)
    if old_classes == num_classes:  # drop torchvision's background channel 0
        with torch.no_grad():
            conv.weight.copy_(last.weight[1:])
            conv.bias.copy_(last.bias[1:])
    predictor.mask_fcn_logits = conv
    return predictor


# ---------------------------------------------------------------------------------------------
# One-stage detectors
# ---------------------------------------------------------------------------------------------

_DENSE = {RetinaNet: (LossRetinaNet, LossRetinaNetHead), FCOS: (LossFCOS, LossFCOSHead),
          LossRetinaNet: (LossRetinaNet, LossRetinaNetHead), LossFCOS: (LossFCOS, LossFCOSHead)}


def _use_dense_loss(model: nn.Module, loss: nn.Module) -> None:
    if type(model) not in _DENSE:
        raise ValueError(f"use_loss turns a torchvision RetinaNet or FCOS into its eqlosses "
                         f"subclass, so it takes those classes themselves; got a subclass "
                         f"{type(model).__name__} (build the model with torchvision's class "
                         f"itself)")
    check_fits(loss, "dense")
    _to_device_of(model, loss)
    model_cls, head_cls = _DENSE[type(model)]
    old = model.head
    cls_head = old.classification_head
    cls_logits = cls_head.cls_logits
    num_anchors = int(cls_head.num_anchors)
    # the new head's towers and regression branch are replaced by the user's below (kept
    # with their weights); only its classification layer and the loss are new
    if head_cls is LossRetinaNetHead:
        new = head_cls(cls_logits.in_channels, num_anchors, loss)
    else:
        new = head_cls(cls_logits.in_channels, num_anchors, loss, num_convs=1)
    new.to(device=cls_logits.weight.device, dtype=cls_logits.weight.dtype)
    new.classification_head.conv = cls_head.conv
    new.regression_head = old.regression_head
    model.head = new
    model.__class__ = model_cls


# ---------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------

def _conv_with(conv: nn.Module, channels: int, where: str) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"expected the last layer of {where} to be a Conv2d (torchvision's "
                         f"heads), got a {type(conv).__name__}")
    if conv.out_channels == channels:
        return conv
    new = nn.Conv2d(conv.in_channels, channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    return new


def _use_seg_loss(model: nn.Module, loss: nn.Module) -> None:
    check_fits(loss, "seg")
    _to_device_of(model, loss)
    channels = int(loss.num_channels)
    if isinstance(model, LRASPP):
        head = model.classifier
        head.low_classifier = _conv_with(head.low_classifier, channels, "low_classifier")
        head.high_classifier = _conv_with(head.high_classifier, channels, "high_classifier")
    else:
        heads: Dict[str, Any] = {"classifier": model.classifier}
        if getattr(model, "aux_classifier", None) is not None:
            heads["aux_classifier"] = model.aux_classifier
        for name, head in heads.items():
            if not isinstance(head, nn.Sequential):
                raise ValueError(f"expected model.{name} to be torchvision's head (an "
                                 f"nn.Sequential ending in a Conv2d), got a "
                                 f"{type(head).__name__}")
            head[-1] = _conv_with(head[-1], channels, f"model.{name}")
    model.loss = loss
