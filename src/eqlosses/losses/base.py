"""The contract every loss module of the package follows."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..functional._common import check_device, check_reduction
from ..stats import GradientStatistics
from .contract import LossTraits, Param


def _warn_if_no_tail(class_frequency: torch.Tensor, lambda_: float) -> None:
    """EQL v1 does nothing when no class is rarer than lambda_: say so instead of silently
    training plain BCE/CE."""
    if not bool((class_frequency < lambda_).any()):
        warnings.warn(f"EQL: no class has a frequency below lambda_={lambda_} (the rarest is "
                      f"{float(class_frequency.min()):.3g}), so the loss equals its plain "
                      f"baseline; raise lambda_ to treat the tail as rare", stacklevel=3)


def class_vector(values, num_classes: int, name: str) -> torch.Tensor:
    """A per-class float32 tensor ``[C]`` given to a loss's constructor, shape-checked."""
    vector = torch.as_tensor(values, dtype=torch.float32)
    if vector.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},), got {tuple(vector.shape)}")
    return vector


class SigmoidScores:
    """Mixin: test-time scores of a plain sigmoid classifier."""

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` class scores ``sigmoid(z)``."""
        return torch.sigmoid(logits)


class LongTailLoss(nn.Module):
    """Base class: conventions, channel count and test-time scores of a loss.

    Subclasses declare :attr:`traits` (what a host needs to know, see
    :mod:`eqlosses.losses.contract`), set :attr:`num_channels` (logit channels the model must
    produce for ``num_classes`` classes), store their hyper-parameters with
    :meth:`_set_hparams` (checked against ``traits.params`` and shown by ``repr``) and
    implement :meth:`scores` (logits -> ``[N, C, *]`` foreground class scores) and
    ``forward``.

    The validation switch: every loss takes ``validate=True`` (keyword only), as
    ``torch.distributions`` takes ``validate_args``. Checks that read metadata only (tensor
    types, dtypes, shapes, devices, the device of the loss's state) are always on. Checks that
    read tensor *values* on the host run only with ``validate=True``: the target range (one
    host synchronisation, a second one when some rows are ignored), and the statistics
    update's "non-finite increment skipped" warning (one per training forward of a
    gradient-driven loss, until it has been shown). With validation on, the kernels also use
    what the host read to skip masks, and softmax losses on ``[N, C]`` logits read whether
    some ``p_t`` underflows (one; Seesaw: one per softmax, plus ``nonzero`` to select its
    foreground rows). Measured per training forward + backward without / with ignored rows:
    Sigmoid-EQL, EFL, EQFL 2 / 3; Softmax-EQL 3 / 4 on ``[N, C]``, 2 / 3 on pixels;
    cross-entropy, balanced softmax, softmax EQL 2 / 3; focal, EQL, BCE, federated 1 / 2;
    Seesaw 4 / 5 (eval forwards: one fewer for the gradient-driven losses); a baseline built
    with ``track_statistics=True``: one more per training forward (the statistics update's
    warning).

    With ``validate=False`` a forward, its backward and the statistics update never read a
    tensor value on the host (no ``.item()``, ``bool(tensor)``, ``nonzero`` or boolean
    indexing): on a GPU the step never waits, and ``torch.compile(loss, fullgraph=True)``
    captures it in one graph (except a loss given an explicit ``torch.Generator``, which
    dynamo does not trace). Values agree with ``validate=True`` to rounding; invalid targets
    are then the caller's responsibility (undefined results or an indexing error, as in
    ``torch.nn``), and a skipped statistics update shows only in ``stats.num_skipped``. On a
    CPU, where a synchronisation costs little, ``validate=False`` is no faster in eager mode
    (softmax losses a few percent slower: masked paths); it pays on GPUs and under
    ``torch.compile``.
    """

    #: what a host needs to know about the loss (declared by every concrete loss)
    traits: LossTraits
    #: logit channels the model must produce: ``num_classes`` plus background column(s)
    num_channels: int

    def __init__(self, num_classes: int, ignore_index: int = -100, reduction: str = "mean",
                 *, validate: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        check_reduction(reduction)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise ValueError(f"{type(self).__name__}: ignore_index must be an integer, got "
                             f"{ignore_index!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduction = reduction
        #: check target values on the host (see the class docstring: the validation switch)
        self.validate = Param(bool).check("validate", validate, type(self).__name__)
        self._hparam_names: tuple = ()

    def _set_hparams(self, **values: Any) -> None:
        """Check hyper-parameters against ``traits.params`` (a ``ValueError`` naming the
        parameter, the expected and the given value) and store them as attributes."""
        params = type(self).traits.params
        for name, value in values.items():
            if name in params:
                value = params[name].check(name, value, type(self).__name__)
            setattr(self, name, value)
        self._hparam_names = tuple(self._hparam_names) + tuple(values)

    @property
    def updates_state(self) -> bool:
        """True when a forward call updates the loss's state (training mode, grad enabled)."""
        return self.training and torch.is_grad_enabled()

    def scores(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def class_terms(self) -> Dict[str, torch.Tensor]:
        """Per-class quantities in force (weights, margins, ratios), for monitoring."""
        return {}

    def extra_repr(self) -> str:
        """``num_classes``, the hyper-parameters, ``ignore_index``, ``reduction`` and
        ``validate=False`` when validation is off.

        >>> from eqlosses import SoftmaxEQLLoss
        >>> SoftmaxEQLLoss(10, tau=2)
        SoftmaxEQLLoss(
          num_classes=10, tau=2.0, eps=0.0001, indicator='pos', ignore_index=-100, reduction='mean'
          (stats): GradientStatistics(num_classes=10, dtype=torch.float64)
        )
        """
        parts = [f"num_classes={self.num_classes}"]
        parts += [f"{name}={getattr(self, name)!r}" for name in self._hparam_names]
        parts += [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if not self.validate:
            parts.append("validate=False")
        if getattr(self, "track_statistics", False):
            parts.append("track_statistics=True")
        return ", ".join(parts)

    # -- track_statistics: gradient statistics of a loss that does not need them ----------

    def _init_tracking(self, track_statistics: bool) -> None:
        """For a loss declaring ``traits.track_statistics``: store the switch and, when on,
        create ``self.stats`` (a :class:`~eqlosses.GradientStatistics` of ``num_classes``)."""
        self.track_statistics = Param(bool).check("track_statistics", track_statistics,
                                                  type(self).__name__)
        if self.track_statistics:
            self.stats = GradientStatistics(self.num_classes)

    def _tracking_now(self, logits: torch.Tensor) -> bool:
        """True when this forward must update ``self.stats`` (tracking on, training mode,
        grad enabled); checks that the statistics live on the logits' device."""
        if not (getattr(self, "track_statistics", False) and self.updates_state):
            return False
        check_device(self.stats.pos_grad, logits, type(self).__name__)
        return True

    def _track(self, pos_inc: torch.Tensor, neg_inc: torch.Tensor, scale: Any) -> None:
        """Add a kernel's unreduced increments, times the reduction's ``scale``, to the
        statistics (background columns dropped): one all-reduce, no host read unless
        ``validate`` (the "skipped update" warning)."""
        c = self.num_classes
        self._update_stats(pos_inc[:c] * scale, neg_inc[:c] * scale)

    def _update_stats(self, pos_inc: torch.Tensor, neg_inc: torch.Tensor) -> None:
        """``stats.update``, warning about a skipped update only with validation on."""
        self.stats.update(pos_inc, neg_inc, warn=self.validate)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook
        # A loss that can track statistics loads checkpoints made with tracking on or off:
        # statistics it does not keep are dropped, statistics missing from an older
        # checkpoint start from zero (with a warning). They never change the loss.
        if hasattr(self, "track_statistics"):
            keys = [k for k in state_dict if k.startswith(prefix + "stats.")]
            if not self.track_statistics:
                for key in keys:
                    del state_dict[key]
            elif not keys:
                warnings.warn(f"{type(self).__name__}: the checkpoint has no gradient "
                              f"statistics (made with track_statistics off, or by an older "
                              f"version); they start from zero", RuntimeWarning, stacklevel=4)
                for name, buf in self.stats.state_dict().items():
                    state_dict[prefix + "stats." + name] = buf
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class GradientDrivenLoss(LongTailLoss):
    """A loss whose per-class terms come from accumulated gradient statistics ``self.stats``.

    Several losses may share one :class:`GradientStatistics` object through ``stats=``.
    """

    def __init__(self, num_classes: int, ignore_index: int = -100, reduction: str = "mean",
                 stats: Optional[GradientStatistics] = None, *, validate: bool = True):
        super().__init__(num_classes, ignore_index, reduction, validate=validate)
        if stats is None:
            stats = GradientStatistics(num_classes)
        elif stats.num_classes != num_classes:
            raise ValueError(f"stats track {stats.num_classes} classes, but the loss was built "
                             f"for num_classes={num_classes}")
        self.stats = stats

    def _check_state_device(self, logits: torch.Tensor) -> None:
        check_device(self.stats.pos_grad, logits, type(self).__name__)
