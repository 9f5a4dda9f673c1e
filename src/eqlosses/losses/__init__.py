"""Loss modules (one family per file) and a registry to build them by name."""

from __future__ import annotations

from typing import Any, Dict, Type

from .base import GradientDrivenLoss, LongTailLoss
from .focal import EqualizedFocalLoss, EqualizedQualityFocalLoss, FocalLoss
from .seesaw import SeesawLoss
from .sigmoid import BCELoss, EQLLoss, FederatedLoss
from .sigmoid_eql import SigmoidEQLLoss
from .softmax import BalancedSoftmaxLoss, CrossEntropyLoss, EQLSoftmaxLoss, SoftmaxEQLLoss

LOSSES: Dict[str, Type[LongTailLoss]] = {
    "ce": CrossEntropyLoss,
    "bce": BCELoss,
    "focal": FocalLoss,
    "balanced_softmax": BalancedSoftmaxLoss,
    "softmax_eql": SoftmaxEQLLoss,
    "sigmoid_eql": SigmoidEQLLoss,
    "efl": EqualizedFocalLoss,
    "eqfl": EqualizedQualityFocalLoss,
    "eql": EQLLoss,
    "eql_softmax": EQLSoftmaxLoss,
    "seesaw": SeesawLoss,
    "federated": FederatedLoss,
}


def build_loss(name: str, num_classes: int, **kwargs: Any) -> LongTailLoss:
    """Build a loss by registry name, e.g. ``build_loss("softmax_eql", 10, tau=1.5)``.

    >>> build_loss("sigmoid_eql", 5).num_channels
    6
    """
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
    try:
        return cls(num_classes, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for loss {name!r} ({cls.__name__}): {err}") from None


__all__ = [
    "LOSSES", "build_loss", "LongTailLoss", "GradientDrivenLoss", "BCELoss",
    "BalancedSoftmaxLoss", "CrossEntropyLoss", "EQLLoss", "EQLSoftmaxLoss",
    "EqualizedFocalLoss", "EqualizedQualityFocalLoss", "FederatedLoss", "FocalLoss",
    "SeesawLoss", "SigmoidEQLLoss", "SoftmaxEQLLoss",
]
