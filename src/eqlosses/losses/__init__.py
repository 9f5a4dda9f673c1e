"""Loss modules (one family per file), their declared traits and the registry that builds
them by name for a head (:mod:`eqlosses.losses.contract`, :mod:`eqlosses.losses.registry`)."""

from __future__ import annotations

from .base import GradientDrivenLoss, LongTailLoss
from .contract import HEADS, ClassStatistics, LossTraits, Param
from .focal import EqualizedFocalLoss, EqualizedQualityFocalLoss, FocalLoss
from .registry import (LOSSES, TASK_HEADS, build_loss, build_loss_for, check_fits,
                       check_loss_args, check_loss_config, default_hparams, head_for,
                       loss_class, losses_for, register_loss)
from .seesaw import SeesawLoss
from .sigmoid import BCELoss, EQLLoss, FederatedLoss
from .sigmoid_eql import SigmoidEQLLoss
from .softmax import BalancedSoftmaxLoss, CrossEntropyLoss, EQLSoftmaxLoss, SoftmaxEQLLoss
from .softmax_eql_variants import SoftmaxEQLVariantLoss  # registers softmax_eql_x

__all__ = [
    "LOSSES", "HEADS", "TASK_HEADS", "build_loss", "build_loss_for", "check_fits",
    "check_loss_args", "check_loss_config", "default_hparams", "head_for", "loss_class",
    "losses_for",
    "register_loss", "ClassStatistics", "LossTraits", "Param", "LongTailLoss",
    "GradientDrivenLoss", "BCELoss", "BalancedSoftmaxLoss", "CrossEntropyLoss", "EQLLoss",
    "EQLSoftmaxLoss", "EqualizedFocalLoss", "EqualizedQualityFocalLoss", "FederatedLoss",
    "FocalLoss", "SeesawLoss", "SigmoidEQLLoss", "SoftmaxEQLLoss",
]
