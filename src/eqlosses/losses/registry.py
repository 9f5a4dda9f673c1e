"""Losses by name, and the one place that answers "does this loss fit this head, and how is
it built" (see :mod:`eqlosses.losses.contract` for the declared traits it reads)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Type, Union

import torch
from torch import nn

from .contract import HEADS, ClassStatistics, LossTraits
from .focal import EqualizedFocalLoss, EqualizedQualityFocalLoss, FocalLoss
from .seesaw import SeesawLoss
from .sigmoid import BCELoss, EQLLoss, FederatedLoss
from .sigmoid_eql import SigmoidEQLLoss
from .softmax import BalancedSoftmaxLoss, CrossEntropyLoss, EQLSoftmaxLoss, SoftmaxEQLLoss

__all__ = ["LOSSES", "TASK_HEADS", "register_loss", "loss_class", "build_loss",
           "build_loss_for", "check_loss_args", "check_loss_config", "check_fits",
           "losses_for", "head_for", "default_hparams"]

#: registry name -> loss class (add your own with :func:`register_loss`)
LOSSES: Dict[str, Type[nn.Module]] = {
    "ce": CrossEntropyLoss,
    "bce": BCELoss,
    "focal": FocalLoss,
    "balanced_softmax": BalancedSoftmaxLoss,
    "softmax_eql": SoftmaxEQLLoss,
    "sigmoid_eql": SigmoidEQLLoss,
    "efl": EqualizedFocalLoss,
    "eqfl": EqualizedQualityFocalLoss,
    "eql": EQLLoss,
    "eql_softmax": EQLSoftmaxLoss,
    "seesaw": SeesawLoss,
    "federated": FederatedLoss,
}

#: the heads of each task of :mod:`eqlosses.tasks` (detection: by architecture)
TASK_HEADS: Dict[str, Dict[Optional[str], str]] = {
    "cls": {None: "cls"},
    "seg": {None: "seg"},
    "det": {"faster_rcnn": "roi", "mask_rcnn": "roi", "retinanet": "dense", "fcos": "dense"},
}

LossSpec = Union[str, Type[nn.Module]]


def register_loss(name: str) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    """Class decorator: make a loss of your own buildable by ``name`` (in configurations too).

    The class must declare ``traits`` (a :class:`~eqlosses.losses.contract.LossTraits`).

    >>> from eqlosses.losses import CrossEntropyLoss
    >>> @register_loss("my_ce")
    ... class MyCE(CrossEntropyLoss):
    ...     pass
    >>> "my_ce" in losses_for("cls")
    True
    >>> del LOSSES["my_ce"]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a loss name must be a non-empty string, got {name!r}")

    def decorate(cls: Type[nn.Module]) -> Type[nn.Module]:
        _check_declares_traits(cls, name)
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"loss name {name!r} is already taken by "
                             f"{LOSSES[name].__name__}")
        LOSSES[name] = cls
        return cls

    return decorate


def _check_declares_traits(cls: Any, name: str) -> LossTraits:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"loss {name!r} must be an nn.Module class, got {cls!r}")
    traits = getattr(cls, "traits", None)
    if not isinstance(traits, LossTraits):
        raise ValueError(f"loss {name!r} ({cls.__name__}) declares no `traits` (a "
                         f"eqlosses.losses.contract.LossTraits class attribute), so no host "
                         f"can tell how to feed it")
    return traits


def loss_class(name: LossSpec) -> Type[nn.Module]:
    """The loss class of a registry name, of ``"package.module:ClassName"`` (imported), or
    the class itself; it must declare ``traits``."""
    if isinstance(name, type):
        _check_declares_traits(name, name.__name__)
        return name
    if not isinstance(name, str):
        raise ValueError(f"a loss is named by a string, got {name!r}")
    if name in LOSSES:
        return LOSSES[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import loss {name!r}: {err}") from None
        _check_declares_traits(cls, name)
        return cls
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}, or "
                     f"name a class of your own as 'package.module:ClassName'")


def _name_of(name: LossSpec) -> str:
    return name if isinstance(name, str) else name.__name__


