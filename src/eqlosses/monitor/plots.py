"""Figures for long-tailed training: gradient ratios, their evolution, per-class and group
accuracy, training curves.

Needs matplotlib (``pip install eqlosses[plot]``), imported only when a function is called.
Every ``plot_*`` function returns the :class:`matplotlib.figure.Figure` it drew on, writes it
as a PNG when ``out_png`` is given (creating parent directories), and draws into the caller's
axes when ``ax=`` is given (then the figure is ``ax.figure``). Figures the functions create
are Agg figures that pyplot never sees: nothing opens a window, the caller's backend is left
alone, no figure stays registered, and nothing is downloaded (no web fonts).

Classes are shown sorted by training count, most frequent (head) on the left, ties in class
order; without ``train_counts`` they are shown in class order. Up to 60 classes every class is
a tick, labelled with its name when ``class_names`` is given (else its index); with more, the
axis is the frequency rank. Legends sit above the axes, never over the data.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_gradient_ratio", "plot_gradient_ratio_runs", "plot_ratio_evolution",
           "plot_ratio_evolution_runs",
           "plot_per_class_accuracy", "plot_group_accuracy", "plot_training_curves",
           "MAX_CLASS_TICKS"]

PathLike = Union[str, "os.PathLike[str]"]

_DPI = 120
#: up to this many classes, every class is a tick (named when names are given)
MAX_CLASS_TICKS = 60
_RATIO_LABEL = "gradient ratio P / N (accumulated)"


def _new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1,
                **subplot_kw: Any) -> Tuple["Figure", List["Axes"]]:
    """A pyplot-free Agg figure and its axes (row-major)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("eqlosses.monitor.plots needs matplotlib: "
                          "pip install eqlosses[plot]") from err
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, list(axes.ravel())


def _finish(fig: "Figure", out_png: Optional[PathLike]) -> "Figure":
    if out_png is not None:
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=_DPI)
    return fig


def _as_counts(train_counts: Any, c: Optional[int] = None) -> Optional[np.ndarray]:
    if train_counts is None:
        return None
    counts = np.asarray(train_counts.tolist() if hasattr(train_counts, "tolist")
                        else list(train_counts), dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"train_counts must be a non-empty 1-d sequence [C], got shape "
                         f"{counts.shape}")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("train_counts must be finite and non-negative")
    return counts


def _order(counts: Optional[np.ndarray], c: int) -> np.ndarray:
    """Class indices sorted by training count, descending (ties in class order)."""
    if counts is None:
        return np.arange(c)
    return np.argsort(-counts, kind="stable")


def _names(class_names: Optional[Sequence[str]], c: int) -> Optional[List[str]]:
    if class_names is None:
        return None
    names = [str(n) for n in class_names]
    if len(names) != c:
        raise ValueError(f"class_names must name the {c} classes, got {len(names)} names")
    return names


def _per_class(values: Any, c: int, what: str) -> np.ndarray:
    if values is None:
        raise ValueError(f"{what} is missing (null): the record has no gradient statistics; "
                         f"was it recorded for a loss without `stats`?")
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (c,):
        raise ValueError(f"{what} must have one value per class ({c} from train_counts), got "
                         f"shape {arr.shape}")
    return arr


def _class_label(j: int, names: Optional[List[str]]) -> str:
    return names[j] if names is not None else f"class {j}"


def _class_axis(ax: "Axes", order: np.ndarray, names: Optional[List[str]],
                sorted_by_count: bool) -> None:
    """x axis of classes: a tick per class (name or index) when few, the rank otherwise."""
    c = order.size
    ax.set_xlim(-0.6, c - 0.4)
    how = "sorted by training count (head \u2192 tail)" if sorted_by_count else "in class order"
    if c <= MAX_CLASS_TICKS:
        ax.set_xticks(np.arange(c))
        if names is not None:
            ax.set_xticklabels([names[j] for j in order], fontsize=8, rotation=60,
                               ha="right", rotation_mode="anchor")
            ax.set_xlabel(f"class, {how}")
        else:
            ax.set_xticklabels([str(j) for j in order], fontsize=8 if c > 20 else 9)
            ax.set_xlabel(f"class index, {how}")
    elif sorted_by_count:
        ax.set_xlabel("class rank by training count (0 = most frequent, head \u2192 tail)")
    else:
        ax.set_xlabel("class index")


