"""Gradient diagnosis for any loss: the per-class gradient ratio, summarised by frequency group.

The equalization losses start from one observation: under the plain loss, the tail classes'
accumulated positive gradient ``P_j`` is far smaller than their accumulated negative gradient
``N_j`` (their ratio ``g_j = P_j / N_j`` is far below 1), while the head classes' ratio is
near 1. This module measures that on anyone's training:

* :func:`group_ratios` summarises accumulated statistics (a
  :class:`~eqlosses.GradientStatistics`, a loss that keeps one as ``.stats``, or a recorded
  snapshot) by frequency group (many/medium/few, or LVIS's rare/common/frequent);
* :class:`GradientMonitor` accumulates the statistics of the plain softmax cross-entropy or
  sigmoid BCE from the logits and targets of a user's own loop, in closed form (no hooks, no
  autograd), with the same one all-reduce per update as the losses.

The baseline losses record the same statistics with ``track_statistics=True`` (on in the
package's pipelines), so that a run with cross-entropy can be compared with one with
Softmax-EQL (:func:`eqlosses.monitor.plot_ratio_evolution_runs`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from ..data.frequency import FrequencyGroups, head_to_tail, lvis_groups, many_medium_few_groups
from ..functional.gradients import bce_gradients, cross_entropy_gradients
from ..stats import GradientStatistics

__all__ = ["group_ratios", "class_ratios", "GradientMonitor", "RATIO_EPS"]

#: the ``eps`` of :meth:`GradientStatistics.ratio`, the ratio the recorder and figures show
RATIO_EPS = 1e-10

GroupsSpec = Union[None, str, FrequencyGroups]


def _pos_neg(stats: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, N)`` as float64 CPU tensors from statistics, a loss with ``.stats`` or a record."""
    if isinstance(stats, nn.Module) and not isinstance(stats, GradientStatistics):
        inner = getattr(stats, "stats", None)
        if not isinstance(inner, GradientStatistics):
            raise ValueError(f"{type(stats).__name__} keeps no gradient statistics (no `.stats` "
                             f"GradientStatistics); build a baseline loss with "
                             f"track_statistics=True, or use a GradientMonitor")
        stats = inner
    if isinstance(stats, GradientStatistics):
        pos, neg = stats.pos_grad, stats.neg_grad
    elif isinstance(stats, Mapping) and "pos_grad" in stats and "neg_grad" in stats:
        pos, neg = stats["pos_grad"], stats["neg_grad"]
        if pos is None or neg is None:
            raise ValueError("the record has no pos_grad/neg_grad (a loss without statistics, "
                             "or not read: read_stats(..., fields=['pos_grad', 'neg_grad']))")
    else:
        raise ValueError(f"stats must be a GradientStatistics, a loss with `.stats`, or a "
                         f"statistics record (a dict with 'pos_grad' and 'neg_grad'), got "
                         f"{type(stats).__name__}")
    pos = torch.as_tensor(pos).detach().to("cpu", torch.float64).reshape(-1)
    neg = torch.as_tensor(neg).detach().to("cpu", torch.float64).reshape(-1)
    if pos.shape != neg.shape:
        raise ValueError(f"pos_grad and neg_grad differ in shape: {tuple(pos.shape)} and "
                         f"{tuple(neg.shape)}")
    return pos, neg


def class_ratios(stats: Any) -> torch.Tensor:
    """The per-class gradient ratio ``g_j = P_j / (N_j + 1e-10)`` (float64, on the CPU), with
    NaN where it is undefined (``N_j = 0``: the class has received no negative gradient).

    These are the values :class:`~eqlosses.monitor.StatsRecorder` records as ``ratio`` for a
    loss without a ratio term of its own (and the figures draw), except that the recorder
    writes 1 for a class that has received no gradient at all.

    >>> class_ratios({"pos_grad": [2.0, 1.0, 0.0], "neg_grad": [4.0, 0.0, 0.0]})
    tensor([0.5000,    nan,    nan], dtype=torch.float64)
    """
    pos, neg = _pos_neg(stats)
    ratio = pos / (neg + RATIO_EPS)
    return torch.where(neg > 0, ratio, torch.full_like(ratio, math.nan))


def _groups(counts: torch.Tensor, groups: GroupsSpec) -> FrequencyGroups:
    if isinstance(groups, FrequencyGroups):
        return groups
    if groups is None or groups == "many_medium_few":
        return many_medium_few_groups(counts)
    if groups == "lvis":
        return lvis_groups(counts)
    raise ValueError(f"groups must be None, 'many_medium_few', 'lvis' or a FrequencyGroups, got "
                     f"{groups!r}")


