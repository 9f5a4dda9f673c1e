"""Semantic segmentation models: torchvision DeepLabV3 / FCN / LR-ASPP and a tiny CPU model.

Every builder returns a :class:`Segmenter`: ``forward(images [B, 3, H, W])`` returns the logits
``[B, num_channels, H, W]`` as a plain tensor, bilinearly upsampled to the input resolution
(torchvision's models return an ``OrderedDict``; this unwraps ``"out"``). The number of logit
channels comes from the loss (``criterion.num_channels``), as for the classification models.

Architectures (``arch`` -> ``backbone``):

==============  ===============================================================================
deeplabv3       resnet18, resnet34, resnet50, resnet101, mobilenet_v3_large, mobilenet_v3_small
fcn             resnet18, resnet34, resnet50, resnet101
lraspp          mobilenet_v3_large, mobilenet_v3_small
tiny_deeplab    tiny (a 0.5 M-parameter DeepLabV3+-like network for CPU benchmarks)
==============  ===============================================================================

The ResNet models are torchvision's composition (``IntermediateLayerGetter`` on the ResNet,
``DeepLabHead`` or ``FCNHead`` on ``layer4``, an ``FCNHead`` auxiliary head on ``layer3``) with a
dilated backbone: output stride 8 by default, like torchvision's ``deeplabv3_resnet50``. For
ResNet-18/34 (basic blocks, which torchvision does not dilate) the 3x3 convolutions of the
dilated stages are given the dilation here. The MobileNetV3 models are torchvision's (dilated
last stage, output stride 16). The state-dict keys are torchvision's (``backbone.*``,
``classifier.*``, ``aux_classifier.*``), so torchvision checkpoints saved on disk load as they
are.

Everything starts from a random initialisation; nothing is ever downloaded. ``pretrained`` is a
local state-dict file for the whole model, ``pretrained_backbone`` one for the backbone (a
classification checkpoint of the same torchvision network works: its classifier is ignored).
Entries whose shape differs (the head of another class count, typically) are skipped with a
warning that lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import load_weights_file

__all__ = ["ARCHITECTURES", "Segmenter", "TinyDeepLab", "build_segmenter"]

_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
_MOBILENETS = ("mobilenet_v3_large", "mobilenet_v3_small")

#: arch -> the backbones it supports; the first one is the default.
ARCHITECTURES: Dict[str, Tuple[str, ...]] = {
    "deeplabv3": ("resnet50", "resnet18", "resnet34", "resnet101") + _MOBILENETS,
    "fcn": ("resnet50", "resnet18", "resnet34", "resnet101"),
    "lraspp": _MOBILENETS,
    "tiny_deeplab": ("tiny",),
}


def _valid_combos() -> str:
    return "; ".join(f"{a}: {', '.join(b)}" for a, b in ARCHITECTURES.items())


# --------------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------------

class Segmenter(nn.Module):
    """A backbone and a head; ``forward`` returns logits ``[B, C, H, W]`` at input resolution.

    Args:
        backbone: module mapping images to a dict of feature maps (torchvision's
            ``IntermediateLayerGetter``).
        classifier: the head. With ``kind="simple"`` (DeepLabV3, FCN) it receives
            ``features["out"]``; with ``kind="multi"`` it receives the whole dict.
        aux_classifier: optional auxiliary head on ``features["aux"]`` (kind ``"simple"``).
        kind: ``"simple"`` or ``"multi"`` (LR-ASPP, the tiny model).

    ``forward(images, return_aux=True)`` returns ``(logits, aux_logits)`` (``aux_logits`` is
    None without an auxiliary head), for recipes that add the auxiliary loss.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module,
                 aux_classifier: Optional[nn.Module] = None, kind: str = "simple"):
        super().__init__()
        if kind not in ("simple", "multi"):
            raise ValueError(f"kind must be 'simple' or 'multi', got {kind!r}")
        if aux_classifier is not None and kind != "simple":
            raise ValueError("an auxiliary head needs kind='simple'")
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.kind = kind

    def forward(self, images: torch.Tensor, return_aux: bool = False):
        if images.dim() != 4:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        size = images.shape[-2:]
        features = self.backbone(images)
        if self.kind == "multi":
            out = self.classifier(features)
        else:
            out = self.classifier(features["out"])
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        if not return_aux:
            return out
        aux = None
        if self.aux_classifier is not None:
            aux = F.interpolate(self.aux_classifier(features["aux"]), size=size,
                                mode="bilinear", align_corners=False)
        return out, aux