def _count_twin(ax: "Axes", sorted_counts: np.ndarray, kind: str = "line") -> "Axes":
    """The training counts on a secondary log-scale y axis, drawn behind ``ax``."""
    twin = ax.twinx()
    x = np.arange(sorted_counts.size)
    shown = np.where(sorted_counts > 0, sorted_counts, np.nan)
    if kind == "bar":
        twin.bar(x, shown, width=0.9, color="0.6", alpha=0.25, label="training count")
    else:
        twin.plot(x, shown, color="0.45", lw=1.2, ls="--", label="training count")
    if np.isfinite(shown).any():
        twin.set_yscale("log")
    twin.set_ylabel("training count (log)", color="0.35")
    twin.tick_params(axis="y", colors="0.35")
    ax.set_zorder(twin.get_zorder() + 1)  # the data of ``ax`` above the counts
    ax.patch.set_visible(False)
    return twin


def _legend_above(ax: "Axes", handles: Sequence[Any], labels: Sequence[str],
                  ncols: Optional[int] = None) -> int:
    """A frameless legend just above the axes (never over the data); returns its rows."""
    if not handles:
        return 0
    ncols = ncols or min(len(handles), 4)
    ax.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncols=ncols,
              frameon=False, fontsize=8, borderaxespad=0.0, handlelength=1.6)
    return math.ceil(len(handles) / ncols)


def _title(ax: "Axes", title: str, legend_rows: int = 0) -> None:
    ax.set_title(title, pad=6 + 14 * legend_rows)


def _width(c: int) -> float:
    return float(min(16.0, max(7.0, 2.5 + 0.22 * c)))


def _step_title(base: str, record: Mapping[str, Any]) -> str:
    step = record.get("step")
    return base + (f" (step {step})" if step is not None else "")


# --------------------------------------------------------------------------------------------
# Inputs that may be a run directory, a statistics file, a history or records
# --------------------------------------------------------------------------------------------

def _latest_record(record: Any) -> Mapping[str, Any]:
    from .recorder import StatsHistory, latest_stats

    if isinstance(record, StatsHistory):
        return record.record(-1)
    if isinstance(record, (str, os.PathLike)):
        latest = latest_stats(record)
        if latest is None:
            raise ValueError(f"{record} holds no statistics record yet")
        return latest
    if not isinstance(record, Mapping):
        raise ValueError(f"record must be a statistics record (a dict with 'ratio'), a "
                         f"StatsHistory or a path, got {type(record).__name__}")
    return record


