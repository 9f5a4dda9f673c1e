"""Seesaw loss, with its class counts synchronised across processes."""

from __future__ import annotations

import torch

from ..distributed import all_reduce_sum_
from ..functional._common import check_device, check_logits, check_normalizer, check_targets
from ..functional.softmax import _seesaw
from ..stats import apply_keeping_dtype
from .base import LongTailLoss
from .contract import LossTraits, Param


class SeesawLoss(LongTailLoss):
    """Seesaw loss (Wang et al., CVPR 2021) with an objectness branch, as in mmdetection.

        S_ij = M_ij C_ij,  M_ij = (N_j / N_i)^p if N_j < N_i,  C_ij = (s_j / s_i)^q if s_j > s_i
        class term:      sum over foreground rows of CE(z_cls + log S (1 - y), y)
        objectness term: sum over all rows of CE(z_obj, [fg, bg])
        loss = (class term + objectness term) / normalizer   (default: non-ignored rows)

    Logits ``[N, C + 2]``: C class logits, then objectness ``[fg, bg]``; targets ``[N]`` in
    ``[0, C]`` (``C`` = background) or ``ignore_index``. The cumulative counts ``cum_samples``
    (``[C + 1]``, background last) are a persistent buffer, updated with the current batch
    before the loss is computed (as the reference does) in training mode only.

    Deviation from the reference: the count increments are all-reduced (one collective per
    training forward), so every process uses the same counts; mmdetection counts per process.
    The reference's ``avg_factor + float32 eps`` denominator is the plain normaliser here.
    ``validate=False`` skips the check of the target values: no host synchronisation (the
    class term is then computed on every row with the non-foreground ones masked, instead of
    on the selected foreground rows), and ``torch.compile(fullgraph=True)`` works.
    Test-time scores: ``softmax(z_cls) * softmax(z_obj)[fg]``.

    Example:
        >>> crit = SeesawLoss(num_classes=2)
        >>> crit(torch.zeros(2, crit.num_channels), torch.tensor([0, 2]))
        tensor(1.0397)
        >>> crit.cum_samples
        tensor([1., 0., 1.], dtype=torch.float64)
    """

    traits = LossTraits(
        activation="softmax", backgrounds={"two_columns": {}}, heads=("roi",),
        params={"p": Param(float, low=0), "q": Param(float, low=0),
                "eps": Param(float, low=0, low_open=True)},
        normalizer=True)

    def __init__(self, num_classes: int, p: float = 0.8, q: float = 2.0, eps: float = 1e-2,
                 ignore_index: int = -100, *, validate: bool = True):
        super().__init__(num_classes, ignore_index, "mean", validate=validate)
        self._set_hparams(p=p, q=q, eps=eps)
        self.num_channels = num_classes + 2
        self.register_buffer("cum_samples", torch.zeros(num_classes + 1, dtype=torch.float64))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
        check_device(self.cum_samples, logits, "SeesawLoss")
        check_logits(logits, self.num_channels,
                     "Seesaw (C class columns + 2 objectness columns)")
        checked = check_targets(targets, logits, self.num_classes, self.ignore_index, "Seesaw",
                                self.validate)
        check_normalizer(normalizer, self.validate)  # before the counts change
        if self.updates_state:  # per-class counts of the batch, without reading it on the host
            t = checked.values.reshape(-1)
            counted = (t != self.ignore_index).to(self.cum_samples.dtype)
            inc = torch.zeros_like(self.cum_samples).index_add_(
                0, t.clamp(0, self.num_classes), counted)
            self.cum_samples += all_reduce_sum_(inc)
        return _seesaw(logits, targets, self.cum_samples[: self.num_classes], self.p, self.q,
                       self.eps, normalizer, self.ignore_index, self.validate,
                       checked=checked)[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "cum_samples"
        if key in state_dict and state_dict[key].shape != self.cum_samples.shape:
            raise ValueError(f"checkpoint '{key}' has shape {tuple(state_dict[key].shape)}, "
                             f"but this loss was built for num_classes={self.num_classes} "
                             f"(expected ({self.num_classes + 1},))")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):  # keep the float64 counts through model.half()
        apply_keeping_dtype(self, fn)
        return self

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` class scores ``softmax(z_cls) * softmax(z_obj)[:, fg]``."""
        cls = torch.softmax(logits[:, : self.num_classes], dim=1)
        obj = torch.softmax(logits[:, self.num_classes :], dim=1)
        return cls * obj[:, :1]
