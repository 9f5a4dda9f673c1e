"""Detectors trained by eqlosses losses (eqlosses.tasks.detection_models).

Tiny images (64x64), the tiny backbone and few proposals, so that each test takes seconds on
one CPU thread. The label conventions are tested on hand-made logits and targets against
direct calls of the loss; the models end to end with one training step and one evaluation.
"""

import copy
import os
from datetime import timedelta

import pytest
import torch

pytest.importorskip("torchvision")

import torch.distributed as dist  # noqa: E402
from torchvision.models.detection.roi_heads import RoIHeads  # noqa: E402

from eqlosses.losses import (BCELoss, CrossEntropyLoss, EqualizedFocalLoss,  # noqa: E402
                             EqualizedQualityFocalLoss, FocalLoss, SigmoidEQLLoss, build_loss)
from eqlosses.tasks.detection_models import (build_detector, detection_loss,  # noqa: E402
                                             to_loss_targets)
from eqlosses.tasks.detection_models.conventions import paired_iou  # noqa: E402
from tests.dist_utils import free_port, spawn_and_wait  # noqa: E402

C = 5
SIZE = 64
FAST = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
            rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64)


def _loss(name, num_classes=C):
    if name == "ce":
        return CrossEntropyLoss(num_classes, background=True)
    if name == "bce":
        return BCELoss(num_classes, objectness=True)
    if name == "eql":
        freq = torch.full((num_classes,), 0.5)
        freq[-1] = 1e-4
        return build_loss("eql", num_classes, class_frequency=freq)
    if name == "federated":
        counts = torch.arange(num_classes, 0, -1).float() * 10
        return build_loss("federated", num_classes, class_image_counts=counts, num_sampled=3)
    return build_loss(name, num_classes)


def _build(arch, loss, num_classes=C, **kwargs):
    if arch in ("faster_rcnn", "mask_rcnn"):
        kwargs = {**FAST, **kwargs}
    return build_detector(arch, num_classes, loss, backbone="tiny", min_size=SIZE, **kwargs)