def group_ratios(stats: Any, counts: Any, groups: GroupsSpec = None) -> Dict[str, float]:
    """The mean gradient ratio of each frequency group, from the most to the least frequent.

        ratio(G) = mean over classes j in G with N_j > 0 of  P_j / (N_j + 1e-10)

    ``P_j`` / ``N_j`` are the accumulated positive / negative gradient magnitudes; the per-class
    ratio is the one the recorder stores and the figures draw (:func:`class_ratios`). A class
    that has received no negative gradient yet (``N_j = 0``; before the first update, or a
    class never trained as a negative) has no ratio and is left out of its group's mean; a
    group none of whose classes has one is NaN. Groups with no class are left out of the dict.
    A ratio near 1 means balanced training; the tail groups of a plain loss sit far below.

    Args:
        stats: a :class:`~eqlosses.GradientStatistics`, a loss (or :class:`GradientMonitor`)
            that keeps one as ``.stats``, or a statistics record (a dict with ``pos_grad``
            and ``neg_grad``, e.g. from :func:`eqlosses.monitor.latest_stats`).
        counts: ``[C]`` training counts per class (samples for classification, images
            containing the class for detection), which define the groups.
        groups: ``None`` or ``"many_medium_few"`` (ImageNet-LT: few < 20, many > 100
            samples), ``"lvis"`` (rare <= 10, common <= 100 images), or a
            :class:`~eqlosses.data.frequency.FrequencyGroups` of the ``C`` classes.

    Returns:
        group name -> mean ratio (a float, NaN when undefined).

    Example:
        >>> from eqlosses import GradientStatistics
        >>> stats = GradientStatistics(4)
        >>> _ = stats.update(torch.tensor([4.0, 3.0, 1.0, 0.2]), torch.tensor([4.0, 5.0, 5.0, 2.0]))
        >>> ratios = group_ratios(stats, counts=[500, 150, 50, 5])  # many: (4/4 + 3/5) / 2
        >>> {name: round(value, 4) for name, value in ratios.items()}
        {'many': 0.8, 'medium': 0.2, 'few': 0.1}
    """
    ratios = class_ratios(stats)
    counts_t = torch.as_tensor(counts)
    if counts_t.dim() != 1 or counts_t.numel() != ratios.numel():
        raise ValueError(f"counts must be a [C] vector with one count per class of the "
                         f"statistics (C = {ratios.numel()}), got shape {tuple(counts_t.shape)}")
    partition = _groups(counts_t, groups)
    out: Dict[str, float] = {}
    for name in head_to_tail(partition.names):
        mask = torch.as_tensor(partition.masks[name]).reshape(-1).bool().cpu()
        if mask.numel() != ratios.numel():
            raise ValueError(f"group {name!r} has a mask of {mask.numel()} classes, the "
                             f"statistics have {ratios.numel()}")
        if not bool(mask.any()):
            continue
        values = ratios[mask]
        values = values[~torch.isnan(values)]
        out[name] = float(values.mean()) if values.numel() else math.nan
    return out


