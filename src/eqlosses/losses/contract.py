"""The loss-model contract: what a loss declares so that any model can host it.

A host (a pipeline of :mod:`eqlosses.tasks`, a detector head, a framework adapter) needs to
know, before it builds anything, how a loss wants to be fed: its activation, how many logit
channels it needs and how it treats background, whether it takes a normaliser or quality
targets, which training statistics fill which constructor argument, and which heads it is
meant for. Every loss class declares these facts once, as a :class:`LossTraits` in its
``traits`` class attribute; hosts read them and never guess from signatures or trial calls.

Heads (:data:`HEADS`), i.e. the places a loss can sit:

=========  ===================================================  ================================
head       what the host feeds                                  background conventions accepted
=========  ===================================================  ================================
``cls``    image classifier: ``[N, C']`` logits, targets          ``none``, ``index``
           in ``[0, C)``
``seg``    per-pixel classifier: ``[B, C', H, W]`` logits,        ``none``, ``index``
           ``[B, H, W]`` targets with an ignore label
``roi``    two-stage box classifier (R-CNN): sampled RoIs as      ``column``, ``two_columns``,
           rows, background RoIs have target ``C``                ``index``
``dense``  one-stage dense head (RetinaNet, FCOS): anchors as     ``index``
           rows, ``C`` sigmoid channels, background anchors
           target ``C``, normalised by the positive anchors
=========  ===================================================  ================================

Background conventions (:data:`BACKGROUNDS`), with ``C'`` the logit channels:

* ``none``: ``C' = C``; there are no background rows (targets in ``[0, C)``).
* ``index``: ``C' = C``; target ``C`` marks a background row, a negative for every class
  (sigmoid losses).
* ``column``: ``C' = C + 1``; target ``C`` trains the last column (the background class of a
  softmax, or the objectness logit of Sigmoid-EQL).
* ``two_columns``: ``C' = C + 2``: ``C`` class logits, then objectness ``[fg, bg]`` (Seesaw).

A loss whose convention is chosen by a constructor switch (``CrossEntropyLoss(background=)``,
``SigmoidEQLLoss(objectness=)``) maps each convention it supports to the keyword arguments
that select it; :func:`eqlosses.losses.build_loss_for` picks the first convention the head
accepts unless the caller chose one.

A loss of your own is hosted alike: subclass :class:`~eqlosses.losses.LongTailLoss` (or any
``nn.Module`` with ``num_classes``, ``num_channels``, ``ignore_index`` and ``scores``), declare
``traits``, and register it (:func:`eqlosses.losses.register_loss`) or name it
``"package.module:ClassName"`` in a configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["BACKGROUNDS", "EXTRA_CHANNELS", "HEADS", "Head", "Param", "LossTraits",
           "ClassStatistics", "STATISTICS", "REDUCTION", "IGNORE_INDEX"]

#: background convention -> logit channels beyond the ``C`` classes
EXTRA_CHANNELS: Dict[str, int] = {"none": 0, "index": 0, "column": 1, "two_columns": 2}
BACKGROUNDS: Tuple[str, ...] = tuple(EXTRA_CHANNELS)

#: training statistics a host can hand to a loss's constructor
STATISTICS: Dict[str, str] = {
    "counts": "samples per class in the task's unit (images for classification, images "
              "containing the class for detection, pixels for segmentation)",
    "frequency": "counts / total (the fraction of training images, or pixels, with the class)",
}


@dataclass(frozen=True)
class Head:
    """A place a loss can sit, and what its host provides."""

    description: str
    #: background conventions the host can feed, most preferred first
    backgrounds: Tuple[str, ...]
    #: the host computes quality targets (IoU) for losses that need them
    provides_quality: bool = False
    #: the host divides by the positives itself (losses without a ``normalizer`` argument
    #: must then be built with ``reduction="sum"``)
    normalised: bool = False
    #: activations the host can score and train with
    activations: Tuple[str, ...] = ("sigmoid", "softmax")

    def reduction_for(self, traits: "LossTraits") -> str:
        """The reduction a loss with ``traits`` must use here: ``"mean"`` (a scalar the host
        adds to its other terms), or ``"sum"`` on a normalised head for a loss that takes no
        normaliser (the host divides the sum)."""
        return "sum" if self.normalised and not traits.normalizer else "mean"


HEADS: Dict[str, Head] = {
    "cls": Head("an image classifier ([N, C] logits, targets in [0, C))", ("none", "index")),
    "seg": Head("a per-pixel classifier ([B, C, H, W] logits, ignored pixels)",
                ("none", "index")),
    "roi": Head("a two-stage (R-CNN) box classifier, whose background RoIs have target C",
                ("column", "two_columns", "index")),
    "dense": Head("a one-stage dense head (RetinaNet, FCOS): C sigmoid channels per anchor, "
                  "background anchors, normalised by the positives", ("index",),
                  provides_quality=True, normalised=True, activations=("sigmoid",)),
}


@dataclass(frozen=True)
class Param:
    """A hyper-parameter a loss's constructor takes: its type and range.

    ``kind`` is ``float``, ``int``, ``bool``, ``str`` or ``"vector"`` (a per-class sequence of
    numbers); ``low`` / ``high`` bound numbers (``*_open`` excludes the bound); ``choices``
    lists the allowed strings; ``optional`` allows ``None``; ``config`` is False for
    arguments a configuration file cannot give (objects such as a shared statistics module).

    >>> Param(float, low=0).check("tau", 2, "SoftmaxEQLLoss")
    2.0
    >>> Param(float, low=0).check("tau", "abc", "SoftmaxEQLLoss")
    Traceback (most recent call last):
    ...
    ValueError: SoftmaxEQLLoss: tau must be a number >= 0, got 'abc'
    """

    kind: Any
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[Tuple[Any, ...]] = None
    optional: bool = False
    config: bool = True
    doc: str = ""

    def describe(self) -> str:
        """The expected value in words, e.g. ``a number > 0``."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind is float or self.kind is int:
            text = "a number" if self.kind is float else "an integer"
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
            if bounds:
                text += " " + " and ".join(bounds)
        elif self.kind is bool:
            text = "true or false"
        elif self.kind is str:
            text = "a string"
        elif self.kind == "vector":
            text = "a per-class list of numbers"
        else:
            text = f"a {getattr(self.kind, '__name__', self.kind)}"
        return text + (" or null" if self.optional else "")

    def check(self, name: str, value: Any, owner: str) -> Any:
        """``value`` if it fits (ints are turned into floats for float parameters), else a
        ``ValueError`` naming ``owner``, ``name``, what was expected and what was given."""
        def bad() -> ValueError:
            shown = value if not isinstance(value, torch.Tensor) else \
                f"a tensor of shape {tuple(value.shape)}"
            return ValueError(f"{owner}: {name} must be {self.describe()}, got {shown!r}")

        if value is None:
            if self.optional:
                return None
            raise bad()
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad()
            return value
        if self.kind is float or self.kind is int:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if not (isinstance(value, torch.Tensor) and value.numel() == 1
                        and not value.dtype == torch.bool):
                    raise bad()
                value = value.item()
            if self.kind is int and not float(value).is_integer():
                raise bad()
            number = float(value)
            if math.isnan(number) or (self.kind is int and isinstance(value, float)):
                raise bad()
            if self.low is not None and (number < self.low
                                         or (self.low_open and number == self.low)):
                raise bad()
            if self.high is not None and (number > self.high
                                          or (self.high_open and number == self.high)):
                raise bad()
            if math.isinf(number):
                raise bad()
            return int(value) if self.kind is int else number
        if self.kind is str:
            if not isinstance(value, str) or (self.choices is not None
                                              and value not in self.choices):
                raise bad()
            return value
        if self.kind == "vector":
            if isinstance(value, torch.Tensor):
                if value.dim() != 1 or value.is_complex() or value.dtype == torch.bool:
                    raise bad()
                return value
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise bad()
            return value
        if not isinstance(value, self.kind):
            raise bad()
        return value