def _ratio_series(history: Any, c: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(steps [T], ratios [T, C]) of a history, a path or a sequence of records."""
    from .recorder import StatsHistory, read_stats

    if isinstance(history, (str, os.PathLike)):
        history = read_stats(history, fields=["ratio"])
    if isinstance(history, StatsHistory):
        if history.ratio is None:
            raise ValueError(f"{history.path} has no gradient ratio (a loss without `stats`, "
                             f"or not read: read_stats(..., fields=['ratio']))")
        steps, ratios = history.steps.astype(np.float64), history.ratio.astype(np.float64)
        if not len(steps):
            raise ValueError(f"{history.path} holds no statistics record yet")
    else:
        records = list(history)
        usable = [r for r in records if r.get("ratio") is not None]
        if not usable:
            raise ValueError(f"none of the {len(records)} records has a gradient ratio "
                             f"(records of a loss without `stats`?)")
        c = c if c is not None else len(usable[0]["ratio"])
        steps = np.array([float(r["step"]) for r in usable])
        ratios = np.stack([_per_class(r["ratio"], c, f"ratio of the record of step "
                                                     f"{r['step']}") for r in usable])
    if c is not None and ratios.shape[1] != c:
        raise ValueError(f"the ratios must have one value per class ({c} from train_counts), "
                         f"got {ratios.shape[1]}")
    return steps, ratios


# --------------------------------------------------------------------------------------------
# Gradient ratio (the paper's figure 1)
# --------------------------------------------------------------------------------------------

def plot_gradient_ratio(record: Any, train_counts: Any = None,
                        out_png: Optional[PathLike] = None, title: Optional[str] = None,
                        grads: bool = True, *, class_names: Optional[Sequence[str]] = None,
                        ax: Union["Axes", Sequence["Axes"], None] = None) -> "Figure":
    """Bar chart of the accumulated gradient ratio ``P_j / N_j`` of every class.

    The paper's figure 1: classes sorted by training count (head on the left), a dotted line
    at the balanced ratio 1 and the training counts on a secondary log axis. With ``grads``
    (and when the record has them) a second panel shows ``P_j`` and ``N_j`` on a log scale.

    Args:
        record: a statistics snapshot (a dict with ``ratio`` and optionally ``pos_grad``,
            ``neg_grad``, ``step``: :func:`~eqlosses.monitor.latest_stats`,
            :meth:`StatsHistory.record`), a :class:`~eqlosses.monitor.StatsHistory` (its
            latest snapshot) or a run directory / statistics file.
        train_counts: ``[C]`` training samples per class (None: classes in index order).
        out_png: the image file to write, if any.
        title: the title of the ratio panel (default: names the record's step).
        grads: whether to draw the second panel.
        class_names: ``[C]`` names for the class axis (used up to 60 classes).
        ax: draw into this axes (the ratio panel only) or pair of axes (ratio, gradients).

    Returns:
        The figure.

    Example:
        >>> fig = plot_gradient_ratio({"step": 5, "ratio": [1.0, 0.2], "pos_grad": [4.0, 1.0],
        ...                            "neg_grad": [4.0, 5.0]}, [100, 3],
        ...                           class_names=["cat", "okapi"])
        >>> [t.get_text() for t in fig.axes[1].get_xticklabels()]
        ['cat', 'okapi']
    """
    record = _latest_record(record)
    counts = _as_counts(train_counts)
    ratio_values = record.get("ratio")
    c = counts.size if counts is not None else (
        len(ratio_values) if ratio_values is not None else 0)
    names = _names(class_names, c)
    order = _order(counts, c)
    ratio = _per_class(ratio_values, c, "record['ratio']")[order]
    with_grads = (grads and record.get("pos_grad") is not None
                  and record.get("neg_grad") is not None)
    if ax is None:
        fig, axes = _new_figure(_width(c), 6.6 if with_grads else 4.0,
                                nrows=2 if with_grads else 1, sharex=True)
    else:
        axes = [ax] if not isinstance(ax, (list, tuple)) else list(ax)
        fig = axes[0].figure
        with_grads = with_grads and len(axes) > 1
    rax = axes[0]
    x = np.arange(c)
    rax.bar(x, ratio, width=0.8 if c <= 100 else 1.0, linewidth=0, color="tab:blue",
            label="gradient ratio P / N")
    rax.axhline(1.0, color="tab:red", lw=1, ls=":", label="balanced (ratio = 1)")
    rax.set_ylabel(_RATIO_LABEL)
    rax.set_ylim(bottom=0, top=max(1.1, float(np.nanmax(ratio, initial=0)) * 1.08))
    handles, labels = rax.get_legend_handles_labels()
    if counts is not None:
        th, tl = _count_twin(rax, counts[order]).get_legend_handles_labels()
        handles, labels = handles + th, labels + tl
    rows = _legend_above(rax, handles, labels)
    _title(rax, title if title is not None else _step_title(
        "Accumulated positive / negative gradient ratio per class", record), rows)
    if with_grads:
        gax = axes[1]
        pos = _per_class(record["pos_grad"], c, "record['pos_grad']")[order]
        neg = _per_class(record["neg_grad"], c, "record['neg_grad']")[order]
        few = c <= 100  # markers only while they stay distinguishable
        gax.plot(x, np.where(pos > 0, pos, np.nan), marker="o" if few else None, ms=3,
                 color="tab:green", label="positive gradient P")
        gax.plot(x, np.where(neg > 0, neg, np.nan), marker="s" if few else None, ms=3,
                 color="tab:orange", label="negative gradient N")
        if (pos > 0).any() or (neg > 0).any():
            gax.set_yscale("log")
        gax.set_ylabel("accumulated |gradient| (log)")
        _legend_above(gax, *gax.get_legend_handles_labels())
        rax.tick_params(labelbottom=False)
        _class_axis(gax, order, names, counts is not None)
    else:
        _class_axis(rax, order, names, counts is not None)
    return _finish(fig, out_png)


def plot_gradient_ratio_runs(runs: Mapping[str, Any], train_counts: Any = None,
                             out_png: Optional[PathLike] = None, title: Optional[str] = None,
                             *, class_names: Optional[Sequence[str]] = None, log: bool = False,
                             ax: Optional["Axes"] = None) -> "Figure":
    """The accumulated gradient ratio of every class for several runs, in one panel.

    The paper's figure 1 as a comparison: classes sorted by training count (head on the
    left), one colour per run (grouped bars while they stay readable, else lines), the
    balanced ratio 1 dotted and the training counts on a secondary log axis. Drawn, for
    example, for a cross-entropy run (tail ratios far below 1) next to a Softmax-EQL run.

    Args:
        runs: run name -> statistics snapshot (anything :func:`plot_gradient_ratio` takes:
            a record with ``ratio``, a history, a run directory or statistics file).
        train_counts: ``[C]`` training samples per class (None: classes in index order).
        out_png: the image file to write, if any.
        title: the title (default: says what is drawn).
        class_names: ``[C]`` names for the class axis (used up to 60 classes).
        log: a log-scale ratio axis (for ratios spanning decades).
        ax: draw into this axes.

    Example:
        >>> fig = plot_gradient_ratio_runs({"ce": {"ratio": [0.9, 0.05]},
        ...                                 "softmax_eql": {"ratio": [0.9, 0.6]}}, [100, 3])
        >>> sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts())
        ['balanced (ratio = 1)', 'ce', 'softmax_eql', 'training count']
    """
    if not runs:
        raise ValueError("runs must name at least one run")
    records = {str(name): _latest_record(r) for name, r in runs.items()}
    counts = _as_counts(train_counts)
    first = next(iter(records.values())).get("ratio")
    c = counts.size if counts is not None else (len(first) if first is not None else 0)
    names = _names(class_names, c)
    order = _order(counts, c)
    ratios = {name: _per_class(rec.get("ratio"), c, f"the ratio of run {name!r}")[order]
              for name, rec in records.items()}
    if ax is None:
        fig, axes = _new_figure(_width(c), 4.4)
        ax = axes[0]
    else:
        fig = ax.figure
    x = np.arange(c)
    k = len(ratios)
    bars = c * k <= 120
    colours = [f"C{i % 10}" for i in range(k)]
    for i, (name, ratio) in enumerate(ratios.items()):
        shown = np.where(ratio > 0, ratio, np.nan) if log else ratio
        if bars:
            width = 0.8 / k
            ax.bar(x - 0.4 + width * (i + 0.5), shown, width=width, linewidth=0,
                   color=colours[i], label=name)
        else:
            ax.plot(x, shown, lw=1.2, color=colours[i], marker="o" if c <= 100 else None,
                    ms=3, label=name)
    ax.axhline(1.0, color="tab:red", lw=1, ls=":", label="balanced (ratio = 1)")
    ax.set_ylabel(_RATIO_LABEL)
    top = max(float(np.nanmax(r, initial=0)) for r in ratios.values())
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0, top=max(1.1, top * 1.08))
    handles, labels = ax.get_legend_handles_labels()
    if counts is not None:
        th, tl = _count_twin(ax, counts[order]).get_legend_handles_labels()
        handles, labels = handles + th, labels + tl
    rows = _legend_above(ax, handles, labels)
    _title(ax, title if title is not None else
           "Accumulated positive / negative gradient ratio per class, per run", rows)
    _class_axis(ax, order, names, counts is not None)
    return _finish(fig, out_png)


# --------------------------------------------------------------------------------------------
# Ratio evolution
# --------------------------------------------------------------------------------------------

def _draw_evolution(ax: "Axes", steps: np.ndarray, ratios: np.ndarray,
                    counts: Optional[np.ndarray]) -> np.ndarray:
    """One line per class coloured by frequency rank; returns the order (head first)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    c = ratios.shape[1]
    order = _order(counts, c)
    cmap = colormaps["viridis"]
    norm = Normalize(vmin=0, vmax=max(c - 1, 1))
    lw = 1.6 if c <= 20 else (0.9 if c <= 200 else 0.5)
    # Draw the tail first so that the head lines stay visible on top.
    for rank in reversed(range(c)):
        j = order[rank]
        ax.plot(steps, ratios[:, j], color=cmap(norm(rank)), lw=lw,
                marker="o" if len(steps) <= 12 else None, ms=3)
    ax.axhline(1.0, color="tab:red", lw=1, ls=":", label="balanced (ratio = 1)")
    ax.set_xlabel("training step")
    ax.set_ylabel(_RATIO_LABEL)
    ax.set_ylim(bottom=0)
    return order


