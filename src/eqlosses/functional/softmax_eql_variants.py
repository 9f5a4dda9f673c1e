"""Building blocks of the Softmax-EQL variants (:class:`~eqlosses.losses.SoftmaxEQLVariantLoss`):
the indicator read off accumulated gradient statistics, and gradient statistics of the
*unadjusted* logits.

The paper's Softmax-EQL accumulates ``|d CE(z~, y) / d z|`` with ``z~`` the adjusted logits
(``softmax(z~) - y``). Its variants here may instead accumulate the gradient of plain
cross-entropy at the raw logits, ``softmax(z) - y``: the magnitude a class would receive if
no margin were applied, which does not grow with the margin that the statistics themselves set.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .softmax import _adjusted_cross_entropy

__all__ = ["INDICATORS", "eql_indicator", "raw_softmax_increments"]

#: indicators a variant can read off the statistics
INDICATORS = ("pos", "neg", "ratio")


def eql_indicator(pos: torch.Tensor, neg: torch.Tensor, kind: str = "pos") -> torch.Tensor:
    """The per-class indicator ``I`` whose log sets Softmax-EQL's margins.

    ``"pos"``: ``I_j = P_j`` (the paper's); ``"neg"``: ``I_j = Nn_j``; ``"ratio"``:
    ``I_j = P_j / Nn_j`` (the accumulated gradient ratio of EQL v2, 0 where ``Nn_j = 0``).

    >>> eql_indicator(torch.tensor([2.0, 1.0]), torch.tensor([4.0, 0.0]), "ratio")
    tensor([0.5000, 0.0000])
    """
    if kind == "pos":
        return pos
    if kind == "neg":
        return neg
    if kind == "ratio":
        return torch.where(neg > 0, pos / neg.clamp(min=torch.finfo(neg.dtype).tiny),
                           torch.zeros_like(pos))
    raise ValueError(f"indicator must be one of {', '.join(INDICATORS)}, got {kind!r}")


def raw_softmax_increments(logits: torch.Tensor, targets: torch.Tensor,
                           ignore_index: int = -100, reduction: str = "mean",
                           all_valid: Optional[bool] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class positive and negative gradient magnitudes of plain cross-entropy at the raw
    logits, ``|softmax(z) - y|`` summed over rows, divided by the number of non-ignored rows
    for ``reduction="mean"`` (as the loss's own statistics are).

        pos_j = sum_{n: y_n = j} (1 - p_nj),   neg_j = sum_{n: y_n != j} p_nj,   p = softmax(z)

    ``logits [N, C, *]`` (detached here), ``targets [N, *]`` already checked (``all_valid``
    from :func:`~eqlosses.functional._common.check_targets`, or None to mask ignored rows).

    >>> pos, neg = raw_softmax_increments(torch.zeros(2, 2), torch.tensor([0, 0]))
    >>> pos.tolist(), neg.tolist()
    ([0.5, 0.0], [0.0, 0.5])
    """
    res = _adjusted_cross_entropy(logits.detach(), targets, None, ignore_index, reduction,
                                  want_stats=True, all_valid=all_valid)
    return res.pos_inc * res.scale, res.neg_inc * res.scale
