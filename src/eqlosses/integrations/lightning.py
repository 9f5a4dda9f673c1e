"""Lightning: a callback for the gradient statistics and a metric for accuracy by frequency.

* :class:`GradientStatisticsCallback` finds every loss with statistics in the
  ``LightningModule`` (a submodule with a ``.stats`` that is a
  :class:`~eqlosses.GradientStatistics`: the gradient-driven losses, and the baselines built
  with ``track_statistics=True``), logs its mean gradient ratio per frequency group
  (:func:`eqlosses.monitor.diagnosis.group_ratios`: many / medium / few by default) to every
  logger the ``Trainer`` has, and writes the package's statistics file (``stats.bin``, read
  by :func:`eqlosses.monitor.read_stats` and plotted by :mod:`eqlosses.monitor.plots`).
* :class:`FrequencyGroupAccuracy` is a ``torchmetrics.Metric``: per-class correct and total
  counts (its whole state, declared once and summed across processes by torchmetrics), and
  the mean per-class accuracy of each frequency group.

Keep the loss a submodule of the ``LightningModule`` (``self.criterion = SoftmaxEQLLoss(C)``):
its statistics are then in Lightning's checkpoint, restored on resume
(``trainer.fit(..., ckpt_path=...)``), moved with the module and switched on and off by
``train()`` / ``eval()``. With the DDP strategy every process holds the same statistics (one
all-reduce per training forward), so the callback reads and writes on rank 0 only.

Install with ``pip install "eqlosses[lightning]"`` (Lightning and torchmetrics);
``examples/lightning_fmnist_lt.py`` trains a LightningModule on the embedded long-tailed
Fashion-MNIST with both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the standalone pytorch_lightning package
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as err:
        raise ImportError("eqlosses.integrations.lightning needs Lightning and torchmetrics: "
                          "pip install 'eqlosses[lightning]'") from err
try:
    from torchmetrics import Metric
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("eqlosses.integrations.lightning needs torchmetrics: "
                      "pip install 'eqlosses[lightning]'") from err

from ..data.frequency import FrequencyGroups, head_to_tail, many_medium_few_groups
from ..monitor.recorder import STATS_FILE, StatsRecorder, truncate_stats
from ..stats import GradientStatistics

__all__ = ["GradientStatisticsCallback", "FrequencyGroupAccuracy", "losses_with_statistics"]


def losses_with_statistics(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, loss)`` for every submodule of ``module`` (itself included) that has a
    ``.stats`` attribute holding a :class:`~eqlosses.GradientStatistics`, in registration
    order; losses sharing one statistics object are listed once (the first).

    >>> from eqlosses import SoftmaxEQLLoss
    >>> model = nn.Module()
    >>> model.net, model.criterion = nn.Linear(4, 3), SoftmaxEQLLoss(3)
    >>> [name for name, _ in losses_with_statistics(model)]
    ['criterion']
    """
    found: List[Tuple[str, nn.Module]] = []
    seen = set()
    for name, sub in module.named_modules():
        stats = getattr(sub, "stats", None)
        if isinstance(stats, GradientStatistics) and id(stats) not in seen:
            seen.add(id(stats))
            found.append((name, sub))
    return found