# --------------------------------------------------------------------------------------------
# A tiny CPU model
# --------------------------------------------------------------------------------------------

def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _TinyBackbone(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_cbr(3, w // 2, stride=2), _cbr(w // 2, w))        # /2
        self.stage2 = nn.Sequential(_cbr(w, 2 * w, stride=2), _cbr(2 * w, 2 * w))    # /4
        self.stage3 = nn.Sequential(_cbr(2 * w, 4 * w, stride=2),                    # /8
                                    _cbr(4 * w, 4 * w, dilation=2))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        low = self.stage2(self.stem(x))
        return {"low": low, "out": self.stage3(low)}


class _TinyHead(nn.Module):
    """ASPP (1x1, two dilated 3x3, image pooling) and a DeepLabV3+ decoder at stride 4."""

    def __init__(self, width: int, num_channels: int, rates: Sequence[int] = (2, 4)):
        super().__init__()
        w, a = width, 2 * width
        self.branches = nn.ModuleList([_cbr(4 * w, a, k=1)] +
                                      [_cbr(4 * w, a, dilation=r) for r in rates])
        # no batch norm on the pooled branch: it sees one value per channel and image
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4 * w, a, 1),
                                  nn.ReLU(inplace=True))
        self.project = _cbr(a * (len(rates) + 2), a, k=1)
        self.low_project = _cbr(2 * w, w // 2, k=1)
        self.decode = _cbr(a + w // 2, a)
        self.cls = nn.Conv2d(a, num_channels, 1)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x, low = features["out"], features["low"]
        pooled = self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1])
        x = self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.cls(self.decode(torch.cat([x, self.low_project(low)], dim=1)))


class TinyDeepLab(Segmenter):
    """A small DeepLabV3+-like network for CPU benchmarks on 64-128 pixel images.

    Six 3x3 conv-BN-ReLU layers (output stride 8, the last dilated), an ASPP with a 1x1, two
    dilated 3x3 (rates 2, 4) and an image-pooling branch, and a decoder that fuses the stride-4
    features before a 1x1 classifier; ``width=32`` gives about 0.5 M parameters.

    >>> TinyDeepLab(5, width=8)(torch.zeros(2, 3, 40, 56)).shape
    torch.Size([2, 5, 40, 56])
    """

    def __init__(self, num_channels: int, width: int = 32):
        if width < 2 or width % 2:
            raise ValueError(f"width must be an even int >= 2, got {width!r}")
        super().__init__(_TinyBackbone(width), _TinyHead(width, num_channels), kind="multi")


# --------------------------------------------------------------------------------------------
# torchvision compositions
# --------------------------------------------------------------------------------------------

def _torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise ImportError("the deeplabv3 / fcn / lraspp models need torchvision: pip install "
                          "'eqlosses[vision]' (or use arch='tiny_deeplab')") from None
    return torchvision


def _dilate_basic_layer(layer: nn.Sequential, dilation: int, previous: int) -> None:
    """Turn a stride-2 stage of basic blocks into a stride-1 stage with dilated 3x3 convs
    (torchvision's convention: the first conv of the stage keeps the previous dilation)."""
    for i, block in enumerate(layer):
        for conv, d in ((block.conv1, previous if i == 0 else dilation), (block.conv2, dilation)):
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


def _resnet_model(arch: str, backbone: str, num_channels: int, aux_loss: bool,
                  output_stride: int) -> Segmenter:
    tv = _torchvision()
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead
    from torchvision.models.segmentation.fcn import FCNHead

    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[
        output_stride]
    basic = backbone in ("resnet18", "resnet34")
    net = getattr(tv.models, backbone)(
        weights=None, replace_stride_with_dilation=None if basic else dilate)
    if basic:
        d = 1
        for layer, on in zip((net.layer2, net.layer3, net.layer4), dilate):
            if on:
                _dilate_basic_layer(layer, 2 * d, d)
                d *= 2
    out_ch = net.fc.in_features            # 512 or 2048
    aux_ch = out_ch // 2                    # layer3
    layers = {"layer4": "out"}
    if aux_loss:
        layers["layer3"] = "aux"
    body = IntermediateLayerGetter(net, return_layers=layers)
    head = DeepLabHead(out_ch, num_channels) if arch == "deeplabv3" else FCNHead(out_ch,
                                                                                 num_channels)
    aux = FCNHead(aux_ch, num_channels) if aux_loss else None
    return Segmenter(body, head, aux, kind="simple")


