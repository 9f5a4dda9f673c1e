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

try:
    import torchvision  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("eqlosses.tasks.detection_models needs torchvision: "
                      "pip install 'eqlosses[vision]'") from err

from .backbones import BACKBONES, TinyBackbone, build_detection_backbone
from .builder import ARCHS, build_detector, detection_loss
from .conventions import to_loss_targets
from .dense_heads import (LossFCOS, LossFCOSClassificationHead, LossFCOSHead, LossRetinaNet,
                          LossRetinaNetClassificationHead, LossRetinaNetHead)
from .roi_heads import LossBoxPredictor, LossRoIHeads

__all__ = ["ARCHS", "BACKBONES", "LossBoxPredictor", "LossRoIHeads",
           "LossRetinaNetClassificationHead", "LossRetinaNetHead", "LossRetinaNet",
           "LossFCOSClassificationHead", "LossFCOSHead", "LossFCOS", "TinyBackbone",
           "build_detector", "build_detection_backbone", "detection_loss", "to_loss_targets"]
