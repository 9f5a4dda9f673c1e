"""Frequency-based and baseline sigmoid losses: EQL v1, the federated loss and plain BCE."""

from __future__ import annotations

from typing import Optional

import torch

from ..functional.sigmoid import (_weighted_bce, eql_loss, eql_weights, federated_loss,
                                  sample_federated_classes)
from ..functional._common import (check_class_vector, check_logits, check_reduction,
                                  check_targets, check_tensor)
from .base import LongTailLoss, SigmoidScores, _warn_if_no_tail, class_vector
from .contract import REDUCTION, LossTraits, Param


class EQLLoss(SigmoidScores, LongTailLoss):
    """Equalization Loss v1 (sigmoid): foreground rows stop suppressing rare classes.

        w_nj = 1 - E_n T_j (1 - y_nj),   loss = sum_nj w_nj BCE(z_nj, y_nj) / N

    ``T_j = class_frequency_j < lambda_`` (image frequency; 0.0011 for LVIS v1, 0.00177 for
    LVIS v0.5), ``E_n`` = row n is foreground. Logits ``[N, C]`` (no background column);
    targets in ``[0, C]`` with ``C`` = background (all-zero target row) or ``ignore_index``.
    ``validate=False`` skips the check of the target values (see
    :class:`~eqlosses.losses.LongTailLoss`). ``track_statistics=True`` records the per-class
    magnitudes of ``d loss / d z`` in ``self.stats`` (as :class:`BCELoss` does), for diagnosis.

    Example:
        >>> EQLLoss(2, class_frequency=torch.tensor([0.5, 1e-4]))(
        ...     torch.zeros(1, 2), torch.tensor([0]))
        tensor(0.6931)
    """

    traits = LossTraits(
        activation="sigmoid", backgrounds={"index": {}}, heads=("roi", "dense", "cls"),
        params={"lambda_": Param(float, low=0, high=1, low_open=True),
                "reduction": REDUCTION},
        statistics={"class_frequency": "frequency"}, track_statistics=True)

    def __init__(self, num_classes: int, class_frequency: torch.Tensor, lambda_: float = 0.0011,
                 ignore_index: int = -100, reduction: str = "mean", *, validate: bool = True,
                 track_statistics: bool = False):
        super().__init__(num_classes, ignore_index, reduction, validate=validate)
        self.register_buffer("class_frequency",
                             class_vector(class_frequency, num_classes, "class_frequency"))
        self._set_hparams(lambda_=lambda_)
        self.num_channels = num_classes
        _warn_if_no_tail(self.class_frequency, lambda_)
        self._init_tracking(track_statistics)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_tensor(logits)
        if not self._tracking_now(logits):
            return eql_loss(logits, targets, self.class_frequency, self.lambda_,
                            self.ignore_index, self.reduction, validate=self.validate)
        # eql_loss's computation, with the statistics read off the same kernel
        c = self.num_classes
        check_reduction(self.reduction)
        check_logits(logits, c, "EQL")
        targets, all_valid = check_targets(targets, logits, c, self.ignore_index, "EQL",
                                           self.validate)
        freq = check_class_vector(self.class_frequency, c, "class_frequency", logits.device)
        neg_w = eql_weights(targets, freq, self.lambda_, c)
        res = _weighted_bce(logits, targets, torch.ones(c, device=logits.device), neg_w,
                            self.ignore_index, self.reduction, want_stats=True,
                            all_valid=all_valid)
        self._track(res.pos_inc, res.neg_inc, res.scale)
        return res.loss


