"""Segmentation model builders: output shapes at input resolution, a training step, agreement
with torchvision's own builders, local pretrained weights (whole model and backbone)."""

import warnings

import pytest
import torch

from eqlosses.tasks.common import load_weights_file
from eqlosses.tasks.segmentation_models import (ARCHITECTURES, Segmenter, TinyDeepLab,
                                                build_segmenter)

tv = pytest.importorskip("torchvision")

SMALL = [("tiny_deeplab", "tiny"), ("deeplabv3", "resnet18"), ("fcn", "resnet18"),
         ("deeplabv3", "mobilenet_v3_large"), ("deeplabv3", "mobilenet_v3_small"),
         ("lraspp", "mobilenet_v3_large"), ("lraspp", "mobilenet_v3_small")]


@pytest.mark.parametrize("arch, backbone", SMALL)
def test_logits_at_input_resolution_and_a_training_step(arch, backbone):
    torch.manual_seed(0)
    model = build_segmenter(arch, 6, backbone, **({"width": 8} if arch == "tiny_deeplab"
                                                   else {}))
    assert isinstance(model, Segmenter)
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 6, (2, 64, 64))
    y[:, :4] = 255
    out = model(x)
    assert type(out) is torch.Tensor and out.shape == (2, 6, 64, 64)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(out, y, ignore_index=255)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 80)).shape == (1, 6, 48, 80)  # any size, batch 1


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["deeplabv3", "fcn"])
def test_aux_head_and_output_stride_of_resnet18(arch):
    model = build_segmenter(arch, 4, "resnet18", aux_loss=True)
    x = torch.randn(2, 3, 64, 64)
    out, aux = model(x, return_aux=True)
    assert out.shape == aux.shape == (2, 4, 64, 64)
    assert model(x).shape == (2, 4, 64, 64)  # a plain tensor unless asked for the aux logits
    feats = model.backbone(x)
    assert feats["out"].shape == (2, 512, 8, 8) and feats["aux"].shape == (2, 256, 8, 8)
    for stride, size in ((16, 4), (32, 2)):
        m = build_segmenter(arch, 4, "resnet18", output_stride=stride)
        assert m.backbone(x)["out"].shape[-1] == size
        assert m(x).shape == (2, 4, 64, 64)
    assert build_segmenter("tiny_deeplab", 3, width=4)(x, return_aux=True)[1] is None


def test_tiny_model_trains_with_batch_one():
    model = TinyDeepLab(3, width=4)
    out = model(torch.randn(1, 3, 32, 32))
    out.mean().backward()
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("ours, theirs", [
    (("lraspp", "mobilenet_v3_large", False), "lraspp_mobilenet_v3_large"),
    (("deeplabv3", "mobilenet_v3_large", True), "deeplabv3_mobilenet_v3_large"),
])
def test_same_network_as_torchvision_builders(ours, theirs):
    """Our composition has torchvision's keys and shapes and computes the same function."""
    from torchvision.models import segmentation

    arch, backbone, aux = ours
    kwargs = {"aux_loss": True} if aux else {}
    ref = getattr(segmentation, theirs)(weights=None, weights_backbone=None, num_classes=5,
                                        **kwargs).eval()
    model = build_segmenter(arch, 5, backbone, aux_loss=aux).eval()
    own, other = model.state_dict(), ref.state_dict()
    assert list(own) == list(other)
    assert all(own[k].shape == other[k].shape for k in own)
    model.load_state_dict(other)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x)["out"], atol=1e-5)


@pytest.mark.slow
def test_resnet50_keys_match_torchvision():
    from torchvision.models import segmentation

    ref = segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3,
                                          aux_loss=True)
    model = build_segmenter("deeplabv3", 3, "resnet50", aux_loss=True)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}
    ref_fcn = segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3)
    fcn = build_segmenter("fcn", 3, "resnet50")
    assert {k: v.shape for k, v in fcn.state_dict().items()} == {
        k: v.shape for k, v in ref_fcn.state_dict().items()}