def _mobilenet_model(arch: str, backbone: str, num_channels: int, aux_loss: bool) -> Segmenter:
    tv = _torchvision()
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead
    from torchvision.models.segmentation.fcn import FCNHead
    from torchvision.models.segmentation.lraspp import LRASPPHead

    features = getattr(tv.models, backbone)(weights=None, dilated=True).features
    # first block, the strided blocks (torchvision marks them _is_cn), last block
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [
        len(features) - 1]
    high, low = stages[-1], stages[-4]      # output stride 16 and 8
    high_ch, low_ch = features[high].out_channels, features[low].out_channels
    if arch == "lraspp":
        body = IntermediateLayerGetter(features, return_layers={str(low): "low",
                                                                str(high): "high"})
        return Segmenter(body, LRASPPHead(low_ch, high_ch, num_channels, 128), kind="multi")
    layers = {str(high): "out"}
    if aux_loss:
        layers[str(low)] = "aux"
    body = IntermediateLayerGetter(features, return_layers=layers)
    aux = FCNHead(low_ch, num_channels) if aux_loss else None
    return Segmenter(body, DeepLabHead(high_ch, num_channels), aux, kind="simple")


# --------------------------------------------------------------------------------------------
# Builder and weight loading
# --------------------------------------------------------------------------------------------

def build_segmenter(arch: str, num_channels: int, backbone: Optional[str] = None,
                    pretrained: Optional[str] = None, pretrained_backbone: Optional[str] = None,
                    aux_loss: bool = False, *, output_stride: int = 8,
                    width: int = 32) -> Segmenter:
    """Build a segmentation model with ``num_channels`` logit channels (random init).

    Args:
        arch: ``"deeplabv3"``, ``"fcn"``, ``"lraspp"`` or ``"tiny_deeplab"``.
        num_channels: logit channels (classes) of the output.
        backbone: see :data:`ARCHITECTURES`; None takes the arch's default (``resnet50`` for
            deeplabv3 and fcn, ``mobilenet_v3_large`` for lraspp).
        pretrained: local state-dict file for the whole model (loaded last).
        pretrained_backbone: local state-dict file for the backbone only.
        aux_loss: add torchvision's auxiliary FCN head (deeplabv3 and fcn only); its logits
            come from ``model(images, return_aux=True)``.
        output_stride: 8, 16 or 32, for the ResNet backbones (dilation of layer3 / layer4).
        width: channel width of ``tiny_deeplab``.

    Raises:
        ValueError: unknown arch or arch/backbone combination (the message lists the valid
            ones), or ``aux_loss`` with an architecture that has no auxiliary head.
        FileNotFoundError: a weights file that does not exist.

    >>> m = build_segmenter("tiny_deeplab", 7, width=8)
    >>> m(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 7, 64, 64])
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown segmentation arch {arch!r}; valid arch: backbones are "
                         f"{_valid_combos()}")
    backbone = ARCHITECTURES[arch][0] if backbone is None else backbone
    if backbone not in ARCHITECTURES[arch]:
        raise ValueError(f"arch {arch!r} does not support backbone {backbone!r}; valid arch: "
                         f"backbones are {_valid_combos()}")
    if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels < 1:
        raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
    if aux_loss and arch in ("lraspp", "tiny_deeplab"):
        raise ValueError(f"aux_loss=True needs an auxiliary head; arch {arch!r} has none "
                         f"(use deeplabv3 or fcn)")
    for file in (pretrained, pretrained_backbone):
        if file is not None and not Path(file).is_file():
            raise FileNotFoundError(f"pretrained weights file {file} does not exist")

    if arch == "tiny_deeplab":
        model: Segmenter = TinyDeepLab(num_channels, width)
    elif backbone in _RESNETS:
        model = _resnet_model(arch, backbone, num_channels, aux_loss, output_stride)
    else:
        model = _mobilenet_model(arch, backbone, num_channels, aux_loss)
    if pretrained_backbone is not None:
        load_weights_file(model.backbone, pretrained_backbone,
                          prefixes=("module.", "backbone.", "features."))
    if pretrained is not None:
        load_weights_file(model, pretrained, prefixes=("module.",))
    return model