def _counts_tensor(class_counts: Any) -> torch.Tensor:
    counts = torch.as_tensor(class_counts)
    if counts.dim() != 1 or counts.numel() == 0 or counts.is_complex() \
            or counts.dtype == torch.bool:
        raise ValueError(f"class_counts must be the training samples of each class, a 1-d "
                         f"sequence of C numbers; got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("class_counts must be >= 0")
    return counts.to(torch.float64)


class GradientStatisticsCallback(pl.Callback):
    """Log the per-group gradient ratios of the module's losses and write ``stats.bin``.

    Every ``every_n_steps`` optimizer steps (and at the end of training), for every loss with
    statistics of the ``LightningModule`` (:func:`losses_with_statistics`), the callback

    * logs ``group_ratios(loss.stats, class_counts, groups)`` to each of ``trainer.loggers``
      as ``grad_ratio/<group>`` (``grad_ratio/<loss name>/<group>`` when the module has
      several such losses), at ``step = trainer.global_step``. The value of a group is the
      mean over its classes of the gradient ratio ``g_j = P_j / N_j`` (accumulated positive
      over negative gradient magnitude), the quantity the paper's figure 1 plots (its
      evolution shows a plain loss suppressing the rare classes; see the guide "How to read
      the gradient ratio");
    * appends a snapshot (pos_grad, neg_grad, ratio and the loss's class terms) to the
      statistics file ``<dirpath>/stats.bin`` (``stats_<loss name>.bin`` for several losses),
      the same file the package's own training writes
      (:class:`eqlosses.monitor.StatsRecorder`; read it with
      :func:`eqlosses.monitor.read_stats`). When training resumes from a checkpoint, the
      records after the checkpoint's step are forgotten first.

    Only rank 0 logs and writes (the statistics are identical on every rank); reading them
    synchronises the device with the host once per logged step.

    Args:
        class_counts: training samples per class ``[C]`` (the groups are made from them).
        groups: a :class:`~eqlosses.data.frequency.FrequencyGroups`; default
            ``many_medium_few_groups(class_counts)`` (few < 20 <= medium <= 100 < many).
        every_n_steps: log every this many optimizer steps; default the trainer's
            ``log_every_n_steps``.
        stats_file: the statistics file's name, or None to write none.
        dirpath: the directory of the statistics file; default the trainer's ``log_dir``
            (e.g. ``lightning_logs/version_0``), else its ``default_root_dir``.

    Raises:
        ValueError: when training starts, if the module holds no loss with statistics, or
            one built for another number of classes than ``class_counts`` has.

    Example:
        See ``examples/lightning_fmnist_lt.py`` for a whole run::

            counts = torch.bincount(train_labels, minlength=10)
            trainer = L.Trainer(max_epochs=5, logger=CSVLogger("logs"),
                                callbacks=[GradientStatisticsCallback(counts)])
            trainer.fit(module, train_loader)   # module.criterion = SoftmaxEQLLoss(10)
    """

    def __init__(self, class_counts: Any, groups: Optional[FrequencyGroups] = None,
                 every_n_steps: Optional[int] = None, stats_file: Optional[str] = STATS_FILE,
                 dirpath: Optional[Union[str, Path]] = None) -> None:
        super().__init__()
        self.class_counts = _counts_tensor(class_counts)
        self.groups = groups if groups is not None else many_medium_few_groups(
            self.class_counts)
        if not isinstance(self.groups, FrequencyGroups):
            raise ValueError(f"groups must be a FrequencyGroups (eqlosses.data.frequency), got "
                             f"{type(self.groups).__name__}")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or
                                          isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.stats_file = stats_file
        self.dirpath = None if dirpath is None else Path(dirpath)
        self._losses: List[Tuple[str, nn.Module]] = []
        self._recorders: Dict[str, StatsRecorder] = {}
        self._last_step = -1

    # -- setup --------------------------------------------------------------------------------

    def _find_losses(self, pl_module: nn.Module) -> List[Tuple[str, nn.Module]]:
        losses = losses_with_statistics(pl_module)
        if not losses:
            raise ValueError(
                "GradientStatisticsCallback found no loss with statistics in the "
                "LightningModule: register the loss as a submodule (self.criterion = "
                "SoftmaxEQLLoss(C)); a baseline (cross-entropy, balanced softmax, BCE, focal) "
                "records statistics when built with track_statistics=True")
        c = self.class_counts.numel()
        for name, loss in losses:
            if loss.stats.num_classes != c:
                raise ValueError(f"loss {name!r} keeps statistics for {loss.stats.num_classes} "
                                 f"classes, class_counts has {c}")
        return losses

    def _directory(self, trainer: "pl.Trainer") -> Path:
        if self.dirpath is not None:
            return self.dirpath
        log_dir = getattr(trainer, "log_dir", None)
        return Path(log_dir if log_dir is not None else trainer.default_root_dir)

    def _file_name(self, name: str) -> str:
        assert self.stats_file is not None
        if len(self._losses) == 1:
            return self.stats_file
        stem, dot, suffix = self.stats_file.rpartition(".")
        return f"{stem}_{name}.{suffix}" if dot else f"{self.stats_file}_{name}"

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._losses = self._find_losses(pl_module)
        self._recorders = {}
        self._last_step = trainer.global_step
        if self.stats_file is None:
            return
        directory = self._directory(trainer)  # on every rank: trainer.log_dir broadcasts
        if not trainer.is_global_zero:
            return
        for name, loss in self._losses:
            path = directory / self._file_name(name)
            truncate_stats(path, trainer.global_step)  # a resumed run: forget later records
            self._recorders[name] = StatsRecorder(path, loss)

    # -- logging ------------------------------------------------------------------------------

    def ratios(self) -> Dict[str, float]:
        """The metrics logged now: ``grad_ratio/<group>`` (or ``grad_ratio/<loss>/<group>``)
        -> mean gradient ratio of the group. Empty before training starts."""
        from ..monitor.diagnosis import group_ratios

        out: Dict[str, float] = {}
        several = len(self._losses) > 1
        for name, loss in self._losses:
            prefix = f"grad_ratio/{name}/" if several else "grad_ratio/"
            ratios = group_ratios(loss.stats, self.class_counts, self.groups)
            out.update({prefix + group: float(value) for group, value in ratios.items()})
        return out

    def _log(self, trainer: "pl.Trainer") -> None:
        step = int(trainer.global_step)
        if step == self._last_step:
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        metrics = self.ratios()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for recorder in self._recorders.values():
            recorder.record(step, int(trainer.current_epoch), force=True)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.every_n_steps or max(1, int(trainer.log_every_n_steps))
        step = int(trainer.global_step)
        if step > 0 and step % every == 0:
            self._log(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step > 0:
            self._log(trainer)
        for logger in trainer.loggers if trainer.is_global_zero else ():
            logger.save()


class FrequencyGroupAccuracy(Metric):
    """Accuracy by frequency group: the mean per-class accuracy of each group's classes.

    With ``correct_j`` and ``total_j`` the correctly predicted and the seen samples of class
    ``j`` (the metric's whole state, two ``[C]`` int64 tensors summed across processes by
    torchmetrics), ``acc_j = correct_j / total_j`` and, for a group ``G``,

        acc_G = mean over the classes j in G with total_j > 0 of acc_j

    (NaN when no class of the group was seen). :meth:`compute` returns a dict: one entry per
    group (``many``, ``medium``, ``few`` by default, head to tail), ``balanced`` (the mean
    ``acc_j`` over the seen classes) and ``top1`` (``sum correct / sum total``), as the
    package's :class:`~eqlosses.metrics.ClassificationMetrics` computes them.

    Args:
        class_counts: training samples per class ``[C]`` (the groups are made from them).
        groups: a :class:`~eqlosses.data.frequency.FrequencyGroups`; default
            ``many_medium_few_groups(class_counts)``.
        ignore_index: target value of samples that count nowhere.
        **kwargs: torchmetrics' ``Metric`` options (``sync_on_compute``, ``dist_sync_fn``...).

    Example:
        >>> metric = FrequencyGroupAccuracy([500, 50, 5])   # many, medium, few
        >>> metric.update(torch.tensor([[2.0, 0.1, 0.0], [0.0, 3.0, 0.0], [0.0, 2.0, 1.0],
        ...                             [0.0, 0.0, 1.0]]), torch.tensor([0, 1, 2, 2]))
        >>> {k: round(float(v), 3) for k, v in metric.compute().items()}
        {'many': 1.0, 'medium': 1.0, 'few': 0.5, 'balanced': 0.833, 'top1': 0.75}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, class_counts: Any, groups: Optional[FrequencyGroups] = None,
                 ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        counts = _counts_tensor(class_counts)
        groups = groups if groups is not None else many_medium_few_groups(counts)
        if not isinstance(groups, FrequencyGroups):
            raise ValueError(f"groups must be a FrequencyGroups (eqlosses.data.frequency), got "
                             f"{type(groups).__name__}")
        self.num_classes = int(counts.numel())
        self.ignore_index = int(ignore_index)
        self.group_names: Tuple[str, ...] = tuple(head_to_tail(groups.names))
        for name, mask in groups.masks.items():
            if tuple(mask.shape) != (self.num_classes,):
                raise ValueError(f"group {name!r} has a class mask of shape "
                                 f"{tuple(mask.shape)}, expected ({self.num_classes},)")
        # the masks follow the metric's device; they are configuration, not state
        self.register_buffer("group_masks", torch.stack(
            [torch.as_tensor(groups.masks[n], dtype=torch.bool) for n in self.group_names]),
            persistent=False)
        self.add_state("correct", default=torch.zeros(self.num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(self.num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        """Count a batch: ``preds`` are ``[N, C]`` logits or scores (the top one is the
        prediction) or ``[N]`` predicted classes; ``target`` ``[N]`` int64 classes."""
        if target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"target must be [N] integer class indices, got "
                             f"{tuple(target.shape)} {target.dtype}")
        if preds.dim() == 2 and preds.shape == (target.shape[0], self.num_classes):
            predicted = preds.argmax(dim=1)
        elif preds.shape == target.shape and not preds.is_floating_point():
            predicted = preds
        else:
            raise ValueError(f"preds must be [N, {self.num_classes}] scores or [N] classes for "
                             f"{tuple(target.shape)} targets, got shape {tuple(preds.shape)}")
        keep = target != self.ignore_index
        target, predicted = target[keep].long(), predicted[keep].long()
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise ValueError(f"targets must be in [0, {self.num_classes}) or ignore_index="
                             f"{self.ignore_index}, got values in [{int(target.min())}, "
                             f"{int(target.max())}]")
        c = self.num_classes
        self.total += torch.bincount(target, minlength=c)
        self.correct += torch.bincount(target[predicted == target], minlength=c)

    def compute(self) -> Dict[str, torch.Tensor]:  # type: ignore[override]
        """``{group: accuracy, ..., "balanced": ..., "top1": ...}`` (float tensors)."""
        total = self.total.double()
        seen = total > 0
        acc = torch.where(seen, self.correct.double() / total.clamp(min=1),
                          torch.full_like(total, math.nan))
        nan = torch.tensor(math.nan, dtype=torch.float64, device=total.device)
        out: Dict[str, torch.Tensor] = {}
        for name, mask in zip(self.group_names, self.group_masks):
            sel = mask & seen
            out[name] = acc[sel].mean() if bool(sel.any()) else nan
        out["balanced"] = acc[seen].mean() if bool(seen.any()) else nan
        out["top1"] = self.correct.sum().double() / total.sum() if bool(seen.any()) else nan
        return {k: v.float() for k, v in out.items()}
