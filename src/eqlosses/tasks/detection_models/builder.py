"""``build_detector``: a torchvision detector whose classifier is trained by a given loss."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import torch  # noqa: F401 - the doctest uses it
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from ...losses import TASK_HEADS, check_fits, head_for
from ..common import load_weights_file
from .backbones import BACKBONES, build_detection_backbone
from .dense_heads import LossFCOS, LossFCOSHead, LossRetinaNet, LossRetinaNetHead
from .roi_heads import LossBoxPredictor, LossRoIHeads

__all__ = ["ARCHS", "build_detector", "detection_loss"]

#: the architectures, and the head (``roi`` or ``dense``) whose loss each hosts
ARCHS = tuple(TASK_HEADS["det"])
_TWO_STAGE = tuple(arch for arch, head in TASK_HEADS["det"].items() if head == "roi")

#: default anchor sizes per pyramid level: (two-stage, dense)
_ANCHORS = {
    "tiny": ((16, 32, 64, 128, 256), (16, 32, 64, 128, 256)),
    "mobilenet_v3": ((32, 64, 128, 256), (16, 32, 64, 128, 256)),
    "resnet18": ((32, 64, 128, 256, 512), (32, 64, 128, 256, 512)),
    "resnet50": ((32, 64, 128, 256, 512), (32, 64, 128, 256, 512)),
}
_FCOS_STRIDES = (8, 16, 32, 64, 128)


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
        loss: a loss built for ``num_classes`` whose declared traits fit the head
            (:func:`eqlosses.losses.check_fits`): the R-CNNs' ``roi`` head (``losses_for("roi")``:
            ``ce``, ``bce``, ``sigmoid_eql``, ``eql``, ``eql_softmax``, ``federated``,
            ``seesaw``), RetinaNet/FCOS's ``dense`` head (``losses_for("dense")``: ``focal``,
            ``efl``, ``eqfl``, and ``bce``, ``eql``, ``federated`` built with
            ``reduction="sum"``, divided by the normaliser here). Build it with
            ``eqlosses.losses.build_loss_for(head, name, num_classes, ...)`` to get the head's
            conventions. The loss becomes a submodule of the model.
        backbone: ``"tiny"``, ``"mobilenet_v3"``, ``"resnet18"`` or ``"resnet50"`` (module
            docstring), randomly initialised.
        min_size: torchvision's resizing: the shorter side becomes ``min_size``.
        max_size: torchvision's resizing: the longer side is at most ``max_size`` (default
            ``min_size * 1333 / 800``).
        image_mean: input normalisation, the mean (ImageNet's by default).
        image_std: input normalisation, the standard deviation (ImageNet's by default).
        pretrained: a local state-dict file for the whole detector, loaded last; entries of
            another shape are skipped with a warning listing them.
        pretrained_backbone: a local state-dict file for the backbone body (e.g. a
            classification checkpoint of the same torchvision network). Batch norm is then
            frozen (``FrozenBatchNorm2d``) and ``trainable_backbone_layers`` defaults to 3, as
            in torchvision; without it batch norm trains and every layer is trainable.
        score_thresh: test protocol, minimum score of a detection (LVIS: ``1e-4``).
        detections_per_img: test protocol, detections kept per image (LVIS: 300).
        nms_thresh: test protocol, IoU of the per-class NMS (0.5).
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
        ValueError: an unknown ``arch`` or ``backbone``, or a loss that does not fit ``arch``
            (one message listing the losses that fit).
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
    check_fits(loss, head_for("det", arch), num_classes)
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
