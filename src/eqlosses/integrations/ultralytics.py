"""Ultralytics YOLO trained with the equalization losses (optional extra ``ultralytics``).

ultralytics is AGPL-3.0: this module imports it (lazily, inside the functions and classes
that need it) and copies none of its code.

What it offers:

* :class:`EQLDetectionLoss` - a drop-in for YOLO's detection criterion
  (``criterion(preds, batch) -> (loss, loss_items)``): the task-aligned assignment, the box
  (CIoU) and DFL terms are YOLO's own; only the classification term comes from eqlosses:
  ``eqfl`` (default), ``efl``, ``focal`` or ``bce``.
* :func:`build_criterion` - the criterion of a YOLO detection model, end-to-end heads
  (YOLO26: one-to-many and one-to-one branches) included.
* :class:`EQLDetectionTrainer` and :class:`EQLClassificationTrainer` - trainers for
  ``YOLO(...).train(trainer=...)``; :func:`detection_trainer` / :func:`classification_trainer`
  make one for a chosen loss and its arguments.
* :func:`offline_environment` - the environment that keeps ultralytics from reaching the
  network (no weights, fonts, assets, AMP check, hub or analytics calls).

Mapping YOLO's targets to the eqlosses conventions. YOLO's task-aligned assigner gives every
anchor a target row ``t`` of ``C`` soft scores: zero for background anchors, and for a
foreground anchor one non-zero entry, at the class of its ground-truth box, equal to the
normalised alignment metric (at most the box's best IoU). YOLO's classification term is
``sum BCE(z, t) / max(sum t, 1)``. The adapter reads, per anchor:

* ``label`` = the class of the non-zero entry (a foreground anchor), else ``C`` (background);
* ``quality`` = that entry (``max_j t_j``), the soft target of EQFL and of ``bce``;
* ``normalizer`` = the sum of the targets the loss is trained towards, at least 1: for the
  soft-target losses (``bce``, ``eqfl``) ``max(sum t, 1)``, exactly YOLO's; for the hard-label
  losses (``efl``, ``focal``, whose positive target is 1) the number of foreground anchors,
  as in RetinaNet/EFL (dividing a hard-label sum by the soft-score sum would inflate it by
  1 / mean quality, ~20x at initialisation). Each process normalises by its own batch, as
  YOLO does (it does not average the normaliser over processes; DDP averages gradients).

``bce`` is then ``sum_j BCE(z_j, q [j = label]) / normalizer`` - YOLO's own term, value and
gradient (tested to 1e-5 against ``v8DetectionLoss``), with its gradient statistics kept in
closed form. ``eqfl`` is EQFL with ``quality``; ``efl`` and ``focal`` use the hard ``label``.

Statistics: one :class:`~eqlosses.stats.GradientStatistics` per model, registered on the
YOLO model as the submodule ``eqlosses_stats`` (so YOLO's checkpoints carry it; it keeps
float64 through YOLO's ``.half()`` save), updated once per training step (one all-reduce of a
``[2, C]`` tensor). With an end-to-end head both branches share it: the one-to-many branch
(many positives per box, the setting EFL was designed for) updates it, the one-to-one branch
reads the same per-class focusing without updating it, so a step still makes one update.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.contract import ClassStatistics
from ..losses.registry import build_loss_for, check_fits, check_loss_args
from ..stats import GradientStatistics

__all__ = ["DETECTION_LOSSES", "CLASSIFICATION_LOSSES", "STATS_ATTR", "YOLOClassificationTerm",
           "EQLDetectionLoss", "EQLClassificationLoss", "build_criterion", "yolo_targets",
           "EQLDetectionTrainer", "EQLClassificationTrainer", "detection_trainer",
           "classification_trainer", "offline_environment", "statistics_of"]

#: classification terms offered for YOLO's detection head
DETECTION_LOSSES: Tuple[str, ...] = ("eqfl", "efl", "focal", "bce")
#: losses offered for YOLO's image classifier
CLASSIFICATION_LOSSES: Tuple[str, ...] = ("softmax_eql", "balanced_softmax", "ce")
#: name of the statistics submodule registered on the YOLO model
STATS_ATTR = "eqlosses_stats"
#: name of the (plain dict) model attribute recording the loss a model was trained with
LOSS_ATTR = "eqlosses_loss"


def _ultralytics():
    try:
        import ultralytics  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("eqlosses.integrations.ultralytics needs ultralytics: "
                          "pip install 'eqlosses[ultralytics]'") from err
    return ultralytics


# -- offline -------------------------------------------------------------------------------

#: ultralytics settings that would reach the network or write outside the run
OFFLINE_SETTINGS: Dict[str, Any] = {"sync": False, "hub": False, "clearml": False,
                                    "comet": False, "dvc": False, "mlflow": False,
                                    "raytune": False, "tensorboard": False, "wandb": False}


def offline_environment(config_dir: Union[str, os.PathLike],
                        runs_dir: Optional[Union[str, os.PathLike]] = None) -> Dict[str, str]:
    """Keep ultralytics offline and out of the user's home; call it **before** importing
    ultralytics (its online check and settings file are read at import).

    Sets ``YOLO_OFFLINE=1`` (ultralytics' own switch: its online check then answers False,
    so no analytics events, update checks or hub calls), ``YOLO_CONFIG_DIR=config_dir`` (its
    settings file, fonts and DDP scripts go there), ``MPLCONFIGDIR`` (matplotlib's font cache,
    under ``config_dir``) and ``HF_HUB_OFFLINE=1``; then writes
    the settings :data:`OFFLINE_SETTINGS` (``sync=False`` and every logger integration off)
    and, when given, ``runs_dir`` (also the datasets and weights folders). Weights are never
    fetched as long as you build models from a ``.yaml`` or a local ``.pt``; the trainers
    below also skip the AMP check (which downloads ``yolo26n.pt`` on CUDA) and need
    ``plots=False`` (plots download a font). Returns the environment variables it set.

    Raises ``RuntimeError`` if ultralytics was imported before with a different config dir.
    """
    config_dir = Path(config_dir).resolve()
    config_dir.mkdir(parents=True, exist_ok=True)
    env = {"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(config_dir), "HF_HUB_OFFLINE": "1",
           "MPLCONFIGDIR": str(config_dir / "matplotlib")}
    import sys

    if "ultralytics" in sys.modules:
        from ultralytics.utils import USER_CONFIG_DIR

        if Path(USER_CONFIG_DIR).resolve() != config_dir:
            raise RuntimeError(f"ultralytics was imported before offline_environment() (its "
                               f"config dir is {USER_CONFIG_DIR}); call it first, in a fresh "
                               f"process")
    os.environ.update(env)
    from ultralytics.utils import SETTINGS

    update = dict(OFFLINE_SETTINGS)
    update = {k: v for k, v in update.items() if k in SETTINGS}
    if runs_dir is not None:
        runs = Path(runs_dir).resolve()
        update.update(runs_dir=str(runs), datasets_dir=str(runs / "datasets"),
                      weights_dir=str(runs / "weights"))
    SETTINGS.update(update)
    return env


@contextlib.contextmanager
def _no_amp_check() -> Iterator[None]:
    """Replace ultralytics' AMP check (which downloads yolo26n.pt on CUDA) for the duration:
    AMP is then used as the ``amp`` argument says, on CUDA only."""
    import ultralytics.engine.trainer as trainer_module

    def amp_as_asked(model: nn.Module) -> bool:
        return next(model.parameters()).device.type == "cuda"

    original = trainer_module.check_amp
    trainer_module.check_amp = amp_as_asked
    try:
        yield
    finally:
        trainer_module.check_amp = original


# -- targets and the classification term ------------------------------------------------------

def yolo_targets(target_scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """YOLO's assigned soft targets ``[..., C]`` as eqlosses targets: ``(labels, quality,
    normalizer)`` over the flattened anchors.

    ``labels[i]`` is the class of anchor i's non-zero target entry, or ``C`` (background);
    ``quality[i]`` that entry (0 on background); ``normalizer = max(sum t, 1)``, YOLO's.

    >>> t = torch.zeros(1, 3, 2)
    >>> t[0, 0, 1] = 0.6; t[0, 2, 0] = 0.3
    >>> labels, quality, norm = yolo_targets(t)
    >>> labels.tolist(), [round(q, 4) for q in quality.tolist()], float(norm)
    ([1, 2, 0], [0.6, 0.0, 0.3], 1.0)
    """
    t = target_scores.detach().reshape(-1, target_scores.shape[-1]).float()
    quality, cls = t.max(dim=1)
    num_classes = t.shape[1]
    labels = torch.where(quality > 0, cls, torch.full_like(cls, num_classes))
    normalizer = target_scores.detach().float().sum().clamp(min=1)
    return labels, quality, normalizer


class YOLOClassificationTerm(nn.Module):
    """YOLO's classification term computed by an eqlosses loss.

    Called as YOLO calls its ``bce``: ``term(pred_scores, target_scores)`` with ``[B, A, C]``
    logits and assigned soft targets; returns a 0-d tensor ``loss x normalizer`` so that
    YOLO's own ``.sum() / max(sum t, 1)`` gives back ``loss`` (the eqlosses loss, already
    divided by the same normaliser; see :func:`yolo_targets` for the mapping).

    Args:
        loss: ``eqfl``, ``efl``, ``focal`` or ``bce``.
        num_classes: ``C``.
        stats: the shared :class:`~eqlosses.stats.GradientStatistics`.
        updates_statistics: whether this term updates ``stats`` (in training, with grad on).
        loss_kwargs: hyper-parameters of the eqlosses loss (e.g. ``scale_factor=4``).
    """

    def __init__(self, loss: str, num_classes: int, stats: GradientStatistics,
                 updates_statistics: bool = True, **loss_kwargs: Any) -> None:
        super().__init__()
        if loss not in DETECTION_LOSSES:
            raise ValueError(f"YOLO detection loss must be one of {', '.join(DETECTION_LOSSES)}, "
                             f"got {loss!r} (sigmoid_eql needs an objectness column that "
                             f"YOLO's anchor-free head does not have; see the docs)")
        if stats.num_classes != num_classes:
            raise ValueError(f"statistics are for {stats.num_classes} classes, the model has "
                             f"{num_classes}")
        self.name = loss
        self.num_classes = num_classes
        self.updates_statistics = updates_statistics
        self.loss_kwargs = dict(loss_kwargs)
        if loss == "bce":
            if loss_kwargs:
                raise ValueError(f"loss 'bce' (YOLO's own term) takes no arguments, got "
                                 f"{', '.join(loss_kwargs)}")
            self.loss: Optional[nn.Module] = None
            self.stats = stats
        else:
            kwargs = dict(loss_kwargs)
            traits = check_loss_args("dense", loss, kwargs).traits  # type: ignore[union-attr]
            if traits.gradient_statistics:
                kwargs["stats"] = stats
            kwargs.setdefault("validate", False)  # no host synchronisation per step
            self.loss = build_loss_for("dense", loss, num_classes, **kwargs)
            check_fits(self.loss, "dense", num_classes)
            if not traits.gradient_statistics:  # focal: its closed-form tracking, into `stats`
                self.loss.stats = stats
            self.stats = stats

    def extra_repr(self) -> str:
        return f"loss={self.name!r}, num_classes={self.num_classes}"

    @property
    def _update(self) -> bool:
        return self.updates_statistics and torch.is_grad_enabled()

    def forward(self, pred_scores: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
        c = self.num_classes
        if pred_scores.shape[-1] != c or target_scores.shape != pred_scores.shape:
            raise ValueError(f"expected logits and targets [B, A, {c}], got "
                             f"{tuple(pred_scores.shape)} and {tuple(target_scores.shape)}")
        logits = pred_scores.reshape(-1, c)
        labels, quality, norm = yolo_targets(target_scores)
        if self.loss is None:
            loss = self._bce(logits, target_scores.reshape(-1, c), labels, norm)
        else:
            self.loss.train(self._update)
            if self.name == "eqfl":
                loss = self.loss(logits, labels, quality=quality, normalizer=norm)
            else:  # hard labels: normalised by the sum of their targets, the positives
                positives = (labels < c).sum().clamp(min=1).to(norm.dtype)
                loss = self.loss(logits, labels, normalizer=positives)
        return loss * norm.to(loss.dtype)

    def _bce(self, logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
             norm: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / norm
        if self._update:
            with torch.no_grad():
                grad = (torch.sigmoid(logits.detach().float()) - targets.float()).abs() / norm
                self._add(grad, labels)
        return loss

    @torch.no_grad()
    def _add(self, grad_abs: torch.Tensor, labels: torch.Tensor) -> None:
        c = self.num_classes
        fg = labels < c
        onehot = torch.zeros_like(grad_abs, dtype=torch.bool)
        onehot[fg, labels[fg]] = True
        pos = torch.where(onehot, grad_abs, 0).sum(0)
        neg = torch.where(onehot, 0, grad_abs).sum(0)
        self.stats.update(pos, neg, warn=False)


def _model_of(model: nn.Module) -> nn.Module:
    from ultralytics.utils.torch_utils import unwrap_model

    return unwrap_model(model)


def statistics_of(model: nn.Module, create: bool = True) -> Optional[GradientStatistics]:
    """The :class:`~eqlosses.stats.GradientStatistics` registered on a YOLO model (as the
    submodule ``eqlosses_stats``), registering a new one (on the model's device) if
    ``create`` and there is none."""
    model = _model_of(model)
    stats = getattr(model, STATS_ATTR, None)
    if stats is None and create:
        nc = int(model.model[-1].nc)
        device = next(model.parameters()).device
        stats = GradientStatistics(nc).to(device)
        model.add_module(STATS_ATTR, stats)
    if stats is not None and not isinstance(stats, GradientStatistics):
        raise ValueError(f"model.{STATS_ATTR} is a {type(stats).__name__}, expected a "
                         f"GradientStatistics")
    return stats


def _base_detection_loss():
    _ultralytics()
    from ultralytics.utils.loss import v8DetectionLoss

    return v8DetectionLoss


def _make_detection_loss_class():
    base = _base_detection_loss()

    class EQLDetectionLoss(base):  # type: ignore[misc, valid-type]
        __doc__ = _DETECTION_LOSS_DOC

        def __init__(self, model: nn.Module, loss: str = "eqfl", tal_topk: int = 10,
                     tal_topk2: Optional[int] = None, *, updates_statistics: bool = True,
                     **loss_kwargs: Any) -> None:
            super().__init__(model, tal_topk=tal_topk, tal_topk2=tal_topk2)
            if getattr(self, "class_weights", None) is not None:
                raise ValueError("the model has class_weights (cls_pw > 0): YOLO's inverse-"
                                 "frequency class weights compete with the equalization "
                                 "losses; train with cls_pw=0")
            stats = statistics_of(model)
            self.bce = YOLOClassificationTerm(loss, self.nc, stats, updates_statistics,
                                              **loss_kwargs)

        @property
        def stats(self) -> GradientStatistics:
            """The shared gradient statistics (``model.eqlosses_stats``)."""
            return self.bce.stats

        @property
        def term(self) -> YOLOClassificationTerm:
            """The classification term."""
            return self.bce

    EQLDetectionLoss.__module__ = __name__
    EQLDetectionLoss.__qualname__ = "EQLDetectionLoss"
    return EQLDetectionLoss


_DETECTION_LOSS_DOC = """YOLO's detection criterion with its classification term from eqlosses.

    ``EQLDetectionLoss(model, loss="eqfl", **loss_kwargs)`` subclasses ultralytics'
    ``v8DetectionLoss`` and is called the same way: ``criterion(preds, batch) -> (loss,
    loss_items)`` (the sum of the box, cls and DFL terms times the batch size, and the
    detached items). Only the classification term differs: ``eqfl`` (default), ``efl``,
    ``focal`` or ``bce`` (YOLO's own); see the module docstring for the target mapping.
    ``loss_kwargs`` are the eqlosses loss's hyper-parameters (``scale_factor``,
    ``focal_gamma``, ...). The statistics are ``.stats`` (the model's ``eqlosses_stats``).
    ``updates_statistics=False`` makes a criterion that reads the statistics only.
    """


_CLASS_CACHE: Dict[str, Any] = {}


def __getattr__(name: str) -> Any:  # PEP 562: build the ultralytics subclasses lazily
    if name == "EQLDetectionLoss":
        if name not in _CLASS_CACHE:
            _CLASS_CACHE[name] = _make_detection_loss_class()
        return _CLASS_CACHE[name]
    if name in ("EQLDetectionTrainer", "EQLClassificationTrainer"):
        if name not in _CLASS_CACHE:
            _CLASS_CACHE.update(_make_trainer_classes())
        return _CLASS_CACHE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_criterion(model: nn.Module, loss: str = "eqfl", **loss_kwargs: Any) -> Any:
    """The eqlosses criterion of a YOLO detection model: an :class:`EQLDetectionLoss`, or
    for an end-to-end head (YOLO26) ultralytics' ``E2ELoss`` whose two branches are
    :class:`EQLDetectionLoss` sharing one statistics module (the one-to-many branch updates
    it; the one-to-one branch only reads it). Install it as ``model.criterion``.
    """
    loss_cls = __getattr__("EQLDetectionLoss")
    model = _model_of(model)
    head = model.model[-1]
    if getattr(head, "one2one_cv2", None) is None:
        return loss_cls(model, loss, **loss_kwargs)
    from ultralytics.utils.loss import E2ELoss

    def branch(m: nn.Module, tal_topk: int = 10, tal_topk2: Optional[int] = None) -> Any:
        drives = tal_topk2 is None  # ultralytics builds the one-to-one branch with topk2
        return loss_cls(m, loss, tal_topk, tal_topk2, updates_statistics=drives, **loss_kwargs)

    criterion = E2ELoss(model, loss_fn=branch)
    if not (criterion.one2many.term.updates_statistics
            and not criterion.one2one.term.updates_statistics):  # pragma: no cover
        raise RuntimeError("ultralytics' E2ELoss no longer builds its one-to-one branch with "
                           "tal_topk2; cannot tell the branches apart")
    return criterion


# -- classification ---------------------------------------------------------------------------

class EQLClassificationLoss(nn.Module):
    """YOLO's classification criterion (``v8ClassificationLoss``) with an eqlosses loss:
    ``criterion(preds, batch) -> (loss, {"loss": loss.detach()})``.

    Args:
        loss: ``softmax_eql`` (default), ``balanced_softmax`` or ``ce``.
        num_classes: ``C``.
        statistics: the training class counts (needed by ``balanced_softmax``).
        loss_kwargs: hyper-parameters of the loss (e.g. ``tau=1.5``).

    >>> crit = EQLClassificationLoss("softmax_eql", 3)
    >>> loss, items = crit(torch.zeros(2, 3, requires_grad=True), {"cls": torch.tensor([0, 2])})
    >>> round(float(loss.detach()), 4), sorted(items)
    (1.0986, ['loss'])
    """

    def __init__(self, loss: str = "softmax_eql", num_classes: int = 0,
                 statistics: Optional[ClassStatistics] = None, **loss_kwargs: Any) -> None:
        super().__init__()
        if loss not in CLASSIFICATION_LOSSES:
            raise ValueError(f"YOLO classification loss must be one of "
                             f"{', '.join(CLASSIFICATION_LOSSES)}, got {loss!r}")
        self.name = loss
        loss_kwargs.setdefault("validate", False)
        self.loss = build_loss_for("cls", loss, num_classes, statistics, **loss_kwargs)
        check_fits(self.loss, "cls", num_classes)

    @property
    def stats(self) -> Optional[GradientStatistics]:
        """The loss's statistics (Softmax-EQL), else None."""
        return getattr(self.loss, "stats", None)

    def forward(self, preds: Any, batch: Mapping[str, torch.Tensor]
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        logits = preds[1] if isinstance(preds, (list, tuple)) else preds
        self.loss.train(torch.is_grad_enabled())
        loss = self.loss(logits, batch["cls"].long())
        return loss, {"loss": loss.detach()}


# -- trainers ---------------------------------------------------------------------------------

def _class_statistics_from_labels(labels: Any, num_classes: int) -> Tuple[ClassStatistics,
                                                                           torch.Tensor]:
    """(images per class as ClassStatistics, instances per class) from YOLO dataset labels."""
    images = torch.zeros(num_classes, dtype=torch.long)
    instances = torch.zeros(num_classes, dtype=torch.long)
    for lb in labels:
        cls = torch.as_tensor(lb["cls"]).reshape(-1).long()
        if cls.numel():
            instances += torch.bincount(cls, minlength=num_classes)[:num_classes]
            images[cls.unique()] += 1
    return ClassStatistics(images, total=len(labels)), instances


def _record_loss_and_load(trainer: Any, model: nn.Module, weights: Any) -> nn.Module:
    """Record the trainer's loss on ``model`` (``model.eqlosses_loss``), then load ``weights``
    (after the statistics submodule exists, so that ``last.pt``'s statistics are restored).
    Resuming a checkpoint trained with another loss or other arguments is refused: its
    statistics would be read by a loss that did not write them."""
    wanted = {"loss": trainer.eql_loss, "kwargs": dict(trainer.eql_loss_kwargs)}
    setattr(model, LOSS_ATTR, wanted)
    if weights:
        recorded = getattr(weights, LOSS_ATTR, None)
        if recorded is not None and recorded != wanted and trainer.resume:
            raise ValueError(f"the checkpoint was trained with {recorded}, this trainer uses "
                             f"{wanted}: resume with the same loss and arguments")
        model.load(weights)
    return model


class _EMAStatistics:
    """Mixed into the trainers: after every optimizer step and before every save, the EMA
    model's statistics are set equal to the live model's (YOLO's EMA would otherwise average
    them)."""

    def _sync_ema_statistics(self) -> None:
        if self.ema is None:  # type: ignore[attr-defined]
            return
        live = statistics_of(self.model, create=False)  # type: ignore[attr-defined]
        ema = statistics_of(self.ema.ema, create=False)  # type: ignore[attr-defined]
        if live is not None and ema is not None:
            ema.load_state_dict(live.state_dict())

    def optimizer_step(self):
        super().optimizer_step()  # type: ignore[misc]
        self._sync_ema_statistics()

    def save_model(self):
        self._sync_ema_statistics()
        return super().save_model()  # type: ignore[misc]


def _make_trainer_classes() -> Dict[str, type]:
    _ultralytics()
    from ultralytics.models.yolo.classify import ClassificationTrainer
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import LOGGER, RANK

    class EQLDetectionTrainer(_EMAStatistics, DetectionTrainer):
        """YOLO's detection trainer with an eqlosses classification term.

        Use ``YOLO("yolo11n.yaml").train(data=..., trainer=EQLDetectionTrainer)`` (EQFL with
        its defaults), or a trainer for another loss and its arguments:
        ``trainer=detection_trainer("efl", scale_factor=4)``, or a subclass of your own that
        sets the class attributes ``eql_loss`` and ``eql_loss_kwargs`` (importable by path, as
        YOLO's DDP launcher may need).

        What it adds to ultralytics' ``DetectionTrainer``: the model gets the statistics
        submodule ``eqlosses_stats`` before any weights load (so ``resume=True`` restores
        it from ``last.pt``) and records the loss in ``model.eqlosses_loss``; the criterion
        is :func:`build_criterion`'s; after every optimizer step and before every save the
        EMA model's statistics are set equal to the live model's (YOLO's EMA would
        otherwise average them); the AMP check that downloads weights is skipped (AMP
        follows ``amp``, on CUDA). ``class_statistics`` (images per class, a
        :class:`~eqlosses.losses.ClassStatistics`) and ``instance_counts`` come from the
        training labels.
        """

        eql_loss: str = "eqfl"
        eql_loss_kwargs: Mapping[str, Any] = {}

        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True):
            model = super().get_model(cfg=cfg, weights=None, verbose=verbose)
            statistics_of(model)
            return _record_loss_and_load(self, model, weights)

        def _setup_train(self):
            with _no_amp_check():
                super()._setup_train()
            model = _model_of(self.model)
            statistics_of(model)  # a model handed over already built may lack it
            previous = getattr(model, "criterion", None)
            model.criterion = build_criterion(model, self.eql_loss, **dict(self.eql_loss_kwargs))
            for key in ("updates", "o2m", "o2o"):  # an E2E schedule restored on resume
                if previous is not None and hasattr(previous, key):
                    setattr(model.criterion, key, getattr(previous, key))
            self.class_statistics, self.instance_counts = _class_statistics_from_labels(
                self.train_loader.dataset.labels, int(self.data["nc"]))
            self._sync_ema_statistics()
            if self.ema is not None:  # validation losses with the same term (no updates:
                # the validator runs without gradients)
                self.ema.ema.criterion = build_criterion(self.ema.ema, self.eql_loss,
                                                         **dict(self.eql_loss_kwargs))
            if RANK in {-1, 0}:
                LOGGER.info(f"eqlosses: classification term {self.eql_loss} "
                            f"{dict(self.eql_loss_kwargs) or ''}".rstrip())

    class EQLClassificationTrainer(_EMAStatistics, ClassificationTrainer):
        """YOLO's classification trainer with Softmax-EQL (default), balanced softmax or
        cross-entropy: ``YOLO("yolo11n-cls.yaml").train(data=...,
        trainer=EQLClassificationTrainer)``, or ``classification_trainer("balanced_softmax",
        tau=1.0)``. The class counts come from the training samples; a Softmax-EQL loss's
        statistics are registered on the model as ``eqlosses_stats`` (saved in ``last.pt``,
        kept equal in the EMA copy, restored on resume)."""

        eql_loss: str = "softmax_eql"
        eql_loss_kwargs: Mapping[str, Any] = {}

        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True):
            model = super().get_model(cfg=cfg, weights=None, verbose=verbose)
            if self.eql_loss == "softmax_eql":
                model.add_module(STATS_ATTR, GradientStatistics(int(self.data["nc"])))
            return _record_loss_and_load(self, model, weights)

        def _setup_train(self):
            with _no_amp_check():
                super()._setup_train()
            model = _model_of(self.model)
            nc = int(self.data["nc"])
            counts = torch.zeros(nc, dtype=torch.long)
            for sample in self.train_loader.dataset.samples:
                counts[int(sample[1])] += 1
            self.class_statistics = ClassStatistics(counts, total=int(counts.sum()))
            kwargs = dict(self.eql_loss_kwargs)
            stats = getattr(model, STATS_ATTR, None)
            if stats is not None:
                kwargs["stats"] = stats
            model.criterion = EQLClassificationLoss(self.eql_loss, nc, self.class_statistics,
                                                    **kwargs).to(self.device)
            self._sync_ema_statistics()

    for cls in (EQLDetectionTrainer, EQLClassificationTrainer):
        cls.__module__ = __name__
    return {"EQLDetectionTrainer": EQLDetectionTrainer,
            "EQLClassificationTrainer": EQLClassificationTrainer}


def _check_kwargs(head: str, loss: str, kwargs: Mapping[str, Any]) -> None:
    if loss != "bce":
        check_loss_args(head, loss, kwargs)
    elif kwargs:
        raise ValueError(f"loss 'bce' takes no arguments, got {', '.join(kwargs)}")


def detection_trainer(loss: str = "eqfl", **loss_kwargs: Any) -> type:
    """An :class:`EQLDetectionTrainer` subclass for ``loss`` with ``loss_kwargs`` (checked
    now), e.g. ``YOLO("yolo11n.yaml").train(data=..., trainer=detection_trainer("efl"))``."""
    if loss not in DETECTION_LOSSES:
        raise ValueError(f"YOLO detection loss must be one of {', '.join(DETECTION_LOSSES)}, "
                         f"got {loss!r}")
    _check_kwargs("dense", loss, loss_kwargs)
    base = __getattr__("EQLDetectionTrainer")
    return type(f"EQLDetectionTrainer_{loss}", (base,),
                {"eql_loss": loss, "eql_loss_kwargs": dict(loss_kwargs), "__module__": __name__})


def classification_trainer(loss: str = "softmax_eql", **loss_kwargs: Any) -> type:
    """An :class:`EQLClassificationTrainer` subclass for ``loss`` with ``loss_kwargs``."""
    if loss not in CLASSIFICATION_LOSSES:
        raise ValueError(f"YOLO classification loss must be one of "
                         f"{', '.join(CLASSIFICATION_LOSSES)}, got {loss!r}")
    check_loss_args("cls", loss, loss_kwargs)
    base = __getattr__("EQLClassificationTrainer")
    return type(f"EQLClassificationTrainer_{loss}", (base,),
                {"eql_loss": loss, "eql_loss_kwargs": dict(loss_kwargs), "__module__": __name__})