def _evolution_colorbar(fig: "Figure", ax: Any, order: np.ndarray,
                        counts: Optional[np.ndarray], names: Optional[List[str]]) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    c = order.size
    norm = Normalize(vmin=0, vmax=max(c - 1, 1))
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormaps["viridis"]), ax=ax)
    head, tail = int(order[0]), int(order[-1])
    if counts is not None:
        cbar.set_ticks([0, max(c - 1, 1)])
        cbar.set_ticklabels([f"head\n({_class_label(head, names)}, n={counts[head]:g})",
                             f"tail\n({_class_label(tail, names)}, n={counts[tail]:g})"])
        cbar.set_label("class frequency rank")
    else:
        cbar.set_label("class index")
    cbar.ax.invert_yaxis()  # head (or class 0) at the top


def plot_ratio_evolution(history: Any, train_counts: Any = None,
                         out_png: Optional[PathLike] = None, title: Optional[str] = None, *,
                         class_names: Optional[Sequence[str]] = None,
                         ax: Optional["Axes"] = None, colorbar: bool = True) -> "Figure":
    """The gradient ratio of every class against the training step.

    One line per class, coloured by frequency rank (viridis: head dark, tail yellow) with a
    colorbar naming the head and tail classes, and a dotted line at the balanced ratio 1.

    Args:
        history: a :class:`~eqlosses.monitor.StatsHistory` (:func:`read_stats`), a run
            directory or statistics file (only the ratios are read), or a sequence of records
            (dicts with ``step`` and ``ratio``; those with a null ``ratio`` are skipped).
        train_counts: ``[C]`` training samples per class (None: coloured by class index).
        out_png: the image file to write, if any.
        title: the title.
        class_names: ``[C]`` names, for the colorbar's head and tail classes.
        ax: draw into this axes instead of a new figure.
        colorbar: whether to add the colorbar.

    Returns:
        The figure.

    Example:
        >>> records = [{"step": 10, "ratio": [0.9, 0.1]}, {"step": 20, "ratio": [1.0, 0.3]}]
        >>> fig = plot_ratio_evolution(records, [50, 2])
        >>> [line.get_ydata().tolist() for line in fig.axes[0].lines[:2]]  # tail drawn first
        [[0.1, 0.3], [0.9, 1.0]]
    """
    counts = _as_counts(train_counts)
    steps, ratios = _ratio_series(history, None if counts is None else counts.size)
    names = _names(class_names, ratios.shape[1])
    if ax is None:
        fig, (ax,) = _new_figure(8.5, 4.6)
    else:
        fig = ax.figure
    order = _draw_evolution(ax, steps, ratios, counts)
    if colorbar:
        _evolution_colorbar(fig, ax, order, counts, names)
    rows = _legend_above(ax, *ax.get_legend_handles_labels())
    _title(ax, title if title is not None else "Gradient ratio of each class during training",
           rows)
    return _finish(fig, out_png)


