"""Focal-family losses for one-stage detection: focal loss, EFL and EQFL."""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from ..functional._common import check_tensor
from ..functional.focal import _check_focal_inputs, _equalized_focal, _focal, efl_gamma
from ..stats import GradientStatistics
from .base import GradientDrivenLoss, LongTailLoss, SigmoidScores
from .contract import REDUCTION, LossTraits, Param

Normalizer = Union[None, float, torch.Tensor]


class FocalLoss(SigmoidScores, LongTailLoss):
    """Sigmoid focal loss with the package's detection conventions.

        loss = sum_nj alpha_t (1 - p_t)^gamma (-log p_t) / normalizer

    Logits ``[N, C]``; targets ``[N]`` in ``[0, C]`` (``C`` = background) or ``ignore_index``;
    ``normalizer`` defaults to the number of positive rows (at least 1). ``validate=False``
    skips the check of the target values (see :class:`~eqlosses.losses.LongTailLoss`).
    ``track_statistics=True`` (on in the pipelines) records, for diagnosis, EFL's statistics
    of this loss in ``self.stats``: the per-class magnitudes of ``d loss / d z`` (alpha, focal
    term and ``1 / normalizer`` included) summed over positive and negative entries. The loss
    and its gradient are unchanged.

    Example:
        >>> FocalLoss(2)(torch.zeros(1, 2), torch.tensor([0]))
        tensor(0.1733)
    """

    traits = LossTraits(
        activation="sigmoid", backgrounds={"index": {}}, heads=("dense", "cls", "seg"),
        params={"gamma": Param(float, low=0), "alpha": Param(float, low=0, high=1, optional=True),
                "reduction": REDUCTION},
        normalizer=True, pixels="rows", track_statistics=True)

    def __init__(self, num_classes: int, gamma: float = 2.0, alpha: Optional[float] = 0.25,
                 ignore_index: int = -100, reduction: str = "mean", *, validate: bool = True,
                 track_statistics: bool = False):
        super().__init__(num_classes, ignore_index, reduction, validate=validate)
        self._set_hparams(gamma=gamma, alpha=alpha)
        self.num_channels = num_classes
        self._init_tracking(track_statistics)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                normalizer: Normalizer = None) -> torch.Tensor:
        check_tensor(logits)
        g = torch.full((self.num_classes,), float(self.gamma), device=logits.device)
        (targets, all_valid), _ = _check_focal_inputs(logits, targets, g, "the focal loss",
                                                      self.ignore_index, self.reduction,
                                                      self.validate)
        track = self._tracking_now(logits)
        res = _focal(logits, targets, g, torch.ones_like(g), self.alpha, None, normalizer,
                     self.ignore_index, self.reduction, want_stats=track, all_valid=all_valid)
        if track:
            self._track(res.pos_inc, res.neg_inc, res.scale)
        return res.loss


