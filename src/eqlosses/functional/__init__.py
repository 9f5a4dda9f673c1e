"""Stateless losses: tensors and floats in, tensors out. No state, no communication."""

from .fused import (disable_fused_cpu_kernel, enable_fused_cpu_kernel,
                    fused_cpu_kernel_enabled)
from .focal import efl_gamma, equalized_focal_loss, equalized_quality_focal_loss, focal_loss
from .gradients import (GradientIncrements, bce_gradients, cross_entropy_gradients,
                        focal_gradients)
from .sigmoid import (eql_loss, eql_weights, federated_loss, sample_federated_classes,
                      sigmoid_eql_loss, sigmoid_eql_weights)
from .softmax import (balanced_softmax_adjustment, balanced_softmax_loss, eql_softmax_loss,
                      seesaw_loss, seesaw_weights, softmax_eql_adjustment, softmax_eql_loss)

__all__ = [
    "GradientIncrements", "bce_gradients", "cross_entropy_gradients", "focal_gradients",
    "balanced_softmax_adjustment", "disable_fused_cpu_kernel", "enable_fused_cpu_kernel",
    "fused_cpu_kernel_enabled", "balanced_softmax_loss", "efl_gamma", "eql_loss",
    "eql_softmax_loss", "eql_weights", "equalized_focal_loss", "equalized_quality_focal_loss",
    "federated_loss", "focal_loss", "sample_federated_classes", "seesaw_loss", "seesaw_weights",
    "sigmoid_eql_loss", "sigmoid_eql_weights", "softmax_eql_adjustment", "softmax_eql_loss",
]
