"""Accuracy metrics for long-tailed classification, from sum-states only.

All state is sums (a confusion matrix and top-k hit counts), so the metrics of several processes
combine exactly with one SUM all-reduce, and the result does not depend on how the test set was
split or batched.

With ``M`` the confusion matrix (``M[i, j]`` = test samples of true class ``i`` predicted as
``j``) and ``n_i = sum_j M[i, j]`` the test samples of class ``i``:

    top1                = sum_i M[i, i] / sum_i n_i
    acc_i               = M[i, i] / n_i                         (NaN when n_i = 0)
    balanced_accuracy   = mean of acc_i over the classes with n_i > 0
    acc_g               = mean of acc_i over the classes of group g with n_i > 0

``acc_g`` is what the long-tail literature reports as the many/medium/few (ImageNet-LT,
Places-LT, iNaturalist) or rare/common/frequent top-1 accuracy: the mean of the per-class
accuracies of the group's classes. On a class-balanced test set it equals the sample accuracy
restricted to the group.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..data.frequency import FrequencyGroups
from .confusion import ConfusionMatrixState

__all__ = ["ClassificationMetrics"]

Device = Union[torch.device, str]


class ClassificationMetrics(ConfusionMatrixState):
    """Confusion matrix and top-k accuracy of a ``num_classes``-way classifier.

    States (all int64 sums, declared on :class:`ConfusionMatrixState`, which also gives
    :meth:`reset`, :meth:`sync`, :meth:`state_dict` / :meth:`load_state_dict` and
    :meth:`to`): ``confusion`` ``[C, C]`` (rows = true class, columns = predicted class, the
    top-1 prediction) and ``topk_correct`` ``[K]`` (test samples whose true class is among the
    ``k`` highest scores, for each ``k`` in ``topk``). The sample count is the sum of the
    confusion matrix.

    Evaluation with several processes: each rank calls :meth:`update` on its shard (with
    ``valid`` marking the padded duplicate samples that a distributed sampler adds as False),
    then every rank calls :meth:`sync` once (ONE all-reduce of both states, packed), after
    which :meth:`compute` gives the same result on every rank, equal to one process evaluating
    the whole test set.

    Args:
        num_classes: number of classes ``C``.
        topk: the ``k`` of the top-k accuracies to keep. ``k = 1`` is always reported (it is
            the trace of the confusion matrix); a ``k > C`` is kept but not reported.
        device: device of the states. By default (None) the states follow the inputs of
            :meth:`update` (CPU until the first update). With the NCCL backend pass the rank's
            CUDA device, so that :meth:`sync` works also on a rank that saw no sample.

    Example:
        >>> m = ClassificationMetrics(3, topk=(1, 2))
        >>> scores = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.5, 0.1, 0.4]])
        >>> m.update(scores, torch.tensor([0, 1, 2]))
        >>> r = m.compute()
        >>> r["top1"], r["top2"], r["per_class_accuracy"]
        (0.6666666666666666, 1.0, [1.0, 1.0, 0.0])
        >>> r["confusion_matrix"]
        [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
        >>> m.state_names
        ['confusion', 'topk_correct']
    """

    def __init__(self, num_classes: int, topk: Sequence[int] = (1, 5), *,
                 device: Optional[Device] = None) -> None:
        super().__init__(num_classes, ignore_index=None, device=device)
        ks = tuple(topk)
        if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
            raise ValueError(f"topk must be a non-empty sequence of positive ints, got {topk!r}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"topk must not repeat a k, got {topk!r}")
        self.topk = ks
        self.add_state("topk_correct", torch.zeros(len(ks), dtype=torch.int64))

    def __repr__(self) -> str:
        return (f"ClassificationMetrics(num_classes={self.num_classes}, topk={self.topk}, "
                f"num_samples={self.num_samples})")

    @property
    def num_samples(self) -> int:
        """Number of test samples counted so far."""
        return int(self.confusion.sum())

    @torch.no_grad()
    def update(self, scores: torch.Tensor, targets: torch.Tensor,
               valid: Optional[torch.Tensor] = None) -> None:
        """Count one batch.

        Args:
            scores: ``[N, C]`` logits or class scores (any monotone transform of the logits
                gives the same counts); the prediction is the highest score.
            targets: ``[N]`` integer true classes in ``[0, C)``; rows with a target ``< 0``
                (an ignore label) are not counted.
            valid: optional ``[N]`` bool mask; rows where it is False are not counted (e.g. the
                duplicate samples a ``DistributedSampler`` pads the last shard with).
        """
        self._check_not_synced()
        if scores.dim() != 2 or scores.shape[1] != self.num_classes:
            raise ValueError(f"scores must have shape [N, {self.num_classes}], got "
                             f"{tuple(scores.shape)}")
        if targets.dim() != 1 or targets.shape[0] != scores.shape[0]:
            raise ValueError(f"targets must have shape [{scores.shape[0]}] (one per row of "
                             f"scores), got {tuple(targets.shape)}")
        kmax = min(max(self.topk), self.num_classes)
        ranked = scores.detach().topk(kmax, dim=1).indices  # [N, kmax], best first
        keep = self._count(ranked[:, 0], targets, valid)  # the confusion matrix (top-1)
        if not bool(keep.any()):
            return
        hits = ranked.to(self.device)[keep] == targets.to(self.device)[keep][:, None]
        for i, k in enumerate(self.topk):
            self.topk_correct[i] += hits[:, :k].any(dim=1).sum()

    def compute(self, groups: Optional[FrequencyGroups] = None) -> Dict[str, Any]:
        """The metrics as a JSON-serialisable dict (Python floats, ints and lists).

        Keys: ``top1``; ``top{k}`` for every other ``k`` of ``topk`` with ``k <= C`` (``top5``
        by default when ``C >= 5``); ``balanced_accuracy``; ``per_class_accuracy`` (``[C]``,
        NaN for a class without test samples); ``groups`` (group name -> mean per-class
        accuracy of the group's classes that have test samples, NaN if none; empty without
        ``groups``); ``group_bounds`` (group name -> ``[low, high]``, the training-count
        thresholds of ``groups``: ``low < count <= high``); ``confusion_matrix`` (list of
        lists); ``num_samples``. An accuracy over no sample at all is NaN (``json.dumps``
        writes it as ``NaN``).

        Args:
            groups: a partition of the classes by training frequency, e.g.
                ``many_medium_few_groups(train_counts)``.
        """
        c = self.num_classes
        conf = self.confusion.to("cpu", torch.float64)
        n_per_class = conf.sum(dim=1)
        total = float(n_per_class.sum())
        has = n_per_class > 0
        per_class = torch.where(has, conf.diagonal() / n_per_class.clamp(min=1),
                                torch.full_like(n_per_class, math.nan))
        nan = math.nan
        out: Dict[str, Any] = {"top1": float(conf.diagonal().sum()) / total if total else nan}
        for k, hit in zip(self.topk, self.topk_correct.tolist()):
            if k != 1 and k <= c:
                out[f"top{k}"] = hit / total if total else nan
        out["balanced_accuracy"] = float(per_class[has].mean()) if bool(has.any()) else nan
        out["per_class_accuracy"] = per_class.tolist()

        group_acc: Dict[str, float] = {}
        bounds: Dict[str, List[float]] = {}
        if groups is not None:
            for name, mask in groups.masks.items():
                mask = torch.as_tensor(mask, dtype=torch.bool).cpu()
                if mask.shape != (c,):
                    raise ValueError(f"group {name!r} has a class mask of shape "
                                     f"{tuple(mask.shape)}, expected ({c},) for {c} classes")
                sel = mask & has
                group_acc[name] = float(per_class[sel].mean()) if bool(sel.any()) else nan
            bounds = {name: [float(lo), float(hi)] for name, (lo, hi) in groups.bounds.items()}
        out["groups"] = group_acc
        out["group_bounds"] = bounds
        out["confusion_matrix"] = self.confusion.cpu().tolist()
        out["num_samples"] = int(total)
        return out
