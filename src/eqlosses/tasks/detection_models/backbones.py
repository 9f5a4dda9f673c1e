"""Randomly initialised FPN backbones for the detectors (nothing is downloaded)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import (BackboneWithFPN, _mobilenet_extractor,
                                                          _resnet_fpn_extractor)
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

__all__ = ["BACKBONES", "TinyBackbone", "build_detection_backbone"]

BACKBONES = ("tiny", "mobilenet_v3", "resnet18", "resnet50")


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