class FederatedLoss(SigmoidScores, LongTailLoss):
    """Federated loss: sigmoid BCE over the present classes plus sampled negative classes.

    Each training step trains the classes present in the batch and, up to ``num_sampled`` in
    all, classes drawn without replacement with probability proportional to
    ``class_image_counts ** power`` (0.5: square root of the image count). Evaluation forwards
    use every class. Zhou et al., "Probabilistic two-stage detection", 2021.

    Logits ``[N, C]``; targets in ``[0, C]`` (``C`` = background) or ``ignore_index``.
    Sampling uses ``generator`` (or the global RNG): seed it per rank as you like. The draw
    reads nothing on the host; ``validate=False`` skips the check of the target values (see
    :class:`~eqlosses.losses.LongTailLoss`; ``torch.compile`` captures the draw when
    ``generator`` is None). ``track_statistics=True`` records the per-class magnitudes of
    ``d loss / d z`` in ``self.stats`` (classes not sampled in a step receive none), for
    diagnosis.

    Example:
        >>> crit = FederatedLoss(3, class_image_counts=torch.tensor([100, 10, 1]), num_sampled=2)
        >>> crit.eval()(torch.zeros(1, 3), torch.tensor([0]))
        tensor(2.0794)
    """

    traits = LossTraits(
        activation="sigmoid", backgrounds={"index": {}}, heads=("roi", "dense", "cls"),
        params={"num_sampled": Param(int, low=1), "power": Param(float, low=0),
                "reduction": REDUCTION},
        statistics={"class_image_counts": "counts"}, stochastic=True, track_statistics=True)

    def __init__(self, num_classes: int, class_image_counts: torch.Tensor,
                 num_sampled: int = 50, power: float = 0.5, ignore_index: int = -100,
                 reduction: str = "mean", generator: Optional[torch.Generator] = None, *,
                 validate: bool = True, track_statistics: bool = False):
        super().__init__(num_classes, ignore_index, reduction, validate=validate)
        self._set_hparams(num_sampled=num_sampled, power=power)
        counts = class_vector(class_image_counts, num_classes, "class_image_counts")
        self.register_buffer("sampling_weight", counts.clamp(min=0).pow(self.power))
        self.generator = generator
        self.num_channels = num_classes
        self._init_tracking(track_statistics)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_tensor(logits)
        if self.updates_state:
            mask = sample_federated_classes(targets, self.sampling_weight, self.num_sampled,
                                            self.generator)
        else:
            mask = torch.ones(self.num_classes, dtype=torch.bool, device=logits.device)
        if not self._tracking_now(logits):
            return federated_loss(logits, targets, mask, self.ignore_index, self.reduction,
                                  validate=self.validate)
        # federated_loss's computation, with the statistics read off the same kernel
        c = self.num_classes
        check_reduction(self.reduction)
        check_logits(logits, c, "the federated loss")
        targets, all_valid = check_targets(targets, logits, c, self.ignore_index,
                                           "the federated loss", self.validate)
        w = mask.to(logits.device, torch.float32)
        res = _weighted_bce(logits, targets, w, w, self.ignore_index, self.reduction,
                            want_stats=True, all_valid=all_valid)
        self._track(res.pos_inc, res.neg_inc, res.scale)
        return res.loss


class BCELoss(SigmoidScores, LongTailLoss):
    """Plain sigmoid binary cross-entropy with the package's conventions (the baseline).

    ``objectness=False``: logits ``[N, C]``, target ``C`` = background (all-zero row).
    ``objectness=True``: logits ``[N, C + 1]`` whose last column is trained as an
    objectness/background class, as in :class:`SigmoidEQLLoss` (whose initial state this
    equals); scores are then ``sigmoid(z_j) * (1 - sigmoid(z_bg))``. ``validate=False`` skips
    the check of the target values (see :class:`~eqlosses.losses.LongTailLoss`).

    ``track_statistics=True`` (on in the pipelines) records, for diagnosis, the statistics
    Sigmoid-EQL keeps, in ``self.stats``: with ``p = sigmoid(z)`` and ``N`` the non-ignored
    rows (1 for ``"sum"``), ``pos_j += sum_{y_n = j} (1 - p_nj) / N`` and ``neg_j +=
    sum_{y_n != j} p_nj / N`` (background rows are negatives; the objectness column is not
    recorded). The loss and its gradient are unchanged.

    Example:
        >>> BCELoss(2)(torch.zeros(1, 2), torch.tensor([0]))
        tensor(1.3863)
    """

    traits = LossTraits(
        activation="sigmoid",
        backgrounds={"index": {"objectness": False}, "column": {"objectness": True}},
        heads=("cls", "roi", "dense"),
        params={"objectness": Param(bool), "reduction": REDUCTION}, track_statistics=True)

    def __init__(self, num_classes: int, objectness: bool = False, ignore_index: int = -100,
                 reduction: str = "mean", *, validate: bool = True,
                 track_statistics: bool = False):
        super().__init__(num_classes, ignore_index, reduction, validate=validate)
        self._set_hparams(objectness=objectness)
        self.num_channels = num_classes + 1 if objectness else num_classes
        self._init_tracking(track_statistics)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_reduction(self.reduction)
        check_logits(logits, self.num_channels, "BCE")
        targets, all_valid = check_targets(targets, logits, self.num_classes, self.ignore_index,
                                           "BCE", self.validate)
        ones = torch.ones(self.num_channels, device=logits.device)
        track = self._tracking_now(logits)
        res = _weighted_bce(logits, targets, ones, ones, self.ignore_index, self.reduction,
                            want_stats=track, all_valid=all_valid)
        if track:
            self._track(res.pos_inc, res.neg_inc, res.scale)
        return res.loss

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        if not self.objectness:
            return p
        return p[:, : self.num_classes] * (1 - p[:, self.num_classes :])
