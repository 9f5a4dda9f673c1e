"""Classification models: a small CNN for 28x28 images, torchvision ResNets, cosine classifier.

Every builder takes the number of logit channels from the loss (``criterion.num_channels``),
so a sigmoid loss with an objectness column or a softmax loss get the head they need.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import load_weights_file

__all__ = ["CosineClassifier", "SmallCNN", "build_classifier", "load_pretrained"]


class CosineClassifier(nn.Module):
    """Cosine classifier: ``logits = scale * <f / |f|, w_j / |w_j|>``.

    The classifier of the paper's classification experiments (scale 30).

    >>> head = CosineClassifier(8, 3)
    >>> bool(head(torch.randn(2, 8)).abs().max() <= 30.0 + 1e-4)
    True
    """

    def __init__(self, in_features: int, num_outputs: int, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_outputs, in_features) * 0.01)
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))


def _head(in_features: int, num_outputs: int, cosine: bool, scale: float) -> nn.Module:
    return CosineClassifier(in_features, num_outputs, scale) if cosine else nn.Linear(
        in_features, num_outputs)


class SmallCNN(nn.Module):
    """A CPU-friendly CNN for small images (e.g. 28x28 Fashion-MNIST): three conv stages with
    batch norm, global average pooling and a linear or cosine head."""

    def __init__(self, num_outputs: int, in_channels: int = 1, width: int = 32,
                 cosine: bool = False, cosine_scale: float = 30.0):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = _head(4 * w, num_outputs, cosine, cosine_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _resnet(name: str, num_outputs: int, in_channels: int, small_input: bool, cosine: bool,
            cosine_scale: float) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ImportError(f"model '{name}' needs torchvision: pip install 'eqlosses[vision]'"
                          ) from None
    model = getattr(torchvision.models, name)(weights=None)
    if small_input or in_channels != 3:
        # CIFAR-style stem for small images: 3x3 stride-1 convolution, no max-pool.
        stride, kernel = (1, 3) if small_input else (2, 7)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, kernel // 2, bias=False)
        if small_input:
            model.maxpool = nn.Identity()
    model.fc = _head(model.fc.in_features, num_outputs, cosine, cosine_scale)
    return model


RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def build_classifier(name: str, num_outputs: int, in_channels: int = 3, image_size: int = 224,
                     width: int = 32, cosine: bool = False, cosine_scale: float = 30.0,
                     pretrained: Optional[str] = None) -> nn.Module:
    """Build a classifier with ``num_outputs`` logit channels.

    >>> build_classifier("small_cnn", 11, in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 11])
    """
    if name == "small_cnn":
        model = SmallCNN(num_outputs, in_channels, width, cosine, cosine_scale)
    elif name in RESNETS:
        model = _resnet(name, num_outputs, in_channels, image_size <= 64, cosine, cosine_scale)
    else:
        raise ValueError(f"unknown model '{name}'; choose small_cnn or one of {RESNETS}")
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def load_pretrained(model: nn.Module, path: str) -> None:
    """Initialise ``model`` from a local state-dict file (see
    :func:`eqlosses.tasks.common.load_weights_file`: entries of another shape, typically the
    classifier head of another class count, are skipped with a warning naming them). Nothing
    is downloaded."""
    load_weights_file(model, path, prefixes=("module.",))