#: parameters every loss of the package takes
IGNORE_INDEX = Param(int, doc="target value of rows (pixels) that count nowhere")
REDUCTION = Param(str, choices=("mean", "sum", "none"), doc="how the per-row losses are "
                                                            "reduced")


@dataclass(frozen=True)
class LossTraits:
    """What a host needs to know about a loss class (see the module docstring).

    Args:
        activation: ``"sigmoid"`` or ``"softmax"``: how the loss turns logits into
            probabilities (its ``scores`` follow it).
        backgrounds: background convention -> the constructor keyword arguments that select
            it (``{}`` for a loss with a single convention); the first entry is the default.
        heads: the heads (:data:`HEADS`) the loss is meant for.
        params: constructor hyper-parameters with their types and ranges (the statistics
            arguments below excluded), so arguments are checked before any data is loaded.
        statistics: constructor argument -> training statistic that fills it (``"counts"``
            or ``"frequency"``, :data:`STATISTICS`), given by the host from the training set
            unless the caller gives the argument.
        normalizer: ``forward`` takes ``normalizer=`` (the number of positives to divide by).
        quality: ``forward`` needs ``quality=`` (a float target per row, e.g. IoU).
        pixels: how a per-pixel host feeds ``[B, C, H, W]`` logits: ``"native"`` (the loss
            takes them as they are) or ``"rows"`` (as ``[B*H*W, C]`` rows).
        stochastic: the constructor takes ``generator=`` (a ``torch.Generator``) for its
            random draws; hosts give one per process and checkpoint it.
        gradient_statistics: the loss keeps a :class:`~eqlosses.GradientStatistics` as
            ``.stats`` (updated once per training forward, one all-reduce).
        track_statistics: the constructor takes ``track_statistics=`` (default False): with
            True, a loss whose terms need no statistics (a baseline) keeps a
            :class:`~eqlosses.GradientStatistics` as ``.stats`` all the same, updated once per
            training forward with the closed-form per-class gradient magnitudes of its own
            loss (one all-reduce; the loss and its gradient are unchanged), for diagnosis.
            :func:`eqlosses.losses.build_loss_for`, and so the pipelines, turn it on.
    """

    activation: str
    backgrounds: Mapping[str, Mapping[str, Any]]
    heads: Tuple[str, ...]
    params: Mapping[str, Param] = field(default_factory=dict)
    statistics: Mapping[str, str] = field(default_factory=dict)
    normalizer: bool = False
    quality: bool = False
    pixels: str = "rows"
    stochastic: bool = False
    gradient_statistics: bool = False
    track_statistics: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got "
                             f"{self.activation!r}")
        if not self.backgrounds or any(b not in BACKGROUNDS for b in self.backgrounds):
            raise ValueError(f"backgrounds must map some of {BACKGROUNDS} to keyword "
                             f"arguments, got {dict(self.backgrounds)}")
        unknown = [h for h in self.heads if h not in HEADS]
        if unknown or not self.heads:
            raise ValueError(f"heads must be some of {tuple(HEADS)}, got {self.heads}")
        for head in self.heads:
            if not any(b in self.backgrounds for b in HEADS[head].backgrounds):
                raise ValueError(f"head {head!r} accepts the background conventions "
                                 f"{HEADS[head].backgrounds}, none of which the loss "
                                 f"declares ({tuple(self.backgrounds)})")
        bad = {k: v for k, v in self.statistics.items() if v not in STATISTICS}
        if bad:
            raise ValueError(f"statistics must map arguments to {tuple(STATISTICS)}, got {bad}")
        if self.gradient_statistics and self.track_statistics:
            raise ValueError("a loss with gradient_statistics always keeps them; "
                             "track_statistics is for losses that keep none otherwise")
        if self.pixels not in ("native", "rows"):
            raise ValueError(f"pixels must be 'native' or 'rows', got {self.pixels!r}")

    def all_params(self) -> Dict[str, Param]:
        """Every keyword argument the constructor takes besides ``num_classes``."""
        params = dict(self.params)
        params.update({name: Param("vector") for name in self.statistics})
        if self.stochastic:
            params["generator"] = Param(torch.Generator, optional=True, config=False)
        if self.gradient_statistics:
            from ..stats import GradientStatistics

            params["stats"] = Param(GradientStatistics, optional=True, config=False)
        if self.track_statistics:
            params["track_statistics"] = Param(bool, doc="record per-class gradient "
                                                         "statistics (diagnosis)")
        params.setdefault("ignore_index", IGNORE_INDEX)
        params.setdefault("validate", Param(bool, doc="check target values (host syncs)"))
        return params

    def background_of(self, extra_channels: int, head: Optional[str] = None) -> Optional[str]:
        """The convention of an instance with ``extra_channels`` channels beyond ``C``: among
        the declared ones with that many channels, the first ``head`` accepts (when given),
        else the first declared."""
        matching = [n for n in self.backgrounds if EXTRA_CHANNELS[n] == extra_channels]
        accepted = [n for n in matching if head is None or n in HEADS[head].backgrounds]
        return (accepted or matching or [None])[0]

    def background_for(self, head: str, kwargs: Mapping[str, Any]) -> Optional[str]:
        """The convention a loss built with ``kwargs`` for ``head`` uses: the head's most
        preferred convention among those the loss declares and the arguments allow (a switch
        given in ``kwargs`` allows only the conventions it selects); None if there is none.

        >>> t = LossTraits("softmax", {"none": {"background": False},
        ...                            "column": {"background": True}}, ("cls", "roi"))
        >>> t.background_for("roi", {}), t.background_for("roi", {"background": False})
        ('column', None)
        """
        allowed = [name for name, sel in self.backgrounds.items()
                   if all(kwargs[k] == v for k, v in sel.items() if k in kwargs)]
        return next((b for b in HEADS[head].backgrounds if b in allowed), None)