class EqualizedFocalLoss(SigmoidScores, GradientDrivenLoss):
    """Equalized Focal Loss (EFL) for one-stage detection.

        gamma_j = gamma_b + s (1 - clamp(g_j, 0, 1))
        loss = sum_nj alpha_t (gamma_j / gamma_b) (1 - p_t)^gamma_j (-log p_t) / normalizer

    Tan et al., "Equalized Focal Loss for Dense Long-Tailed Object Detection", CVPR 2022.
    ``gamma_j`` and the weighting factor ``gamma_j / gamma_b`` are constants for autograd.

    Conventions: logits ``[N, C]`` (rows are anchors); targets ``[N]`` in ``[0, C]`` with
    ``C`` = background anchor, or ``ignore_index`` (excluded from loss and statistics);
    ``normalizer`` defaults to the number of positive rows (at least 1) - with several
    processes pass the positives averaged over processes, as the reference does. Statistics:
    ``|d loss / d z|`` of the reduced loss (alpha, focal term, weighting factor and
    1/normalizer included), split by target; initial ratio 1 (plain focal loss at step 0).

    Deviations from the reference: ``log sigmoid`` through ``softplus`` (finite at logits
    of +-100 in float32, where ``-log(sigmoid(z))`` is inf); closed-form statistics over rows,
    so the reference's anchor-major/class-major channel mix-up with several anchors per
    location cannot happen; no update in eval mode; no crash without a process group.

    ``validate=False`` skips the check of the target values and the warning about a skipped
    statistics update: no host synchronisation, ``torch.compile(fullgraph=True)`` works (see
    :class:`~eqlosses.losses.LongTailLoss`).

    Example:
        >>> crit = EqualizedFocalLoss(num_classes=2)
        >>> loss = crit(torch.zeros(3, 2, requires_grad=True), torch.tensor([0, 2, 2]))
        >>> crit.class_terms()["gamma"]
        tensor([ 8.6667, 10.0000], dtype=torch.float64)
    """

    _quality = False
    traits = LossTraits(
        activation="sigmoid", backgrounds={"index": {}}, heads=("dense", "cls"),
        params={"focal_gamma": Param(float, low=0, low_open=True,
                                     doc="gamma_b; > 0 since it divides the weighting factor"),
                "scale_factor": Param(float, low=0),
                "alpha": Param(float, low=0, high=1, optional=True),
                "init_ratio": Param(float, low=0), "reduction": REDUCTION},
        normalizer=True, gradient_statistics=True)

    def __init__(self, num_classes: int, focal_gamma: float = 2.0, scale_factor: float = 8.0,
                 alpha: Optional[float] = 0.25, init_ratio: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean",
                 stats: Optional[GradientStatistics] = None, *, validate: bool = True):
        super().__init__(num_classes, ignore_index, reduction, stats, validate=validate)
        hparams = dict(focal_gamma=focal_gamma, scale_factor=scale_factor, alpha=alpha,
                       init_ratio=init_ratio)
        if self._quality:  # EQFL has no alpha
            del hparams["alpha"]
            self.alpha = None
        self._set_hparams(**hparams)
        self.num_channels = num_classes

    def _ratio(self) -> torch.Tensor:
        return self.stats.ratio(self.init_ratio).clamp(0, 1)

    def _forward(self, logits, targets, quality, normalizer):
        self._check_state_device(logits)
        update = self.updates_state
        res = _equalized_focal(logits, targets, self._ratio(), self.focal_gamma,
                               self.scale_factor, None if self._quality else self.alpha,
                               quality, normalizer, self.ignore_index, self.reduction,
                               want_stats=update, validate=self.validate)
        if update:
            self._update_stats(res.pos_inc * res.scale, res.neg_inc * res.scale)
        return res.loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                normalizer: Normalizer = None) -> torch.Tensor:
        return self._forward(logits, targets, None, normalizer)

    def class_terms(self) -> Dict[str, torch.Tensor]:
        ratio = self._ratio()
        gamma = efl_gamma(ratio, self.focal_gamma, self.scale_factor)
        return {"ratio": ratio, "gamma": gamma, "weight_factor": gamma / self.focal_gamma}


class EqualizedQualityFocalLoss(EqualizedFocalLoss):
    """Equalized Quality Focal Loss: EFL's per-class focusing on quality focal loss.

        negatives:                  BCE(z, 0) sigmoid(z)^gamma_j
        target entry of a positive: BCE(z, q) |q - sigmoid(z)|^gamma_j
        all times gamma_j / gamma_b, summed and divided by ``normalizer``

    Same conventions, statistics and deviations as :class:`EqualizedFocalLoss` (no alpha);
    ``quality`` is the ``[N]`` float quality target (IoU) of each row, read on positive rows.
    The YOLOX recipes use ``scale_factor=4``.

    Example:
        >>> crit = EqualizedQualityFocalLoss(num_classes=2)
        >>> crit(torch.zeros(1, 2), torch.tensor([0]), quality=torch.tensor([1.0]))
        tensor(0.3466)
    """

    _quality = True
    traits = LossTraits(
        activation="sigmoid", backgrounds={"index": {}}, heads=("dense",),
        params={k: v for k, v in EqualizedFocalLoss.traits.params.items() if k != "alpha"},
        normalizer=True, quality=True, gradient_statistics=True)

    def __init__(self, num_classes: int, focal_gamma: float = 2.0, scale_factor: float = 8.0,
                 init_ratio: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                 stats: Optional[GradientStatistics] = None, *, validate: bool = True):
        super().__init__(num_classes, focal_gamma, scale_factor, None, init_ratio, ignore_index,
                         reduction, stats, validate=validate)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                quality: torch.Tensor, normalizer: Normalizer = None) -> torch.Tensor:
        return self._forward(logits, targets, quality, normalizer)