def plot_ratio_evolution_runs(runs: Mapping[str, Any], train_counts: Any = None,
                              out_png: Optional[PathLike] = None, title: Optional[str] = None,
                              *, class_names: Optional[Sequence[str]] = None) -> "Figure":
    """The ratio evolution of several runs side by side, on a shared y axis.

    One panel per run (:func:`plot_ratio_evolution` without its colorbar) and one colorbar
    for all, so that runs trained on the same data compare at a glance.

    Args:
        runs: run name -> history (anything :func:`plot_ratio_evolution` takes).
        train_counts: ``[C]`` training samples per class, shared by the runs.
        out_png: the image file to write, if any.
        title: the figure title.
        class_names: ``[C]`` names, for the colorbar.

    Returns:
        The figure.

    Example:
        >>> fig = plot_ratio_evolution_runs({"a": [{"step": 1, "ratio": [1.0, 0.5]}],
        ...                                  "b": [{"step": 1, "ratio": [1.0, 0.9]}]}, [9, 1])
        >>> [ax.get_title() for ax in fig.axes[:2]]
        ['a', 'b']
    """
    if not runs:
        raise ValueError("runs is empty: give at least one run name -> statistics history")
    counts = _as_counts(train_counts)
    series = {name: _ratio_series(h, None if counts is None else counts.size)
              for name, h in runs.items()}
    c = next(iter(series.values()))[1].shape[1]
    if any(r.shape[1] != c for _, r in series.values()):
        raise ValueError(f"the runs have different numbers of classes "
                         f"({sorted({r.shape[1] for _, r in series.values()})})")
    names = _names(class_names, c)
    n = len(series)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = _new_figure(4.2 * ncols + 1.6, 3.4 * nrows + 0.6, nrows=nrows, ncols=ncols,
                            sharey=True)
    order = None
    for ax, (name, (steps, ratios)) in zip(axes, series.items()):
        order = _draw_evolution(ax, steps, ratios, counts)
        ax.set_title(str(name))
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[1:n]:
        ax.set_ylabel("")
    _evolution_colorbar(fig, axes[:n], order, counts, names)
    fig.suptitle(title if title is not None else
                 "Gradient ratio of each class during training (dotted red line: "
                 "balanced ratio 1)")
    return _finish(fig, out_png)


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------

