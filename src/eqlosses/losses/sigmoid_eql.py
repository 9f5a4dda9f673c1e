"""Sigmoid-EQL (EQL v2): gradient-driven re-weighting of binary cross-entropy."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..functional.sigmoid import _sigmoid_eql, sigmoid_eql_weights
from ..stats import GradientStatistics
from .base import GradientDrivenLoss
from .contract import REDUCTION, LossTraits, Param


class SigmoidEQLLoss(GradientDrivenLoss):
    """Sigmoid-EQL (EQL v2) for two-stage detection: BCE re-weighted from gradient ratios.

        g_j = P_j / Nn_j (accumulated |dL/dz| on positives / negatives of class j)
        r_j = 1 / (1 + exp(-gamma (g_j - mu))),   q_j = 1 + alpha (1 - r_j)
        loss = sum_nj [q_j y_nj + r_j (1 - y_nj)] * BCEWithLogits(z_nj, y_nj) / N

    Tan et al., "Equalization Loss v2", CVPR 2021 (Sigmoid-EQL in arXiv:2210.05566).

    Conventions (as the authors' code): logits have ``C + 1`` columns, the last one an
    objectness/background logit trained like a class with weight 1 and never in the statistics;
    targets are ``[N]`` int64 in ``[0, C]`` with ``C`` = background, or ``ignore_index``.
    Statistics: per step, ``P_j += sum_n |p_nj - y_nj| w_nj y_nj`` and the same over negatives
    (not divided by N), from the detached logits; the weights of step t come from the statistics
    through step t - 1. Initial ratio ``init_ratio`` (100: all weights 1 before the first step).
    Test-time scores: ``sigmoid(z_j) * (1 - sigmoid(z_bg))``.

    With ``objectness=False`` the logits have ``C`` columns and no background column (a sigmoid
    classifier for image classification); scores are then ``sigmoid(z)``.

    Deviations from the reference: no update in eval mode or without grad; no all-reduce
    crash without a process group; ignored rows supported (the reference has none).

    Args:
        num_classes: foreground classes ``C``.
        gamma: steepness of the mapping from ratio to negative weight ``r_j`` (default 12).
        mu: its centre, the ratio at which ``r_j = 0.5`` (default 0.8).
        alpha: the positive weight's scale in ``q_j = 1 + alpha (1 - r_j)`` (default 4).
        init_ratio: ratio of classes with no gradient yet.
        reduction: ``"mean"`` (sum / non-ignored rows, the reference), ``"sum"``, ``"none"``.
        stats: a :class:`GradientStatistics` to share between losses.
        validate: check target values on the host (default); ``False``: no host
            synchronisation, ``torch.compile(fullgraph=True)`` works (see
            :class:`~eqlosses.losses.LongTailLoss`).

    Example:
        >>> crit = SigmoidEQLLoss(num_classes=3)
        >>> logits = torch.zeros(4, crit.num_channels, requires_grad=True)
        >>> loss = crit(logits, torch.tensor([0, 1, 3, 3]))
        >>> loss.backward()
        >>> crit.stats.pos_grad
        tensor([0.5000, 0.5000, 0.0000], dtype=torch.float64)
    """

    traits = LossTraits(
        activation="sigmoid",
        backgrounds={"column": {"objectness": True}, "index": {"objectness": False}},
        heads=("roi", "cls"),
        params={"gamma": Param(float, low=0), "mu": Param(float, low=0),
                "alpha": Param(float, low=0), "init_ratio": Param(float, low=0),
                "objectness": Param(bool), "reduction": REDUCTION},
        gradient_statistics=True)

    def __init__(self, num_classes: int, gamma: float = 12.0, mu: float = 0.8,
                 alpha: float = 4.0, init_ratio: float = 100.0, ignore_index: int = -100,
                 reduction: str = "mean", stats: Optional[GradientStatistics] = None,
                 objectness: bool = True, *, validate: bool = True):
        super().__init__(num_classes, ignore_index, reduction, stats, validate=validate)
        self._set_hparams(gamma=gamma, mu=mu, alpha=alpha, init_ratio=init_ratio,
                          objectness=objectness)
        self.num_channels = num_classes + 1 if objectness else num_classes

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._check_state_device(logits)
        update = self.updates_state
        res = _sigmoid_eql(logits, targets, self.stats.ratio(self.init_ratio), self.num_classes,
                           self.gamma, self.mu, self.alpha, self.ignore_index, self.reduction,
                           want_stats=update, objectness=self.objectness,
                           validate=self.validate)
        if update:
            self._update_stats(res.pos_inc, res.neg_inc)
        return res.loss

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` class scores ``sigmoid(z_j) * (1 - sigmoid(z_bg))`` (``sigmoid(z)``
        without an objectness column)."""
        p = torch.sigmoid(logits)
        if not self.objectness:
            return p
        return p[:, : self.num_classes] * (1 - p[:, self.num_classes :])

    def class_terms(self) -> Dict[str, torch.Tensor]:
        ratio = self.stats.ratio(self.init_ratio)
        pos_w, neg_w = sigmoid_eql_weights(ratio, self.gamma, self.mu, self.alpha)
        return {"ratio": ratio, "pos_weight": pos_w, "neg_weight": neg_w}