def _batch(n=2, masks=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 12.0, 60.0, 58.0],
                              [40.0, 2.0, 56.0, 20.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, C, 2 + i % (C - 2)])}
        if masks:
            m = torch.zeros(len(boxes), SIZE, SIZE, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                m[k, y0:y1, x0:x1] = 1
            target["masks"] = m
        images.append(torch.rand(3, SIZE, SIZE, generator=g))
        targets.append(target)
    return images, targets


def _train_step(model, masks=False):
    model.train()
    losses = model(*_batch(masks=masks))
    total = sum(losses.values())
    total.backward()
    return losses


def _check_detections(out, num_classes=C, max_dets=None, masks=False):
    for det in out:
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == det["labels"].shape == (n,)
        if n:
            assert int(det["labels"].min()) >= 1 and int(det["labels"].max()) <= num_classes
            assert float(det["scores"].min()) >= 0 and float(det["scores"].max()) <= 1
        if max_dets is not None:
            assert n <= max_dets
        if masks:
            assert det["masks"].shape == (n, 1, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------
# Two-stage
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ce", "bce", "eql", "sigmoid_eql", "seesaw", "federated"])
def test_faster_rcnn_trains_and_detects_with_each_loss(name):
    loss = _loss(name)
    model = _build("faster_rcnn", loss, detections_per_img=20)
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_score.out_features == loss.num_channels
    assert predictor.bbox_pred.out_features == 4 * C
    assert isinstance(model.roi_heads, RoIHeads) and model.roi_heads.box_loss is loss
    assert detection_loss(model) is loss
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    assert all(f"roi_heads.box_loss.{k}" in model.state_dict() for k in before)

    losses = _train_step(model)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    grad = predictor.cls_score.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    if name == "sigmoid_eql":
        assert int(loss.stats.num_updates) == 1 and loss.stats.pos_grad.sum() > 0
        assert loss.stats.neg_grad.sum() > 0
    if name == "seesaw":
        assert loss.cum_samples.sum() > 0

    after_train = {k: v.clone() for k, v in loss.state_dict().items()}
    model.eval()
    with torch.no_grad():
        out = model(_batch()[0])
    _check_detections(out, max_dets=20)
    assert sum(len(d["boxes"]) for d in out) > 0
    for k, v in loss.state_dict().items():  # evaluation never updates the loss
        assert torch.equal(v, after_train[k]), k


@pytest.mark.parametrize("name", ["ce", "sigmoid_eql", "seesaw"])
def test_roi_classification_loss_uses_converted_targets(name):
    loss = _loss(name)
    heads = _build("faster_rcnn", loss).roi_heads.train()
    reference = copy.deepcopy(loss)  # the statistics before the call
    labels = [torch.tensor([0, 1, 3]), torch.tensor([2, 0, C])]
    logits = torch.randn(6, loss.num_channels, requires_grad=True)
    box_regression = torch.randn(6, 4 * C)
    regression_targets = [torch.randn(3, 4), torch.randn(3, 4)]

    loss_cls, loss_box = heads.fastrcnn_loss(logits, box_regression, labels, regression_targets)

    converted = torch.tensor([C, 0, 2, 1, C, C - 1])
    assert torch.equal(to_loss_targets(torch.cat(labels), C, -100), converted)
    torch.testing.assert_close(loss_cls, reference(logits, converted))
    # box loss: the deltas of the foreground class label - 1 of the positive RoIs
    pos = torch.tensor([1, 2, 3, 5])
    fg = torch.tensor([0, 2, 1, C - 1])
    deltas = box_regression.reshape(6, C, 4)[pos, fg]
    expected = torch.nn.functional.smooth_l1_loss(
        deltas, torch.cat(regression_targets)[pos], beta=1 / 9, reduction="sum") / 6
    torch.testing.assert_close(loss_box, expected)
    if name == "sigmoid_eql":  # the heads' call updated the statistics as the direct call did
        torch.testing.assert_close(loss.stats.pos_grad, reference.stats.pos_grad)
        assert int(loss.stats.num_updates) == 1


def test_to_loss_targets_ignored():
    assert to_loss_targets(torch.tensor([-1, 0, 2]), 4, 255).tolist() == [255, 4, 1]


@pytest.mark.parametrize("name", ["sigmoid_eql", "ce"])
def test_roi_postprocess_scores_come_from_the_loss(name):
    loss = _loss(name)
    heads = _build("faster_rcnn", loss).roi_heads.eval()
    logits = torch.full((1, loss.num_channels), -4.0)
    logits[0, 2] = 4.0  # class index 2 -> torchvision label 3
    proposals = [torch.tensor([[10.0, 12.0, 40.0, 44.0]])]
    deltas = torch.zeros(1, 4 * C)

    heads.score_thresh = 0.0
    boxes, scores, labels = heads.postprocess_detections(logits, deltas, proposals, [(64, 64)])
    expected = loss.scores(logits)[0]
    assert sorted(labels[0].tolist()) == list(range(1, C + 1))  # one box per class, no NMS
    torch.testing.assert_close(scores[0], expected[labels[0] - 1])
    assert labels[0][0] == 3 and torch.allclose(boxes[0], proposals[0].expand(C, 4))

    heads.score_thresh = 0.5
    _, scores, labels = heads.postprocess_detections(logits, deltas, proposals, [(64, 64)])
    assert labels[0].tolist() == [3]
    torch.testing.assert_close(scores[0], expected[2:3])

    # class-specific boxes: class index 2's deltas move only label 3's box
    deltas.view(1, C, 4)[0, 2] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # dx (weight 10) -> +1.5 px
    boxes, _, labels = heads.postprocess_detections(logits, deltas, proposals, [(64, 64)])
    torch.testing.assert_close(boxes[0][0], proposals[0][0] + torch.tensor([1.5, 0, 1.5, 0]))


def test_mask_rcnn_trains_and_returns_the_mask_of_the_predicted_class():
    loss = _loss("sigmoid_eql")
    model = _build("mask_rcnn", loss, detections_per_img=15)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == C
    losses = _train_step(model, masks=True)
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        out = model(_batch()[0])
    _check_detections(out, max_dets=15, masks=True)

    class ChannelConstant(torch.nn.Module):  # mask logit of channel k: 0.5 k - 1 everywhere
        def forward(self, x):
            return (0.5 * torch.arange(C, dtype=x.dtype) - 1).view(1, C, 1, 1).expand(
                x.shape[0], C, 28, 28)

    model.roi_heads.mask_predictor = ChannelConstant()
    with torch.no_grad():
        out = model(_batch()[0])
    det = out[0]
    assert len(det["boxes"]) > 0
    for box, label, mask in zip(det["boxes"], det["labels"], det["masks"]):
        x0, y0, x1, y1 = box.tolist()
        if x1 - x0 < 6 or y1 - y0 < 6:
            continue
        cy, cx = int((y0 + y1) / 2), int((x0 + x1) / 2)
        expected = torch.sigmoid(torch.tensor(0.5 * (int(label) - 1) - 1))
        torch.testing.assert_close(mask[0, cy, cx], expected, atol=1e-4, rtol=0)


def test_rejects_bad_arch_backbone_loss_and_labels():
    with pytest.raises(ValueError, match="faster_rcnn"):
        build_detector("yolo", C, _loss("sigmoid_eql"))
    with pytest.raises(ValueError, match="mobilenet_v3"):
        build_detector("faster_rcnn", C, _loss("sigmoid_eql"), backbone="vgg")
    roi_fits = "losses that fit: bce, ce, eql, eql_softmax, federated, seesaw, sigmoid_eql"
    dense_fits = "losses that fit: bce, efl, eqfl, eql, federated, focal"
    with pytest.raises(ValueError, match="background=False.*head feeds column") as err:
        build_detector("faster_rcnn", C, CrossEntropyLoss(C), backbone="tiny")  # no bg column
    assert roi_fits in str(err.value)
    with pytest.raises(ValueError, match="declares the heads dense only") as err:
        build_detector("faster_rcnn", C, EqualizedQualityFocalLoss(C), backbone="tiny")
    assert roi_fits in str(err.value)
    with pytest.raises(ValueError, match="declares the heads cls, seg, roi only") as err:
        build_detector("retinanet", C, CrossEntropyLoss(C, reduction="sum"), backbone="tiny")
    assert dense_fits in str(err.value)
    with pytest.raises(ValueError, match="declares the heads roi, cls only") as err:
        build_detector("fcos", C, SigmoidEQLLoss(C), backbone="tiny")
    assert dense_fits in str(err.value)
    with pytest.raises(ValueError, match="reduction='sum'"):
        build_detector("retinanet", C, BCELoss(C), backbone="tiny")  # mean over anchors
    with pytest.raises(ValueError, match="num_classes=4"):
        build_detector("retinanet", C, FocalLoss(4), backbone="tiny")
    with pytest.raises(ValueError, match="lacks traits"):  # not a loss that declares traits
        build_detector("retinanet", C, torch.nn.BCEWithLogitsLoss(), backbone="tiny")
    model = _build("faster_rcnn", _loss("bce"))
    images, targets = _batch()
    targets[0]["labels"] = torch.tensor([0, 1, 2])  # 0 is torchvision's background
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        model.train()(images, targets)


# ---------------------------------------------------------------------------------------------
# One-stage
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
@pytest.mark.parametrize("name", ["focal", "efl", "eqfl"])
def test_dense_detectors_train_and_detect(arch, name):
    loss = _loss(name)
    model = _build(arch, loss, detections_per_img=25)
    assert model.head.classification_head.num_classes == C  # logit columns per anchor
    assert detection_loss(model) is loss
    losses = _train_step(model)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert model.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    if name != "focal":
        assert int(loss.stats.num_updates) == 1  # one update per step, all images together
        assert "head.classification_head.loss.stats.pos_grad" in model.state_dict()
    model.eval()
    with torch.no_grad():
        out = model(_batch()[0])
    _check_detections(out, max_dets=25)
    if name != "focal":
        assert int(loss.stats.num_updates) == 1


def _retina_case():
    """Two images, 6 anchors each; image 0 has two gt boxes, image 1 none."""
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 30.0]]),
                "labels": torch.tensor([2, 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    matched = [torch.tensor([0, -1, -2, 1, -1, 0]), torch.full((6,), -1)]
    # matched gt 0 -> label 2 -> target 1; gt 1 -> label 1 -> target 0; -1 -> C; -2 -> ignored
    expected = torch.tensor([1, C, -100, 0, C, 1] + [C] * 6)
    return targets, matched, expected


@pytest.mark.parametrize("name", ["focal", "efl"])
def test_retinanet_classification_loss_is_one_call_on_all_anchors(name):
    loss = _loss(name)
    head = _build("retinanet", loss).head.classification_head.train()
    reference = copy.deepcopy(loss)
    targets, matched, expected = _retina_case()
    assert torch.equal(head.anchor_targets(targets, matched), expected)
    logits = torch.randn(2, 6, C)
    got = head.compute_loss(targets, {"cls_logits": logits}, matched)
    want = reference(logits.reshape(-1, C), expected, normalizer=3.0)  # 3 positive anchors
    torch.testing.assert_close(got, want)
    if name == "efl":
        assert int(loss.stats.num_updates) == 1
        torch.testing.assert_close(loss.stats.pos_grad, reference.stats.pos_grad)
        torch.testing.assert_close(loss.stats.neg_grad, reference.stats.neg_grad)
    # anchors between the thresholds count nowhere: their logits change nothing
    fresh = copy.deepcopy(reference)
    head.loss = copy.deepcopy(reference)
    changed = logits.clone()
    changed[0, 2] = 50.0
    torch.testing.assert_close(head.compute_loss(targets, {"cls_logits": changed}, matched),
                               fresh(logits.reshape(-1, C), expected, normalizer=3.0))
    if name == "efl":
        torch.testing.assert_close(head.loss.stats.neg_grad, fresh.stats.neg_grad)


def test_retinanet_sum_reduction_loss_is_divided_by_the_positives():
    loss = BCELoss(C, reduction="sum")
    head = _build("retinanet", loss).head.classification_head
    targets, matched, expected = _retina_case()
    logits = torch.randn(2, 6, C)
    got = head.compute_loss(targets, {"cls_logits": logits}, matched)
    torch.testing.assert_close(got, loss(logits.reshape(-1, C), expected) / 3)


def test_retinanet_no_positive_anchor_normaliser_is_one():
    loss = _loss("focal")
    head = _build("retinanet", loss).head.classification_head
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    logits = torch.randn(1, 4, C)
    got = head.compute_loss(targets, {"cls_logits": logits}, [torch.full((4,), -1)])
    torch.testing.assert_close(got, loss(logits[0], torch.full((4,), C), normalizer=1.0))


def test_retinanet_eqfl_quality_is_iou_of_decoded_box_with_its_gt():
    loss = _loss("eqfl")
    model = _build("retinanet", loss)
    reference = copy.deepcopy(loss)
    targets, matched, expected = _retina_case()
    anchors = [torch.tensor([[0.0, 0.0, 12.0, 12.0], [50.0, 50.0, 60.0, 60.0],
                             [0.0, 0.0, 30.0, 30.0], [18.0, 22.0, 38.0, 30.0],
                             [5.0, 5.0, 9.0, 9.0], [1.0, 1.0, 9.0, 11.0]])] * 2
    logits = torch.randn(2, 6, C)
    reg = torch.zeros(2, 6, 4)  # zero deltas: the predicted box is the anchor
    got = model.head.compute_loss(targets, {"cls_logits": logits, "bbox_regression": reg},
                                  anchors, matched)["classification"]
    gt = targets[0]["boxes"][matched[0].clamp(min=0)]
    quality = torch.zeros(12)
    quality[:6] = torch.where(matched[0] >= 0, paired_iou(anchors[0], gt), 0.0)
    assert 0 < float(quality[0]) < 1
    want = reference(logits.reshape(-1, C), expected, quality=quality, normalizer=3.0)
    torch.testing.assert_close(got, want)


def test_retinanet_postprocess_scores_and_labels():
    loss = _loss("efl")
    model = _build("retinanet", loss).eval()
    logits = torch.full((1, 1, C), -6.0)
    logits[0, 0, 2] = 3.0  # class index 2 -> label 3
    outputs = {"cls_logits": [logits], "bbox_regression": [torch.zeros(1, 1, 4)]}
    anchors = [[torch.tensor([[8.0, 8.0, 24.0, 30.0]])]]
    model.score_thresh = 0.5
    det = model.postprocess_detections(outputs, anchors, [(64, 64)])[0]
    assert det["labels"].tolist() == [3]
    torch.testing.assert_close(det["scores"], loss.scores(logits[0])[0, 2:3])
    torch.testing.assert_close(det["boxes"], anchors[0][0])


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------

def _dist_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=30))
    try:
        torch.manual_seed(0)  # the same initial model on both ranks
        loss = EqualizedFocalLoss(C)
        model = build_detector("retinanet", C, loss, backbone="tiny", min_size=SIZE)
        images, targets = _batch(seed=rank)  # different images per rank
        if rank == 1:
            targets[0]["labels"] = torch.tensor([C, C, C])
        losses = model.train()(images, targets)
        sum(losses.values()).backward()
        torch.save({"pos": loss.stats.pos_grad, "neg": loss.stats.neg_grad,
                    "n": loss.stats.num_updates, "cls": losses["classification"].detach()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_retinanet_efl_statistics_identical_on_two_ranks(tmp_path):
    spawn_and_wait(_dist_worker, (free_port(), str(tmp_path)), 2, 120.0,
                   "the 2-process RetinaNet step")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert int(res[0]["n"]) == int(res[1]["n"]) == 1
    assert torch.equal(res[0]["pos"], res[1]["pos"]) and torch.equal(res[0]["neg"], res[1]["neg"])
    assert res[0]["pos"].sum() > 0 and not torch.equal(res[0]["cls"], res[1]["cls"])


# ---------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------

def test_pretrained_round_trip_mismatch_and_missing_file(tmp_path):
    model = _build("faster_rcnn", _loss("sigmoid_eql"))
    _train_step(model)  # statistics are part of the saved state
    path = tmp_path / "det.pt"
    torch.save(model.state_dict(), path)
    images = _batch()[0]

    loaded = _build("faster_rcnn", _loss("sigmoid_eql"), pretrained=str(path))
    with torch.no_grad():
        a, b = model.eval()(images), loaded.eval()(images)
    for x, y in zip(a, b):
        for key in x:
            assert torch.equal(x[key], y[key]), key
    assert torch.equal(detection_loss(loaded).stats.pos_grad,
                       detection_loss(model).stats.pos_grad)

    with pytest.warns(UserWarning, match="box_predictor.cls_score.weight") as record:
        other = _build("faster_rcnn", _loss("sigmoid_eql", 7), num_classes=7,
                       pretrained=str(path))
    message = str(record[0].message)
    for key in ("box_predictor.bbox_pred.weight", "roi_heads.box_loss.stats.pos_grad",
                "roi_heads.box_loss.stats.num_updates"):  # a loss state loads whole or not
        assert key in message
    assert torch.equal(other.backbone.body.stem[0].weight, model.backbone.body.stem[0].weight)
    assert int(detection_loss(other).stats.num_updates) == 0

    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        _build("faster_rcnn", _loss("bce"), pretrained=str(tmp_path / "nothere.pt"))
    with pytest.raises(FileNotFoundError, match="nobackbone.pt"):
        _build("retinanet", _loss("focal"), pretrained_backbone=str(tmp_path / "nobackbone.pt"))


def test_pretrained_backbone_from_a_classification_checkpoint(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    with pytest.warns(UserWarning, match="fc.weight"):
        model = build_detector("retinanet", C, FocalLoss(C), backbone="resnet18",
                               min_size=SIZE, pretrained_backbone=str(tmp_path / "r18.pt"))
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, net.conv1.weight)
    assert torch.equal(body.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    assert torch.equal(body.bn1.running_var, net.bn1.running_var)
    # torchvision's fine-tuning default: 3 trainable stages, frozen batch norm
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
