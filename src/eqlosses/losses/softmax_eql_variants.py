"""Softmax-EQL variants beyond the paper (issue 13), registered as ``softmax_eql_x``.

The paper's loss (:class:`~eqlosses.losses.SoftmaxEQLLoss`, ``softmax_eql``) is unchanged and
stays the default; these variants change *which* gradient statistics set the margins, never
the form of the loss, and none of them is given class counts. See ``docs/beyond-the-paper.md``
for what they were measured to do.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..functional._common import compute_dtype, per_class_sum, scale_of
from ..functional.softmax import _adjusted_cross_entropy, _check_softmax_inputs
from ..functional.softmax_eql_variants import INDICATORS, eql_indicator, raw_softmax_increments
from ..stats import GradientStatistics
from .base import GradientDrivenLoss
from .contract import REDUCTION, LossTraits, Param
from .registry import register_loss
from .softmax import _SoftmaxScores

__all__ = ["SoftmaxEQLVariantLoss", "STATISTICS_SOURCES", "VARIANT_INDICATORS"]

#: where the gradient statistics are taken: the adjusted logits (paper) or the raw ones
STATISTICS_SOURCES = ("adjusted", "raw")
#: the indicators read off the statistics, and "mass" (the summed predicted probabilities)
VARIANT_INDICATORS = INDICATORS + ("mass",)


def _valid_counts(targets: torch.Tensor, ignore_index: int, reduction: str, num_classes: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """``[C]`` non-ignored rows (pixels) per class in the batch, times the reduction's scale
    (``1 / valid rows`` for a mean), as the statistics increments are; no host read."""
    valid = targets != ignore_index
    ones = valid.to(dtype)
    counts = per_class_sum(ones, targets.masked_fill(~valid, 0), None, num_classes)
    return counts * scale_of(reduction, ones.sum().clamp(min=1))


@register_loss("softmax_eql_x")
class SoftmaxEQLVariantLoss(_SoftmaxScores, GradientDrivenLoss):
    """Softmax-EQL with a choice of statistics, indicator, averaging and tau schedule.

        z~_nj = z_nj + tau_t log(max(I_j, eps) / max(I_{y_n}, eps))   (j != y_n)
        loss = CrossEntropy(z~, y)

    * ``source="adjusted"`` (the paper): ``self.stats`` accumulates ``|d CE(z~, y)/d z|
      = |softmax(z~) - y|``. ``"raw"``: the gradient of plain cross-entropy at the raw logits,
      ``|softmax(z) - y|`` (:func:`~eqlosses.functional.softmax_eql_variants.raw_softmax_increments`),
      which does not shrink or grow with the margins the statistics set.
    * ``indicator``: ``"pos"`` ``I = P``, ``"neg"`` ``I = Nn``, ``"ratio"`` ``I = P / Nn``;
      ``"mass"`` ``I_j = M_j``, the accumulated predicted probability of class j over every row,
      ``M_j += sum_n p_nj / N`` (``p`` the softmax of the statistics' source; buffer ``mass``).
      It reads no label: it is the negative half of the gradient of a per-class bias,
      ``d loss / d b_j = sum_n (p_nj - y_nj) / N``, which training drives to zero, so ``M``
      tends to the class frequencies of the training stream (the prior balanced softmax is
      given) without being told them. Computed as ``Nn_j + n_j - P_j`` (``n_j`` the batch's
      rows of class j), the same sum to rounding.
    * ``decay``: 1 (default) uses the cumulative sums; below 1, ``I`` is read off decaying
      sums ``S_t = decay * S_{t-1} + inc_t`` (buffers ``avg_pos``, ``avg_neg``, ``mass``), which forget
      the early steps (``decay=0.99``: a horizon of about 100 steps). ``self.stats`` keeps the
      cumulative sums in either case (monitoring, checkpoints).
    * ``recency``: 0 (default) weighs every step alike; above 0, the increments of update t
      (1-based) are weighted by ``t ** recency`` in the sums ``I`` is read from (the same
      buffers as for ``decay``): with 1, the first tenth of training carries a hundredth of
      the weight instead of a tenth, so the indicator forgets the near-uniform predictions
      of the first steps faster while still averaging over the whole run (unlike ``decay``,
      whose horizon stays short). A common factor of ``I`` cancels in the softmax.
    * ``tau_warmup``: ``tau_t = tau * min(1, updates / tau_warmup)`` (0: constant ``tau``).
    * ``gamma``: 0 (default) leaves the logits as they are; above 0 they are also scaled per
      class before the margins are added, ``z~_nj = s_j z_nj + tau_t log max(I_j, eps)`` with
      ``s_j = (max(I_j, eps) / max_k max(I_k, eps))^gamma`` (a label-free form of the
      vector-scaling loss of Kini et al., 2021, which takes ``s_j = (n_j / n_max)^gamma``
      from the counts). A rare class's logit is scaled down in training, so the model must
      make it larger to win: by Kini et al.'s argument a margin that, unlike the additive
      one, does not fade as the logits grow on separable data. Predictions use the unscaled
      logits. On Fashion-MNIST-LT it lowered accuracy (``docs/beyond-the-paper.md``).
    * ``balance``: 0 (default) weighs every row alike; ``beta`` in (0, 1] weighs row n's loss
      by ``w_{y_n}``, with ``pi = max(I, eps) / sum_k max(I_k, eps)`` the indicator read as
      the class prior of the training stream and

          w_j = pi_j^-beta / sum_k pi_k^(1 - beta),

      normalised so that the expected weight of a row, ``sum_j pi_j w_j``, is 1. In
      expectation this is the loss of a stream re-sampled with class probabilities
      ``pi_j^(1 - beta)`` (``beta = 0.5``: square-root sampling; 1: class-balanced), with
      the margins still set by the un-resampled prior, and without the counts a sampler
      needs. The statistics (and so ``I``) stay those of the unweighted loss; with
      ``indicator="mass"`` ``pi`` tends to the class frequencies. On Fashion-MNIST-LT,
      0.5 with the mass and ``recency=1`` raised accuracy above balanced softmax's at
      imbalance 100 and matched it at 10 (``docs/beyond-the-paper.md``).

    With the defaults it computes exactly the paper's loss and statistics. Weights at step t
    use the statistics through step t - 1; evaluation forwards update nothing.

    Example:
        >>> crit = SoftmaxEQLVariantLoss(3, source="raw")
        >>> loss = crit(torch.zeros(2, 3, requires_grad=True), torch.tensor([0, 0]))
        >>> crit.stats.pos_grad  # (1 - 1/3) per row, mean over 2 rows, for class 0
        tensor([0.6667, 0.0000, 0.0000], dtype=torch.float64)
        >>> crit.class_terms()["margin"]
        tensor([-0.4055, -9.2103, -9.2103], dtype=torch.float64)
    """

    traits = LossTraits(
        activation="softmax", backgrounds={"none": {}}, heads=("cls", "seg"),
        params={"tau": Param(float, low=0), "eps": Param(float, low=0, low_open=True),
                "indicator": Param(str, choices=VARIANT_INDICATORS),
                "source": Param(str, choices=STATISTICS_SOURCES,
                                    doc="gradient of the adjusted (paper) or raw logits"),
                "decay": Param(float, low=0, high=1, low_open=True,
                               doc="1: cumulative sums; < 1: decaying sums"),
                "tau_warmup": Param(int, low=0, doc="steps over which tau ramps up from 0"),
                "gamma": Param(float, low=0,
                               doc="per-class logit scale (I_j / max I)^gamma; 0: none"),
                "recency": Param(float, low=0,
                                 doc="weight t**recency for the increments of update t"),
                "balance": Param(float, low=0, high=1,
                                 doc="rows weighted by the indicator's prior ** -balance"),
                "reduction": REDUCTION},
        pixels="native", gradient_statistics=True)

    def __init__(self, num_classes: int, tau: float = 1.0, eps: float = 1e-4,
                 indicator: str = "pos", source: str = "adjusted", decay: float = 1.0,
                 tau_warmup: int = 0, gamma: float = 0.0, recency: float = 0.0,
                 balance: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean",
                 stats: Optional[GradientStatistics] = None, *, validate: bool = True):
        super().__init__(num_classes, ignore_index, reduction, stats, validate=validate)
        self._set_hparams(tau=tau, eps=eps, indicator=indicator, source=source,
                          decay=decay, tau_warmup=tau_warmup, gamma=gamma, recency=recency,
                          balance=balance)
        self.num_channels = num_classes
        if self._own_sums():
            self.register_buffer("avg_pos", torch.zeros(num_classes, dtype=torch.float64))
            self.register_buffer("avg_neg", torch.zeros(num_classes, dtype=torch.float64))
        if self.indicator == "mass":
            self.register_buffer("mass", torch.zeros(num_classes, dtype=torch.float64))

    def _own_sums(self) -> bool:
        """Whether the loss keeps its own (decaying or weighted) sums of ``pos`` and ``neg``
        (``avg_pos``, ``avg_neg``), which ``I`` is then read from (except for ``mass``,
        which has its own buffer)."""
        return self.decay < 1 or (self.recency > 0 and self.indicator != "mass")

    def indicator_values(self) -> torch.Tensor:
        """``[C]`` the indicator ``I`` in force (from the cumulative, decaying or weighted
        sums)."""
        if self.indicator == "mass":
            return self.mass
        if self._own_sums():
            return eql_indicator(self.avg_pos, self.avg_neg, self.indicator)
        return eql_indicator(self.stats.pos_grad, self.stats.neg_grad, self.indicator)

    def current_tau(self) -> torch.Tensor:
        """``tau_t`` (a 0-d tensor on the statistics' device; no host synchronisation)."""
        tau = torch.as_tensor(self.tau, dtype=torch.float64, device=self.stats.pos_grad.device)
        if self.tau_warmup:
            ramp = self.stats.num_updates.to(torch.float64) / self.tau_warmup
            tau = tau * ramp.clamp(max=1.0)
        return tau

    def adjustment(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``[C]`` per-class logit offsets ``a_j = tau_t log(max(I_j, eps))`` in ``dtype``
        (the forward pass uses the logits' compute dtype, as the paper's loss does)."""
        log_i = torch.log(self.indicator_values().to(dtype).clamp(min=self.eps))
        if self.tau == 1 and not self.tau_warmup:
            return log_i  # the same bits as SoftmaxEQLLoss
        return (self.current_tau().to(dtype) * log_i).to(dtype)

    def logit_scale(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``[C]`` per-class logit scales ``s_j = (max(I_j, eps) / max_k max(I_k, eps))^gamma``
        in ``dtype`` (all ones while the indicator is flat, e.g. before the first update)."""
        ind = self.indicator_values().to(dtype).clamp(min=self.eps)
        return (ind / ind.max()).pow(self.gamma)

    def class_weights(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``[C]`` row weights ``w_j = pi_j^-balance / sum_k pi_k^(1 - balance)``, ``pi`` the
        indicator normalised to sum to 1 (all ones while it is flat, and for balance 0)."""
        ind = self.indicator_values().to(dtype).clamp(min=self.eps)
        prior = ind / ind.sum()
        weight = prior.pow(-self.balance)
        return weight / (prior * weight).sum()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._check_state_device(logits)
        update = self.updates_state
        targets, all_valid = _check_softmax_inputs(logits, targets, self.num_channels,
                                                   "Softmax-EQL variant", self.ignore_index,
                                                   self.reduction, self.validate)
        dtype = compute_dtype(logits)
        a = self.adjustment(dtype)
        scaled = logits
        if self.gamma:
            shape = (1, -1) + (1,) * (logits.dim() - 2)
            scaled = logits.to(dtype) * self.logit_scale(dtype).view(shape)
        own = update and self.source == "adjusted"
        reduction = "none" if self.balance else self.reduction
        res = _adjusted_cross_entropy(scaled, targets, a, self.ignore_index, reduction,
                                      want_stats=own, all_valid=all_valid)
        loss, scale = res.loss, res.scale
        if self.balance:  # weigh each row's loss; the statistics stay unweighted
            valid = None if all_valid else targets != self.ignore_index
            col = targets if valid is None else targets.masked_fill(~valid, 0)
            weight = self.class_weights(dtype)[col]
            if valid is not None:
                weight = weight * valid
            normalizer = targets.numel() if valid is None else valid.sum().clamp(min=1)
            scale = scale_of(self.reduction, normalizer)
            loss = loss * weight
            if self.reduction != "none":
                loss = loss.sum() * scale
        if update:
            if own:
                pos, neg = res.pos_inc * scale, res.neg_inc * scale
            else:
                pos, neg = raw_softmax_increments(logits, targets, self.ignore_index,
                                                  self.reduction, all_valid)
            # the loss's own per-class sums ride in the statistics' one all-reduce and come
            # back summed over the processes, zeroed if the step is skipped
            sums = []  # (buffer, this step's increment)
            if self._own_sums():
                sums += [(self.avg_pos, pos), (self.avg_neg, neg)]
            if self.indicator == "mass":
                counts = _valid_counts(targets, self.ignore_index, self.reduction,
                                       self.num_classes, pos.dtype)
                sums.append((self.mass, neg + counts - pos))  # sum_n p_nj
            extra = (torch.stack([inc for _, inc in sums]).to(self.stats.pos_grad.dtype)
                     if sums else None)
            applied = self.stats.update(pos, neg, warn=self.validate, extra=extra)
            if sums:
                with torch.no_grad():  # a skipped step does not decay either
                    if self.recency:  # t ** recency, t this update's 1-based number
                        extra = extra * (self.stats.num_updates.to(extra.dtype)
                                         .pow(self.recency))
                    for (buf, _), inc in zip(sums, extra):
                        buf.copy_(torch.where(applied, self.decay * buf + inc, buf))
        return loss

    def class_terms(self) -> Dict[str, torch.Tensor]:
        terms = {"indicator": self.indicator_values(), "margin": self.adjustment()}
        if self.gamma:
            terms["scale"] = self.logit_scale()
        if self.balance:
            terms["weight"] = self.class_weights()
        return terms
