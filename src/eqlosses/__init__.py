"""eqlosses: the equalization losses for long-tailed recognition (arXiv:2210.05566).

The core (this package's ``stats``, ``functional``, ``losses`` and ``distributed`` modules)
depends on torch alone.
"""

from .losses import (LOSSES, BalancedSoftmaxLoss, BCELoss, ClassStatistics, CrossEntropyLoss,
                     EQLLoss, EQLSoftmaxLoss, EqualizedFocalLoss, EqualizedQualityFocalLoss,
                     FederatedLoss, FocalLoss, LossTraits, SeesawLoss, SigmoidEQLLoss,
                     SoftmaxEQLLoss, build_loss, build_loss_for, check_fits, losses_for,
                     register_loss)
from .stats import GradientStatistics

__version__ = "0.1.0"

__all__ = [
    "BCELoss", "BalancedSoftmaxLoss", "CrossEntropyLoss", "EQLLoss", "EQLSoftmaxLoss",
    "EqualizedFocalLoss", "EqualizedQualityFocalLoss", "FederatedLoss", "FocalLoss",
    "GradientStatistics", "LOSSES", "SeesawLoss", "SigmoidEQLLoss", "SoftmaxEQLLoss",
    "build_loss", "build_loss_for", "check_fits", "losses_for", "register_loss", "LossTraits",
    "ClassStatistics", "__version__",
]