def head_for(task: str, arch: Optional[str] = None) -> str:
    """The head of ``task`` (``cls``, ``seg``, or ``det`` with its ``arch``).

    >>> head_for("det", "retinanet")
    'dense'
    """
    if task not in TASK_HEADS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_HEADS)}")
    heads = TASK_HEADS[task]
    key = arch if task == "det" else None
    if key not in heads:
        raise ValueError(f"unknown {task} architecture {arch!r}; choose one of "
                         f"{', '.join(k for k in heads if k)}")
    return heads[key]


def losses_for(head: str) -> List[str]:
    """Registry names of the losses that fit ``head`` (``cls``, ``seg``, ``roi``, ``dense``),
    or a task (``det``: those of ``roi`` and ``dense``).

    >>> losses_for("dense")
    ['bce', 'efl', 'eqfl', 'eql', 'federated', 'focal']
    """
    if head == "det":
        return sorted(set(losses_for("roi")) | set(losses_for("dense")))
    _check_head(head)
    return sorted(name for name, cls in LOSSES.items() if _unfit_reason(cls, head) is None)


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")


def _unfit_reason(cls: Type[nn.Module], head: str,
                  kwargs: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Why a loss class (built with ``kwargs``) does not fit ``head``, or None."""
    traits: LossTraits = cls.traits  # type: ignore[attr-defined]
    spec = HEADS[head]
    if head not in traits.heads:
        return f"it declares the heads {', '.join(traits.heads)} only"
    if traits.activation not in spec.activations:
        return (f"it is a {traits.activation} loss; this head scores with "
                f"{' or '.join(spec.activations)}")
    if traits.quality and not spec.provides_quality:
        return f"it needs a quality target per row, which {spec.description} does not provide"
    if kwargs is not None and traits.background_for(head, kwargs) is None:
        switches = sorted({k for sel in traits.backgrounds.values() for k in sel if k in kwargs})
        return (f"with {', '.join(f'{k}={kwargs[k]!r}' for k in switches)} its background "
                f"convention is not one this head feeds ({', '.join(spec.backgrounds)})")
    return None


def _head_text(head: str) -> str:
    return f"the {head} head ({HEADS[head].description})"


def _fitting_message(head: str) -> str:
    return f"losses that fit: {', '.join(losses_for(head))}"


def check_loss_args(head: str, name: LossSpec, kwargs: Mapping[str, Any],
                    from_config: bool = False) -> Type[nn.Module]:
    """Check that loss ``name`` fits ``head`` and that ``kwargs`` are arguments it takes,
    of the declared types and ranges; returns the loss class. Raises one ``ValueError``
    naming the problem and what would fit. Needs no data, so configurations are checked
    before anything is loaded.

    >>> check_loss_args("cls", "softmax_eql", {"tau": "abc"})
    Traceback (most recent call last):
    ...
    ValueError: SoftmaxEQLLoss: tau must be a number >= 0, got 'abc'
    >>> check_loss_args("roi", "softmax_eql", {})
    Traceback (most recent call last):
    ...
    ValueError: loss 'softmax_eql' does not fit the roi head (a two-stage (R-CNN) box classifier, whose background RoIs have target C): it declares the heads cls, seg only; losses that fit: bce, ce, eql, eql_softmax, federated, seesaw, sigmoid_eql
    """
    _check_head(head)
    cls = _checked_kwargs(name, kwargs, from_config)
    traits: LossTraits = cls.traits  # type: ignore[attr-defined]
    reason = _unfit_reason(cls, head, kwargs)
    if reason is not None:
        raise ValueError(f"loss {_name_of(name)!r} does not fit {_head_text(head)}: "
                         f"{reason}; {_fitting_message(head)}")
    required = HEADS[head].reduction_for(traits)
    if "reduction" in traits.params and kwargs.get("reduction", required) != required:
        raise ValueError(f"loss {_name_of(name)!r} on {_head_text(head)} needs "
                         f"reduction={required!r} ({_REDUCTION_WHY[required]}), got "
                         f"reduction={kwargs['reduction']!r}")
    return cls


_REDUCTION_WHY = {"mean": "the host adds one scalar per term; a loss with a normaliser "
                          "divides by it",
                  "sum": "it takes no normaliser; the head divides the sum by the positives"}


def _checked_kwargs(name: LossSpec, kwargs: Mapping[str, Any],
                    from_config: bool = False) -> Type[nn.Module]:
    """The loss class, after checking that it takes ``kwargs`` with valid values."""
    cls = loss_class(name)
    params = cls.traits.all_params()  # type: ignore[attr-defined]
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        valid = [k for k, p in params.items() if p.config or not from_config]
        raise ValueError(f"loss {_name_of(name)!r} ({cls.__name__}) takes no argument "
                         f"{', '.join(map(repr, unknown))}; its arguments: "
                         f"{', '.join(sorted(valid))}")
    for key, value in kwargs.items():
        if from_config and not params[key].config:
            raise ValueError(f"loss argument {key!r} of {cls.__name__} cannot be given in a "
                             f"configuration (it is an object built in code)")
        params[key].check(key, value, cls.__name__)
    return cls


def check_loss_config(task: str, name: LossSpec, kwargs: Mapping[str, Any],
                      arch: Optional[str] = None) -> None:
    """:func:`check_loss_args` for a task's configuration (``cls``, ``seg``, or ``det``
    with ``arch``): arguments that only code can give (objects) are refused."""
    check_loss_args(head_for(task, arch), name, kwargs, from_config=True)


def build_loss(name: LossSpec, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a loss by registry name with its own defaults, e.g.
    ``build_loss("softmax_eql", 10, tau=1.5)``; arguments are checked against its traits.
    To build a loss for a particular head, with its conventions and training statistics
    filled in, use :func:`build_loss_for`.

    >>> build_loss("sigmoid_eql", 5).num_channels
    6
    """
    return _checked_kwargs(name, kwargs)(num_classes, **kwargs)