_MARKERS = "osD^vP*Xh<>"


def plot_per_class_accuracy(runs: Mapping[str, Sequence[float]], train_counts: Any = None,
                            out_png: Optional[PathLike] = None, title: Optional[str] = None,
                            metric: str = "accuracy", *,
                            class_names: Optional[Sequence[str]] = None,
                            ax: Optional["Axes"] = None) -> "Figure":
    """Per-class accuracy (or AP, IoU: ``metric`` names it) of several runs, classes sorted
    by training count (head left).

    One line with markers per run (NaN, a class without test samples, leaves a gap) over grey
    bars of the training count on a secondary log axis.

    Args:
        runs: run name -> ``[C]`` per-class accuracies in ``[0, 1]`` (the
            ``per_class_accuracy`` of :meth:`ClassificationMetrics.compute`).
        train_counts: ``[C]`` training samples per class (None: classes in index order).
        out_png: the image file to write, if any.
        title: the title.
        metric: what the values are, for the axis label and default title.
        class_names: ``[C]`` names for the class axis (used up to 60 classes).
        ax: draw into this axes instead of a new figure.

    Returns:
        The figure.

    Example:
        >>> fig = plot_per_class_accuracy({"CE": [0.9, 0.1, 0.5]}, [10, 1, 5])
        >>> fig.axes[0].lines[0].get_ydata().tolist()  # head to tail: classes 0, 2, 1
        [0.9, 0.5, 0.1]
    """
    from matplotlib.ticker import PercentFormatter

    if not runs:
        raise ValueError("runs is empty: give at least one run name -> per-class accuracy")
    counts = _as_counts(train_counts)
    c = counts.size if counts is not None else len(next(iter(runs.values())))
    names = _names(class_names, c)
    order = _order(counts, c)
    if ax is None:
        fig, (ax,) = _new_figure(_width(c), 4.8)
    else:
        fig = ax.figure
    x = np.arange(c)
    for i, (name, acc) in enumerate(runs.items()):
        values = _per_class(acc, c, f"per-class {metric} of run {name!r}")[order]
        ax.plot(x, values, marker=_MARKERS[i % len(_MARKERS)] if c <= 100 else None, ms=4,
                lw=1.3, label=str(name))
    handles, labels = ax.get_legend_handles_labels()
    if counts is not None:
        th, tl = _count_twin(ax, counts[order], kind="bar").get_legend_handles_labels()
        handles, labels = handles + th, labels + tl
    ax.set_ylim(-0.02, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_ylabel(f"per-class {metric}")
    ax.grid(axis="y", alpha=0.3)
    _class_axis(ax, order, names, counts is not None)
    rows = _legend_above(ax, handles, labels)
    _title(ax, title if title is not None else (
        f"Per-class {metric}, classes sorted by training count" if counts is not None
        else f"Per-class {metric}"), rows)
    return _finish(fig, out_png)


def plot_group_accuracy(runs: Mapping[str, Mapping[str, float]],
                        out_png: Optional[PathLike] = None, title: Optional[str] = None,
                        metric: str = "accuracy", *, ax: Optional["Axes"] = None
                        ) -> "Figure":
    """Grouped bars of the accuracy of each run, overall and per frequency group.

    Args:
        runs: run name -> {group: accuracy in ``[0, 1]``}, e.g.
            ``{"CE": {"overall": 0.88, "many": 0.99, "medium": 0.97, "few": 0.64}}``. The
            groups are shown in the order they first appear; a missing or NaN value is drawn
            as an empty bar labelled ``n/a``.
        out_png: the image file to write, if any.
        title: the title.
        metric: what the values are (``"accuracy"``, ``"AP"``, ``"mIoU"``).
        ax: draw into this axes instead of a new figure.

    Returns:
        The figure.

    Example:
        >>> fig = plot_group_accuracy({"CE": {"overall": 0.8, "few": 0.3}})
        >>> [float(b.get_height()) for b in fig.axes[0].containers[0]]
        [0.8, 0.3]
    """
    from matplotlib.ticker import PercentFormatter

    if not runs:
        raise ValueError("runs is empty: give at least one run name -> {group: accuracy}")
    groups: List[str] = []
    for accs in runs.values():
        groups.extend(g for g in accs if g not in groups)
    if not groups:
        raise ValueError("the runs name no group accuracy")
    n = len(runs)
    if ax is None:
        fig, (ax,) = _new_figure(max(6.0, 1.2 + len(groups) * (0.5 + 0.45 * n)), 4.4)
    else:
        fig = ax.figure
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (name, accs) in enumerate(runs.items()):
        values = np.array([float(accs.get(g, math.nan)) for g in groups])
        shown = np.where(np.isfinite(values), values, 0.0)
        bars = ax.bar(x - 0.4 + width * (i + 0.5), shown, width=width * 0.95, label=str(name))
        ax.bar_label(bars, labels=[f"{100 * v:.1f}" if math.isfinite(v) else "n/a"
                                   for v in values], fontsize=7, padding=2)
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_ylim(0, 1.1)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    rows = _legend_above(ax, *ax.get_legend_handles_labels())
    _title(ax, title if title is not None else
           f"{metric[0].upper()}{metric[1:]} overall and per frequency group", rows)
    return _finish(fig, out_png)


# --------------------------------------------------------------------------------------------
# Training curves (log.jsonl)
# --------------------------------------------------------------------------------------------

def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size < 3:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot_training_curves(log: Sequence[Mapping[str, Any]], out_png: Optional[PathLike] = None,
                         title: Optional[str] = None, *,
                         metrics: Optional[Sequence[str]] = None,
                         ax: Union["Axes", Sequence["Axes"], None] = None) -> "Figure":
    """Training loss and learning rate against the step, and the evaluations (if any).

    The first panel shows the logged loss (faint) with a moving average and the learning
    rate on a secondary axis; the second, when the log has evaluations, each evaluated
    metric (solid) and each frequency group's (dashed) against the step.

    Args:
        log: the records of a run's ``log.jsonl`` (``kind`` ``"step"`` with ``step``,
            ``loss``, ``lr``; ``kind`` ``"eval"`` with ``step``, metrics and ``groups``);
            other kinds are ignored.
        out_png: the image file to write, if any.
        title: the title.
        metrics: the evaluation keys to draw (default: every number of the eval records).
        ax: draw into this axes (loss only) or pair of axes (loss, evaluations).

    Returns:
        The figure.

    Example:
        >>> log = [{"kind": "step", "step": s, "loss": 2.0 / s, "lr": 0.1} for s in (1, 2, 3)]
        >>> log.append({"kind": "eval", "step": 3, "top1": 0.4, "groups": {"few": 0.1}})
        >>> fig = plot_training_curves(log)
        >>> loss_panel, eval_panel, lr_axis = fig.axes
        >>> sorted(line.get_label() for line in eval_panel.lines)
        ['few', 'top1']
    """
    from matplotlib.ticker import PercentFormatter

    steps = [r for r in log if r.get("kind") == "step" and r.get("loss") is not None]
    evals = [r for r in log if r.get("kind") == "eval" and r.get("step") is not None]
    if not steps and not evals:
        raise ValueError(f"the log has no training step and no evaluation record (of "
                         f"{len(log)} records)")
    if ax is None:
        fig, axes = _new_figure(8.5, 6.4 if evals and steps else 3.8,
                                nrows=2 if evals and steps else 1, sharex=bool(evals and steps))
    else:
        axes = [ax] if not isinstance(ax, (list, tuple)) else list(ax)
        fig = axes[0].figure
    panel = 0
    if steps:
        lax = axes[0]
        x = np.array([float(r["step"]) for r in steps])
        loss = np.array([float(r["loss"]) for r in steps])
        lax.plot(x, loss, color="tab:blue", lw=0.8, alpha=0.35, label="loss (logged)",
                 marker="o" if len(x) <= 30 else None, ms=3)
        if len(loss) >= 50:
            lax.plot(x, _smooth(loss, len(loss) // 25), color="tab:blue", lw=1.6,
                     label="loss (moving average)")
        lax.set_ylabel("training loss")
        lax.grid(alpha=0.3)
        handles, labels = lax.get_legend_handles_labels()
        if all(r.get("lr") is not None for r in steps):
            twin = lax.twinx()
            twin.plot(x, [float(r["lr"]) for r in steps], color="0.45", lw=1.0, ls="--",
                      label="learning rate")
            twin.set_ylabel("learning rate", color="0.35")
            twin.tick_params(axis="y", colors="0.35")
            th, tl = twin.get_legend_handles_labels()
            handles, labels = handles + th, labels + tl
        rows = _legend_above(lax, handles, labels)
        _title(lax, title if title is not None else "Training curves", rows)
        lax.set_xlabel("training step")
        panel = 1
    if evals and len(axes) > panel:
        eax = axes[panel]
        keys: List[str] = []
        for r in evals:
            keys.extend(k for k, v in r.items() if k not in ("kind", "epoch", "step", "groups")
                        and isinstance(v, (int, float)) and not isinstance(v, bool)
                        and k not in keys)
        if metrics is not None:
            keys = [k for k in keys if k in metrics]
        groups: List[str] = []
        for r in evals:
            groups.extend(g for g in (r.get("groups") or {}) if g not in groups)
        ex = np.array([float(r["step"]) for r in evals])
        marker = "o" if len(evals) <= 30 else None
        for k in keys:
            eax.plot(ex, [float(r.get(k, math.nan)) for r in evals], marker=marker, ms=4,
                     lw=1.6, label=k)
        for g in groups:
            eax.plot(ex, [float((r.get("groups") or {}).get(g, math.nan)) for r in evals],
                     marker=marker, ms=3, lw=1.0, ls="--", label=g)
        values = [float(r.get(k)) for r in evals for k in keys if r.get(k) is not None]
        if values and 0 <= min(values) and max(values) <= 1:
            eax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        eax.set_ylabel("evaluation")
        eax.set_xlabel("training step")
        eax.grid(alpha=0.3)
        rows = _legend_above(eax, *eax.get_legend_handles_labels(), ncols=6)
        if not steps:
            _title(eax, title if title is not None else "Evaluations", rows)
        elif panel:
            axes[0].set_xlabel("")
    return _finish(fig, out_png)
