"""Softmax losses: Softmax-EQL, balanced softmax, cross-entropy and EQL v1's softmax form."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..functional.softmax import (_adjusted_cross_entropy, _check_softmax_inputs, _eql_softmax,
                                  _softmax_eql, balanced_softmax_adjustment,
                                  softmax_eql_adjustment)
from ..functional._common import check_logits, check_reduction
from ..functional.soft_targets import (_soft_adjusted_cross_entropy, check_probability_targets,
                                       is_float_target)
from ..stats import GradientStatistics
from .base import GradientDrivenLoss, LongTailLoss, _warn_if_no_tail, class_vector
from .contract import REDUCTION, LossTraits, Param

INDICATORS = ("pos", "neg")


def _soft_forward(loss: LongTailLoss, logits: torch.Tensor, targets: torch.Tensor,
                  adjustment: Optional[torch.Tensor], what: str, track: bool):
    """Soft cross-entropy on ``logits + adjustment`` for ``[N, C', *]`` probability targets
    (:mod:`eqlosses.functional.soft_targets`); the kernel's result, statistics if ``track``."""
    check_reduction(loss.reduction)
    check_logits(logits, loss.num_channels, what, spatial=True)
    check_probability_targets(targets, logits, what, loss.validate)
    return _soft_adjusted_cross_entropy(logits, targets, adjustment, loss.reduction,
                                        want_stats=track)


class _SoftmaxScores:
    num_classes: int

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, C, *]`` class probabilities ``softmax(z)`` (background column dropped)."""
        return torch.softmax(logits, dim=1)[:, : self.num_classes]


class SoftmaxEQLLoss(_SoftmaxScores, GradientDrivenLoss):
    """Softmax-EQL: cross-entropy with margins calibrated by accumulated gradients.

        z~_nj = z_nj + tau log(max(I_j, eps) / max(I_{y_n}, eps))   (j != y_n)
        loss = CrossEntropy(z~, y)   (mean over non-ignored rows or pixels)

    ``I`` is the accumulated positive-gradient magnitude per class (``indicator="pos"``, the
    paper's choice) or the negative one (``"neg"``). Equivalent to logit adjustment with the
    class prior replaced by the normalised indicator. Initial ``I = 0``: step 0 is plain
    cross-entropy. Statistics: ``|d loss / d z|`` of the reduced loss at the raw logits,
    ``(softmax(z~) - y) / N`` for the default mean (not divided by N for ``"sum"``/``"none"``).
    With several processes each one divides by its own N, as the reference does: the
    statistics are then ``world_size`` times those of one process on the whole batch (for
    even splits), which leaves the margins' ratios unchanged except near ``eps``.
    Predict with the raw logits (``scores`` = softmax).

    Works for classification (``[N, C]``) and segmentation (``[B, C, H, W]`` logits with
    ``[B, H, W]`` targets); ignored pixels count in neither the loss nor the statistics.

    Probability targets (mixup, CutMix, label smoothing): float ``q`` of the logits' shape,
    non-negative, each row summing to 1. The loss is the soft cross-entropy on the adjusted
    logits, ``-sum_j q_nj log softmax(z~_n)_j`` (mean over rows), and the statistics are the
    ``q``-weighted mixture of the one-hot rows' (``pos_j += sum_n q_nj (1 - p~_nj) / N``,
    ``neg_j += sum_n (1 - q_nj) p~_nj / N``), so one-hot ``q`` gives the loss, gradient and
    statistics of integer targets (:mod:`eqlosses.functional.soft_targets`). With validation
    on, rows that do not sum to 1, negative entries and a wrong shape are a ``ValueError``.
    ``validate=False`` skips the check of the target values and the warning about a skipped
    statistics update: no host synchronisation, ``torch.compile(fullgraph=True)`` works (see
    :class:`~eqlosses.losses.LongTailLoss`).

    Example:
        >>> crit = SoftmaxEQLLoss(num_classes=3)
        >>> loss = crit(torch.zeros(2, 3, requires_grad=True), torch.tensor([0, 0]))
        >>> crit.class_terms()["margin"]
        tensor([-0.4055, -9.2103, -9.2103], dtype=torch.float64)
    """

    traits = LossTraits(
        activation="softmax", backgrounds={"none": {}}, heads=("cls", "seg"),
        params={"tau": Param(float, low=0), "eps": Param(float, low=0, low_open=True),
                "indicator": Param(str, choices=INDICATORS), "reduction": REDUCTION},
        pixels="native", gradient_statistics=True)

    def __init__(self, num_classes: int, tau: float = 1.0, eps: float = 1e-4,
                 indicator: str = "pos", ignore_index: int = -100, reduction: str = "mean",
                 stats: Optional[GradientStatistics] = None, *, validate: bool = True):
        super().__init__(num_classes, ignore_index, reduction, stats, validate=validate)
        self._set_hparams(tau=tau, eps=eps, indicator=indicator)
        self.num_channels = num_classes

    def _indicator(self) -> torch.Tensor:
        return self.stats.pos_grad if self.indicator == "pos" else self.stats.neg_grad

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._check_state_device(logits)
        update = self.updates_state
        res = _softmax_eql(logits, targets, self._indicator(), self.tau, self.eps,
                           self.ignore_index, self.reduction, want_stats=update,
                           validate=self.validate)  # class indices or probabilities
        if update:
            self._update_stats(res.pos_inc * res.scale, res.neg_inc * res.scale)
        return res.loss

    def class_terms(self) -> Dict[str, torch.Tensor]:
        indicator = self._indicator()
        return {"indicator": indicator,
                "margin": softmax_eql_adjustment(indicator, self.tau, self.eps)}


class BalancedSoftmaxLoss(_SoftmaxScores, LongTailLoss):
    """Balanced softmax / logit adjustment: ``CE(z + tau log(prior), y)``.

    ``prior`` is the normalised ``class_counts`` (classes with no sample count as one);
    ``tau=1`` is balanced softmax (Ren et al., 2020), other values the logit-adjusted loss
    (Menon et al., 2021). Same shapes, conventions and ``validate`` switch as
    :class:`SoftmaxEQLLoss`. ``track_statistics=True`` records Softmax-EQL's statistics of
    this loss in ``self.stats`` (``pos_j += sum_{y_n = j} (1 - p~_nj) / N``, ``neg_j +=
    sum_{y_n != j} p~_nj / N``, ``p~ = softmax(z + tau log prior)``), for diagnosis.
    Probability targets ``[N, C]`` (rows summing to 1) give the soft cross-entropy on the
    adjusted logits, ``-sum_j q_nj log p~_nj``, as for :class:`SoftmaxEQLLoss`.

    Example:
        >>> BalancedSoftmaxLoss(2, class_counts=torch.tensor([3, 1]))(
        ...     torch.zeros(1, 2), torch.tensor([1]))
        tensor(1.3863)
    """

    traits = LossTraits(
        activation="softmax", backgrounds={"none": {}}, heads=("cls", "seg"),
        params={"tau": Param(float, low=0), "reduction": REDUCTION},
        statistics={"class_counts": "counts"}, pixels="native", track_statistics=True)

    def __init__(self, num_classes: int, class_counts: torch.Tensor, tau: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", *, validate: bool = True,
                 track_statistics: bool = False):
        super().__init__(num_classes, ignore_index, reduction, validate=validate)
        counts = class_vector(class_counts, num_classes, "class_counts")
        self._set_hparams(tau=tau)
        self.num_channels = num_classes
        self.register_buffer("adjustment", balanced_softmax_adjustment(counts, tau))
        self._init_tracking(track_statistics)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if is_float_target(targets):
            track = self._tracking_now(logits)
            res = _soft_forward(self, logits, targets, self.adjustment.to(logits.device),
                                "balanced softmax", track)
        else:
            targets, all_valid = _check_softmax_inputs(logits, targets, self.num_channels,
                                                       "balanced softmax", self.ignore_index,
                                                       self.reduction, self.validate)
            track = self._tracking_now(logits)
            res = _adjusted_cross_entropy(logits, targets, self.adjustment.to(logits.device),
                                          self.ignore_index, self.reduction, track,
                                          all_valid=all_valid)
        if track:
            self._track(res.pos_inc, res.neg_inc, res.scale)
        return res.loss

    def class_terms(self) -> Dict[str, torch.Tensor]:
        return {"margin": self.adjustment}


class CrossEntropyLoss(_SoftmaxScores, LongTailLoss):
    """Softmax cross-entropy with the package's conventions (the baseline).

    ``background=False``: ``C`` channels, targets in ``[0, C)``. ``background=True`` (softmax
    detection heads): ``C + 1`` channels, target ``C`` = background. ``validate=False``
    skips the check of the target values (see :class:`~eqlosses.losses.LongTailLoss`).

    ``track_statistics=True`` (on in the pipelines) records, for diagnosis, the statistics the
    gradient-driven losses keep, in ``self.stats``: at each training forward, with ``p =
    softmax(z)`` and ``N`` the non-ignored rows (1 for ``reduction="sum"``),
    ``pos_j += sum_{y_n = j} (1 - p_nj) / N`` and ``neg_j += sum_{y_n != j} p_nj / N``, the
    magnitudes of ``d loss / d z`` (background column not recorded; background rows are
    negatives). Computed from the same softmax as the loss, with one all-reduce; the loss and
    its gradient are unchanged.

    Probability targets ``q`` of the logits' shape (rows summing to 1; mixup, label
    smoothing) give the soft cross-entropy ``-sum_j q_nj log p_nj`` (mean over rows) with
    the statistics of :class:`SoftmaxEQLLoss` for them: one-hot ``q`` equals integer targets.

        >>> q = torch.tensor([[0.9, 0.1]])  # label smoothing of class 0
        >>> CrossEntropyLoss(2)(torch.zeros(1, 2), q)  # -(0.9 + 0.1) log(1/2)
        tensor(0.6931)

    Example:
        >>> CrossEntropyLoss(2)(torch.zeros(1, 2), torch.tensor([1]))
        tensor(0.6931)
    """

    traits = LossTraits(
        activation="softmax",
        backgrounds={"none": {"background": False}, "column": {"background": True}},
        heads=("cls", "seg", "roi"),
        params={"background": Param(bool), "reduction": REDUCTION}, pixels="native",
        track_statistics=True)

    def __init__(self, num_classes: int, background: bool = False, ignore_index: int = -100,
                 reduction: str = "mean", *, validate: bool = True,
                 track_statistics: bool = False):
        super().__init__(num_classes, ignore_index, reduction, validate=validate)
        self._set_hparams(background=background)
        self.num_channels = num_classes + 1 if background else num_classes
        self._init_tracking(track_statistics)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if is_float_target(targets):
            track = self._tracking_now(logits)
            res = _soft_forward(self, logits, targets, None, "cross-entropy", track)
        else:
            targets, all_valid = _check_softmax_inputs(logits, targets, self.num_channels,
                                                       "cross-entropy", self.ignore_index,
                                                       self.reduction, self.validate)
            track = self._tracking_now(logits)
            res = _adjusted_cross_entropy(logits, targets, None, self.ignore_index,
                                          self.reduction, track, all_valid=all_valid)
        if track:
            self._track(res.pos_inc, res.neg_inc, res.scale)
        return res.loss


class EQLSoftmaxLoss(_SoftmaxScores, LongTailLoss):
    """EQL v1, softmax form: rare non-target classes dropped from the softmax denominator.

        w~_nk = 1 - beta_nk E_n T_k (1 - y_nk),   beta_nk ~ Bernoulli(gamma)
        loss = -log(exp(z_ny) / sum_k w~_nk exp(z_nk))

    ``T_k = class_frequency_k < lambda_``. In eval mode (or without grad) nothing is dropped
    (``beta = 0``), so a validation loss is deterministic. ``background=True`` adds a
    background column (target ``C``) whose rows suppress nothing. ``validate=False`` skips the
    check of the target values (see :class:`~eqlosses.losses.LongTailLoss`; ``torch.compile``
    captures the random draw when ``generator`` is None). ``track_statistics=True`` records
    the per-class magnitudes of ``d loss / d z`` in ``self.stats`` (a dropped class receives
    none from that row), for diagnosis.

    Example:
        >>> crit = EQLSoftmaxLoss(2, class_frequency=torch.tensor([0.5, 1e-4]), gamma=1.0)
        >>> crit(torch.zeros(1, 2), torch.tensor([0]))
        tensor(0.)
    """

    traits = LossTraits(
        activation="softmax",
        backgrounds={"none": {"background": False}, "column": {"background": True}},
        heads=("cls", "roi"),
        params={"lambda_": Param(float, low=0, high=1, low_open=True),
                "gamma": Param(float, low=0, high=1, doc="probability of dropping a rare "
                                                        "class from a row's denominator"),
                "background": Param(bool), "reduction": REDUCTION},
        statistics={"class_frequency": "frequency"}, stochastic=True, track_statistics=True)

    def __init__(self, num_classes: int, class_frequency: torch.Tensor, lambda_: float = 0.0011,
                 gamma: float = 0.9, background: bool = False, ignore_index: int = -100,
                 reduction: str = "mean", generator: Optional[torch.Generator] = None, *,
                 validate: bool = True, track_statistics: bool = False):
        super().__init__(num_classes, ignore_index, reduction, validate=validate)
        freq = class_vector(class_frequency, num_classes, "class_frequency")
        self.register_buffer("class_frequency", freq)
        self._set_hparams(lambda_=lambda_, gamma=gamma, background=background)
        self.generator = generator
        self.num_channels = num_classes + 1 if background else num_classes
        _warn_if_no_tail(freq, lambda_)
        self._init_tracking(track_statistics)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma if self.updates_state else 0.0
        track = self._tracking_now(logits) if isinstance(logits, torch.Tensor) else False
        res = _eql_softmax(logits, targets, self.class_frequency, self.lambda_, gamma,
                           self.background, self.ignore_index, self.reduction, self.generator,
                           self.validate, want_stats=track)
        if track:
            self._track(res.pos_inc, res.neg_inc, res.scale)
        return res.loss