def build_loss_for(head: str, name: LossSpec, num_classes: int,
                   statistics: Optional[ClassStatistics] = None,
                   generator: Optional[torch.Generator] = None,
                   ignore_index: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """Build loss ``name`` for ``head``, with the head's conventions and the training
    statistics filled in (arguments given in ``kwargs`` win).

    * the background convention: the head's most preferred one the loss supports (e.g.
      ``ce`` gets ``background=True`` on an R-CNN box classifier, ``sigmoid_eql`` gets
      ``objectness=False`` on an image classifier);
    * the training statistics named in ``traits.statistics`` from ``statistics`` (e.g.
      ``class_counts`` of balanced softmax, ``class_frequency`` of EQL);
    * ``generator`` for stochastic losses, ``ignore_index`` when given;
    * ``track_statistics=True`` for a loss that can record gradient statistics without
      needing them (the baselines: cross-entropy, BCE, focal, balanced softmax, ...), so that
      every hosted loss has ``.stats`` for diagnosis (give ``track_statistics=False`` to
      skip it);
    * on a dense head, ``reduction="sum"`` for a loss without a ``normalizer`` argument (the
      head divides by the positives).

    Raises ``ValueError`` (one message naming the problem and the losses that fit) for a loss
    that does not fit the head, a bad argument, or missing statistics.

    >>> from eqlosses.losses.contract import ClassStatistics
    >>> stats = ClassStatistics(torch.tensor([50, 5, 1]), total=56)
    >>> build_loss_for("roi", "ce", 3).num_channels  # a background column
    4
    >>> loss = build_loss_for("cls", "balanced_softmax", 3, stats)  # class_counts filled in
    >>> (loss.adjustment.exp() * 56).round()  # log prior: the training counts / 56
    tensor([50.,  5.,  1.])
    """
    cls = check_loss_args(head, name, kwargs)
    traits: LossTraits = cls.traits  # type: ignore[attr-defined]
    kwargs = dict(kwargs)
    background = traits.background_for(head, kwargs)
    kwargs.update({k: v for k, v in traits.backgrounds[background].items()})  # type: ignore
    for arg, statistic in traits.statistics.items():
        if arg in kwargs:
            continue
        if statistics is None:
            raise ValueError(f"loss {_name_of(name)!r} needs the training {statistic} of each "
                             f"class for {arg!r}: give statistics= (a ClassStatistics) or "
                             f"{arg}=")
        if statistics.counts.shape != (num_classes,):
            raise ValueError(f"statistics have {statistics.counts.numel()} classes, the loss "
                             f"is built for num_classes={num_classes}")
        kwargs[arg] = statistics.value(statistic)
    if traits.stochastic and generator is not None:
        kwargs.setdefault("generator", generator)
    if traits.track_statistics:
        kwargs.setdefault("track_statistics", True)
    if ignore_index is not None:
        kwargs.setdefault("ignore_index", ignore_index)
    if "reduction" in traits.params:
        kwargs.setdefault("reduction", HEADS[head].reduction_for(traits))
    return cls(num_classes, **kwargs)


def check_fits(loss: nn.Module, head: str, num_classes: Optional[int] = None) -> LossTraits:
    """Check that a built ``loss`` can be hosted by ``head`` (and was built for
    ``num_classes``); returns its traits. Hosts call this instead of probing the loss.

    >>> from eqlosses.losses import CrossEntropyLoss
    >>> check_fits(CrossEntropyLoss(3), "roi")
    Traceback (most recent call last):
    ...
    ValueError: CrossEntropyLoss(background=False) does not fit the roi head (a two-stage (R-CNN) box classifier, whose background RoIs have target C): it has no background convention the head feeds (its convention: none; the head feeds column, two_columns, index); build it with background=True, or with eqlosses.losses.build_loss_for('roi', ...), which chooses for the head; losses that fit: bce, ce, eql, eql_softmax, federated, seesaw, sigmoid_eql
    """
    _check_head(head)
    missing = [a for a in ("traits", "num_classes", "num_channels", "ignore_index", "scores")
               if not hasattr(loss, a)]
    if not isinstance(loss, nn.Module) or missing:
        raise ValueError(f"a hosted loss must be an nn.Module with traits, num_classes, "
                         f"num_channels, ignore_index and scores() (an eqlosses loss, or one "
                         f"that declares the same); {type(loss).__name__} lacks "
                         f"{', '.join(missing) or 'nn.Module'}")
    traits = _check_declares_traits(type(loss), type(loss).__name__)
    if num_classes is not None and loss.num_classes != num_classes:
        raise ValueError(f"the loss was built for num_classes={loss.num_classes}, the model "
                         f"for num_classes={num_classes}")
    shown = _describe(loss, traits)
    reason = _unfit_reason(type(loss), head)
    if reason is not None:
        raise ValueError(f"{shown} does not fit {_head_text(head)}: {reason}; "
                         f"{_fitting_message(head)}")
    extra = int(loss.num_channels) - int(loss.num_classes)
    convention = traits.background_of(extra, head)
    if convention not in HEADS[head].backgrounds:
        wanted = traits.backgrounds[traits.background_for(head, {})]  # type: ignore[index]
        how = ", ".join(f"{k}={v!r}" for k, v in wanted.items())
        raise ValueError(f"{shown} does not fit {_head_text(head)}: it has no "
                         f"background convention the head feeds (its convention: "
                         f"{convention or f'{extra} extra channels'}; the head feeds "
                         f"{', '.join(HEADS[head].backgrounds)}); build it with {how}, or "
                         f"with eqlosses.losses.build_loss_for({head!r}, ...), which chooses "
                         f"for the head; {_fitting_message(head)}")
    required = HEADS[head].reduction_for(traits)
    reduction = getattr(loss, "reduction", required)
    if "reduction" in traits.params and reduction != required:
        raise ValueError(f"{shown} on {_head_text(head)} must be built with "
                         f"reduction={required!r} ({_REDUCTION_WHY[required]}), got "
                         f"reduction={reduction!r}")
    return traits


def default_hparams(name: LossSpec) -> Dict[str, Any]:
    """The hyper-parameters a loss takes when they are not given (read from an instance
    built for one class with placeholder statistics), e.g. to compare a configuration with
    what a run used.

    >>> default_hparams("softmax_eql")["tau"]
    1.0
    """
    import warnings

    cls = loss_class(name)
    traits: LossTraits = cls.traits  # type: ignore[attr-defined]
    placeholders = {arg: torch.ones(1) for arg in traits.statistics}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. EQL's "no rare class" for the placeholder
        loss = cls(1, **placeholders)
    names = list(traits.params) + ["ignore_index"]
    return {k: getattr(loss, k) for k in names if hasattr(loss, k)}


def _describe(loss: nn.Module, traits: LossTraits) -> str:
    switches = sorted({k for sel in traits.backgrounds.values() for k in sel})
    args = ", ".join(f"{k}={getattr(loss, k)!r}" for k in switches if hasattr(loss, k))
    return f"{type(loss).__name__}({args})"