@dataclass(frozen=True)
class ClassStatistics:
    """Training-set statistics a host hands to losses that need them.

    ``counts[j]`` is the number of training samples of class ``j`` in the task's unit
    (images; for detection the images containing the class; for segmentation pixels);
    ``total`` the number of samples the frequencies are relative to (images, or pixels).

    >>> s = ClassStatistics(torch.tensor([90, 10]), total=100)
    >>> s.value("frequency")
    tensor([0.9000, 0.1000], dtype=torch.float64)
    """

    counts: torch.Tensor
    total: float
    unit: str = "images"

    def __post_init__(self) -> None:
        counts = torch.as_tensor(self.counts)
        if counts.dim() != 1 or counts.is_complex() or bool((counts < 0).any()):
            raise ValueError(f"counts must be a 1-D tensor of non-negative numbers, got "
                             f"{tuple(counts.shape)}")
        object.__setattr__(self, "counts", counts.to(torch.float64))
        if not float(self.total) > 0:
            raise ValueError(f"total must be > 0, got {self.total}")

    @classmethod
    def from_labels(cls, labels: Sequence[int], num_classes: int) -> "ClassStatistics":
        """Counts of single-label samples (one label per image)."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        counts = torch.bincount(labels, minlength=num_classes)[:num_classes]
        return cls(counts, max(int(labels.numel()), 1))

    def value(self, statistic: str) -> torch.Tensor:
        """``"counts"`` or ``"frequency"`` as a float64 ``[C]`` tensor."""
        if statistic == "counts":
            return self.counts
        if statistic == "frequency":
            return self.counts / float(self.total)
        raise ValueError(f"unknown statistic {statistic!r}; choose one of {tuple(STATISTICS)}")
