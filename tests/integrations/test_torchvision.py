"""eqlosses.integrations.torchvision.use_loss on torchvision models built by the user.

The reference for each detector is torchvision's own loss: with the loss that torchvision
hard-codes (softmax cross-entropy with a background class for the R-CNNs, sigmoid focal loss
for RetinaNet and FCOS) and the class-logit weights copied across the two column conventions,
the model after ``use_loss`` must give torchvision's loss dict.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

import torch.nn.functional as F  # noqa: E402
from torchvision.models.detection import (FCOS, FasterRCNN, KeypointRCNN,  # noqa: E402
                                          MaskRCNN, RetinaNet)
from torchvision.models.detection.roi_heads import RoIHeads  # noqa: E402
from torchvision.models.segmentation import lraspp_mobilenet_v3_large  # noqa: E402

from eqlosses import (CrossEntropyLoss, EqualizedFocalLoss, FocalLoss,  # noqa: E402
                      SigmoidEQLLoss, SoftmaxEQLLoss)
from eqlosses.integrations.torchvision import (head_of, hosted_loss,  # noqa: E402
                                               segmentation_loss, use_loss)
from eqlosses.losses import build_loss_for  # noqa: E402
from eqlosses.tasks.detection_models import build_detection_backbone  # noqa: E402

C = 3  # foreground classes; torchvision's num_classes is C + 1
SMALL_RCNN = dict(min_size=64, max_size=64, rpn_pre_nms_top_n_train=200,
                  rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_test=50, box_batch_size_per_image=64)


def _batch():
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=gen), torch.rand(3, 64, 64, generator=gen)]
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 4:40, 4:40] = 1
    masks[1, 10:50, 20:60] = 1
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
                "labels": torch.tensor([3, 1]), "masks": masks},
               {"boxes": torch.tensor([[10.0, 8.0, 30.0, 60.0]]),
                "labels": torch.tensor([2]), "masks": masks[:1]}]
    return images, targets


def _rcnn(cls=FasterRCNN, **kwargs):
    torch.manual_seed(0)
    return cls(build_detection_backbone("tiny", dense=False), num_classes=C + 1,
               **SMALL_RCNN, **kwargs)


def _dense(cls):
    torch.manual_seed(0)
    return cls(build_detection_backbone("tiny", dense=True), num_classes=C + 1,
               min_size=64, max_size=64)


def _copy_rcnn_class_logits(ref, ours):
    """torchvision's columns [bg, 1..C] -> the loss's [0..C-1, bg]."""
    old = ref.roi_heads.box_predictor.cls_score
    new = ours.roi_heads.box_predictor.cls_score
    perm = list(range(1, C + 1)) + [0]
    with torch.no_grad():
        new.weight.copy_(old.weight[perm])
        new.bias.copy_(old.bias[perm])


def _copy_dense_class_logits(ref, ours):
    """torchvision's C + 1 columns per anchor (column 0 unused) -> the loss's C."""
    old = ref.head.classification_head.cls_logits
    new = ours.head.classification_head.cls_logits
    anchors = ref.head.classification_head.num_anchors
    keep = torch.tensor([a * (C + 1) + j for a in range(anchors) for j in range(1, C + 1)])
    with torch.no_grad():
        new.weight.copy_(old.weight[keep])
        new.bias.copy_(old.bias[keep])


def _assert_same_losses(expected, got):
    assert sorted(expected) == sorted(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=2e-5, atol=1e-6,
                                   msg=lambda m: f"{key}: {m}")


def _rcnn_matches_torchvision(cls):
    images, targets = _batch()
    ref = _rcnn(cls)
    ours = use_loss(copy.deepcopy(ref), build_loss_for("roi", "ce", C))
    _copy_rcnn_class_logits(ref, ours)
    torch.manual_seed(1)  # the RoI sampler draws
    expected = ref.train()(images, targets)
    torch.manual_seed(1)
    got = ours.train()(images, targets)
    _assert_same_losses(expected, got)
    return ref, ours


def test_faster_rcnn_with_cross_entropy_matches_torchvision():
    ref, ours = _rcnn_matches_torchvision(FasterRCNN)
    assert isinstance(hosted_loss(ours), CrossEntropyLoss)
    # test time: the loss's scores (softmax without the background column) give
    # torchvision's detections
    images, _ = _batch()
    with torch.no_grad():
        expected, got = ref.eval()(images), ours.eval()(images)
    assert sum(len(e["labels"]) for e in expected) > 0
    for e, g in zip(expected, got):
        torch.testing.assert_close(g["scores"], e["scores"])
        torch.testing.assert_close(g["boxes"], e["boxes"])
        assert torch.equal(g["labels"], e["labels"])


@pytest.mark.slow
def test_mask_rcnn_with_cross_entropy_matches_torchvision():
    _rcnn_matches_torchvision(MaskRCNN)


@pytest.mark.parametrize("cls", [RetinaNet, FCOS])
def test_dense_detectors_with_focal_loss_match_torchvision(cls):
    images, targets = _batch()
    ref = _dense(cls)
    ours = use_loss(copy.deepcopy(ref), FocalLoss(C, gamma=2.0, alpha=0.25))
    assert isinstance(ours, cls)
    _copy_dense_class_logits(ref, ours)
    # one image: torchvision normalises per image, the package over the batch
    _assert_same_losses(ref.train()(images[:1], targets[:1]),
                        ours.train()(images[:1], targets[:1]))


def test_gradient_driven_loss_trains_and_keeps_statistics_in_the_checkpoint():
    images, targets = _batch()
    model = use_loss(_rcnn(), build_loss_for("roi", "sigmoid_eql", C))
    losses = model.train()(images, targets)
    sum(losses.values()).backward()
    stats = hosted_loss(model).stats
    assert int(stats.num_updates) == 1
    assert bool((stats.pos_grad[:C] > 0).all())  # every class has a positive RoI
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    state = model.state_dict()
    assert torch.equal(state["roi_heads.box_loss.stats.pos_grad"], stats.pos_grad)
    with torch.no_grad():
        out = model.eval()(images)
    for det in out:
        assert det["labels"].numel() == 0 or (int(det["labels"].min()) >= 1
                                              and int(det["labels"].max()) <= C)


def test_efl_on_retinanet_statistics_and_scores():
    images, targets = _batch()
    model = use_loss(_dense(RetinaNet), build_loss_for("dense", "efl", C))
    model.score_thresh = 0.0
    sum(model.train()(images, targets).values()).backward()
    loss = hosted_loss(model)
    assert int(loss.stats.num_updates) == 1  # one call for the whole batch
    assert model.head.classification_head.cls_logits.out_channels == 9 * C
    with torch.no_grad():
        out = model.eval()(images[:1])[0]
    assert out["labels"].numel() > 0 and int(out["labels"].min()) >= 1
    assert int(out["labels"].max()) <= C


def test_box_deltas_of_the_foreground_classes_are_kept_and_use_loss_can_be_repeated():
    model = _rcnn()
    old = model.roi_heads.box_predictor.bbox_pred.weight.detach().clone()
    use_loss(model, build_loss_for("roi", "ce", C))
    assert torch.equal(model.roi_heads.box_predictor.bbox_pred.weight, old[4:])
    use_loss(model, build_loss_for("roi", "seesaw", C))
    assert model.roi_heads.box_predictor.cls_score.out_features == C + 2
    assert torch.equal(model.roi_heads.box_predictor.bbox_pred.weight, old[4:])
    # another class count: the class-specific layers are rebuilt for it
    use_loss(model, build_loss_for("roi", "sigmoid_eql", 7))
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 4 * 7
    assert hosted_loss(model).num_classes == 7


@pytest.mark.parametrize("make, loss, match", [
    (_rcnn, SoftmaxEQLLoss(C), "does not fit the roi head"),
    (_rcnn, CrossEntropyLoss(C), "background=True"),
    (_rcnn, EqualizedFocalLoss(C), "does not fit the roi head"),
    (lambda: _dense(RetinaNet), SigmoidEQLLoss(C), "does not fit the dense head"),
    (lambda: _dense(FCOS), CrossEntropyLoss(C), "does not fit the dense head"),
])
def test_a_loss_that_does_not_fit_the_head_is_refused(make, loss, match):
    model = make()
    with pytest.raises(ValueError, match=match) as info:
        use_loss(model, loss)
    assert "losses that fit" in str(info.value)
    assert type(model) in (FasterRCNN, RetinaNet, FCOS)  # left as it was
    if isinstance(model, FasterRCNN):
        assert type(model.roi_heads) is RoIHeads


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="FasterRCNN, MaskRCNN, RetinaNet, FCOS"):
        use_loss(torch.nn.Linear(3, 3), FocalLoss(C))
    keypoints = KeypointRCNN(build_detection_backbone("tiny", dense=False), num_classes=2,
                             min_size=64, max_size=64)
    with pytest.raises(ValueError, match="Keypoint"):
        use_loss(keypoints, build_loss_for("roi", "ce", 1))

    class MyRetinaNet(RetinaNet):
        pass

    model = _dense(RetinaNet)
    model.__class__ = MyRetinaNet
    with pytest.raises(ValueError, match="subclass MyRetinaNet"):
        use_loss(model, FocalLoss(C))
    with pytest.raises(ValueError, match="holds no eqlosses loss"):
        hosted_loss(_rcnn())


def test_segmentation_model():
    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
    assert head_of(model) == "seg"
    images = torch.rand(2, 3, 32, 32)
    targets = torch.randint(0, 5, (2, 32, 32))
    targets[0, :4] = 255
    with torch.no_grad():
        before = model(images)["out"]
    # a loss with the model's channel count keeps the classifier as it is
    use_loss(model, CrossEntropyLoss(5, ignore_index=255))
    with torch.no_grad():
        out = model(images)
        assert torch.equal(out["out"], before)
        torch.testing.assert_close(segmentation_loss(model, out, targets),
                                   F.cross_entropy(before, targets, ignore_index=255))
    # another channel count: the classifier convolutions are rebuilt; statistics per pixel
    use_loss(model, SoftmaxEQLLoss(7, ignore_index=255))
    model.train()
    out = model(images)
    assert out["out"].shape == (2, 7, 32, 32)
    targets7 = torch.randint(0, 7, (2, 32, 32))
    segmentation_loss(model, out, targets7).backward()
    stats = hosted_loss(model).stats
    assert int(stats.num_updates) == 1
    assert "loss.stats.pos_grad" in model.state_dict()
    # a loss that takes pixels as rows (focal): pixel (b, h, w) is row b*H*W + h*W + w
    use_loss(model, FocalLoss(7, ignore_index=255))
    with torch.no_grad():
        logits = model(images)["out"]
        rows = logits.permute(0, 2, 3, 1).reshape(-1, 7)
        torch.testing.assert_close(segmentation_loss(model, logits, targets7),
                                   FocalLoss(7, ignore_index=255)(rows, targets7.reshape(-1)))
    with pytest.raises(ValueError, match="does not fit the seg head"):
        use_loss(model, SigmoidEQLLoss(7))
    with pytest.raises(ValueError, match="returns its losses"):
        segmentation_loss(_rcnn(), out, targets7)