def test_pretrained_round_trip_and_checkpoint_forms(tmp_path):
    torch.manual_seed(1)
    a = build_segmenter("lraspp", 5, "mobilenet_v3_small")
    torch.save(a.state_dict(), tmp_path / "w.pt")
    # a training checkpoint of a DDP model: {"model": {"module.<key>": ...}}
    torch.save({"model": {f"module.{k}": v for k, v in a.state_dict().items()}, "epoch": 3},
               tmp_path / "ckpt.pt")
    for name in ("w.pt", "ckpt.pt"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a full match warns about nothing
            b = build_segmenter("lraspp", 5, "mobilenet_v3_small",
                                pretrained=str(tmp_path / name))
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
    a.eval()
    b.eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a(x), b(x))


def test_head_of_another_class_count_is_skipped_with_a_warning(tmp_path):
    other = build_segmenter("deeplabv3", 7, "resnet18")
    torch.save(other.state_dict(), tmp_path / "w7.pt")
    with pytest.warns(UserWarning, match=r"w7.pt: skipped 2 entries of another shape .*: "
                                         r"classifier.4.bias \(7,\) \(model \(5,\)\), "
                                         r"classifier.4.weight \(7, 256, 1, 1\) \(model "
                                         r"\(5, 256, 1, 1\)\)$"):
        model = build_segmenter("deeplabv3", 5, "resnet18", pretrained=str(tmp_path / "w7.pt"))
    assert torch.equal(model.backbone.conv1.weight, other.backbone.conv1.weight)
    assert torch.equal(model.classifier[0].convs[0][0].weight,
                       other.classifier[0].convs[0][0].weight)
    assert model.classifier[4].weight.shape == (5, 256, 1, 1)
    torch.save({"unrelated": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no parameter matches"):
        build_segmenter("fcn", 3, "resnet18", pretrained=str(tmp_path / "bad.pt"))


@pytest.mark.slow
def test_backbone_from_a_classification_checkpoint(tmp_path):
    resnet = tv.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "r18.pt")  # has fc.*, which is not used
    with pytest.warns(UserWarning, match=r"2 file entries unused \(fc.bias, fc.weight\)"):
        model = build_segmenter("fcn", 4, "resnet18", pretrained_backbone=str(tmp_path / "r18.pt"))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    # MobileNet: the classification model's "features." prefix is dropped
    mnv3 = tv.models.mobilenet_v3_small(weights=None)
    torch.save(mnv3.state_dict(), tmp_path / "m.pt")
    lr = build_segmenter("lraspp", 4, "mobilenet_v3_small",
                         pretrained_backbone=str(tmp_path / "m.pt"))
    assert torch.equal(lr.backbone["0"][0].weight, mnv3.features[0][0].weight)
    # a whole segmentation model's file works as a backbone file too
    seg = build_segmenter("fcn", 9, "resnet18")
    torch.save(seg.state_dict(), tmp_path / "seg.pt")
    model = build_segmenter("deeplabv3", 4, "resnet18",
                            pretrained_backbone=str(tmp_path / "seg.pt"))
    assert torch.equal(model.backbone.conv1.weight, seg.backbone.conv1.weight)
    info = load_weights_file(model.backbone, str(tmp_path / "seg.pt"), prefixes=("backbone.",))
    assert info["skipped"] == [] and info["missing"] == [] and "conv1.weight" in info["loaded"]


def test_missing_files_and_bad_combinations(tmp_path):
    for key in ("pretrained", "pretrained_backbone"):
        with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
            build_segmenter("tiny_deeplab", 3, **{key: str(tmp_path / "nope.pt")})
    with pytest.raises(ValueError, match=r"unknown segmentation arch 'unet'.*lraspp: "
                                         r"mobilenet_v3_large, mobilenet_v3_small"):
        build_segmenter("unet", 3)
    with pytest.raises(ValueError, match=r"'lraspp' does not support backbone 'resnet18'.*"
                                         r"deeplabv3: resnet50, resnet18"):
        build_segmenter("lraspp", 3, "resnet18")
    with pytest.raises(ValueError, match="auxiliary head"):
        build_segmenter("lraspp", 3, aux_loss=True)
    with pytest.raises(ValueError, match="output_stride"):
        build_segmenter("fcn", 3, "resnet18", output_stride=4)
    with pytest.raises(ValueError, match="num_channels"):
        build_segmenter("tiny_deeplab", 0)
    assert set(ARCHITECTURES) == {"deeplabv3", "fcn", "lraspp", "tiny_deeplab"}