class GradientMonitor(nn.Module):
    """Accumulate the per-class gradient statistics of a plain loss from logits and targets.

    Call :meth:`update` with the logits and targets of each training step (every process, on
    every step, as for :meth:`GradientStatistics.update`: one all-reduce). The statistics are
    those of the gradient of the *plain* loss with respect to the logits, in closed form, no
    hooks and no autograd:

    * ``activation="softmax"``: cross-entropy (mean over rows), ``pos_j += sum_{y_n = j}
      (1 - p_nj) / N`` and ``neg_j += sum_{y_n != j} p_nj / N`` with ``p = softmax(z)``;
    * ``activation="sigmoid"``: BCE, the same with ``p = sigmoid(z)``, target ``C`` a
      background row (a negative for every class).

    When you train with cross-entropy (or BCE), they are exactly your loss's gradient: the
    paper's diagnosis of your training. With another loss, they say how far the *plain* loss
    would be from balanced at your model's current logits. Nothing here changes training.

    The monitor is an ``nn.Module``: its statistics are buffers (``state_dict``, ``.to``), and
    it is "a loss with statistics" for :class:`~eqlosses.monitor.StatsRecorder`, the figures
    (:meth:`record` feeds :func:`~eqlosses.monitor.plot_gradient_ratio`) and
    :func:`group_ratios` (:meth:`summary`).

    Args:
        num_classes: the classes ``C``.
        activation: ``"softmax"`` or ``"sigmoid"``.
        background: softmax only: the logits have a background column (``C + 1`` channels,
            target ``C``), which is trained but not recorded.
        ignore_index: target of rows (pixels) that count nowhere.
        validate: check target values (host synchronisations); ``False`` reads nothing on the
            host, for the hot path.

    Example:
        >>> monitor = GradientMonitor(num_classes=3)
        >>> for step in range(2):  # in your loop, after `logits = model(x)`:
        ...     logits = torch.zeros(4, 3)  # a model that predicts p = 1/3 for every class
        ...     monitor.update(logits, torch.tensor([0, 0, 0, 1]))  # class 2 is never a target
        >>> monitor.stats.num_updates
        tensor(2)
        >>> monitor.ratio()  # (2/3) n_j / ((1/3) (4 - n_j)), n_j = rows of class j
        tensor([6.0000, 0.6667, 0.0000], dtype=torch.float64)
        >>> {k: round(v, 3) for k, v in monitor.summary(counts=[300, 100, 5]).items()}
        {'many': 6.0, 'medium': 0.667, 'few': 0.0}
    """

    def __init__(self, num_classes: int, activation: str = "softmax", *, background: bool = False,
                 ignore_index: int = -100, validate: bool = True) -> None:
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        if background and activation != "softmax":
            raise ValueError("background=True is for softmax logits with a background column; "
                             "sigmoid logits mark background rows with target num_classes")
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
        self.stats = GradientStatistics(num_classes)
        self.num_classes = num_classes
        self.activation = activation
        self.background = bool(background)
        self.ignore_index = ignore_index
        self.validate = bool(validate)
        #: logit channels expected
        self.num_channels = num_classes + 1 if background else num_classes

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, activation={self.activation!r}"
                + (", background=True" if self.background else "")
                + ("" if self.validate else ", validate=False"))

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the statistics of one step's ``logits`` (detached) and ``targets``.

        Softmax: logits ``[N, C']`` or ``[N, C', *]`` with targets ``[N]`` / ``[N, *]`` in
        ``[0, C')`` or ``ignore_index``, or probability targets of the logits' shape (mixup,
        label smoothing: the ``q``-weighted mixture of the one-hot rows' statistics, see
        :mod:`eqlosses.functional.soft_targets`). Sigmoid: logits ``[N, C]``, targets in
        ``[0, C]`` (``C`` = background row) or ``ignore_index``.
        """
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if logits.dim() < 2 or logits.shape[1] != self.num_channels:
            raise ValueError(f"GradientMonitor({self.extra_repr()}) expects logits with "
                             f"{self.num_channels} channels in dim 1, got shape "
                             f"{tuple(logits.shape)}")
        logits = logits.detach()
        if self.activation == "softmax":
            inc = cross_entropy_gradients(logits, targets, None, self.ignore_index, "mean",
                                          validate=self.validate)
        else:
            inc = bce_gradients(logits, targets, self.ignore_index, "mean",
                                validate=self.validate)
        c = self.num_classes
        self.stats.update(inc.pos[:c], inc.neg[:c], warn=self.validate)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Same as :meth:`update`."""
        self.update(logits, targets)

    def ratio(self) -> torch.Tensor:
        """Per-class ratios ``P_j / N_j`` (NaN where ``N_j = 0``), see :func:`class_ratios`."""
        return class_ratios(self.stats)

    def summary(self, counts: Any, groups: GroupsSpec = None) -> Dict[str, float]:
        """:func:`group_ratios` of the accumulated statistics."""
        return group_ratios(self.stats, counts, groups)

    def record(self, step: Optional[int] = None) -> Dict[str, Any]:
        """A statistics record (``step``, ``pos_grad``, ``neg_grad``, ``ratio`` as lists) for
        :func:`~eqlosses.monitor.plot_gradient_ratio`; ``step`` defaults to the number of
        updates. The ratio is the recorder's (1 for a class that has seen no gradient)."""
        stats = self.stats
        num_updates = int(stats.num_updates)
        return {"step": num_updates if step is None else int(step), "epoch": None,
                "num_updates": num_updates,
                "pos_grad": stats.pos_grad.detach().cpu().tolist(),
                "neg_grad": stats.neg_grad.detach().cpu().tolist(),
                "ratio": stats.ratio(init=1.0).detach().cpu().tolist(), "terms": {}}

    def reset(self) -> None:
        """Forget the accumulated statistics."""
        self.stats.reset()
