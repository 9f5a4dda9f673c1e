"""Figures for long-tailed training: gradient ratios, their evolution, per-class and group
accuracy.

Needs matplotlib (``pip install eqlosses[plot]``), imported only when a function is called.
The figures are drawn with the Agg backend on ``matplotlib.figure.Figure`` objects that pyplot
never sees: nothing opens a window, the global backend of the caller is left alone, and no
figure stays registered after the call.

Classes are always shown sorted by training count, most frequent (head) on the left; ties keep
class order. Every function returns the path written, creating its parent directories.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_gradient_ratio", "plot_ratio_evolution", "plot_per_class_accuracy",
           "plot_group_accuracy"]

PathLike = Union[str, "os.PathLike[str]"]

_DPI = 120
_MAX_CLASS_TICKS = 40  # up to this many classes, every class id is a tick label


def _new_figure(width: float, height: float, nrows: int = 1, **subplot_kw: Any):
    """A pyplot-free Agg figure and its axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("eqlosses.monitor.plots needs matplotlib: "
                          "pip install eqlosses[plot]") from err
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, squeeze=False, **subplot_kw)[:, 0]
    return fig, list(axes)


def _save(fig: "Figure", out_png: PathLike) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI)
    fig.clear()  # free the artists now; the figure was never registered with pyplot
    return out


def _as_counts(train_counts: Any) -> np.ndarray:
    counts = np.asarray(train_counts.tolist() if hasattr(train_counts, "tolist")
                        else list(train_counts), dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"train_counts must be a non-empty 1-d sequence [C], got shape "
                         f"{counts.shape}")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("train_counts must be finite and non-negative")
    return counts


def _head_to_tail(counts: np.ndarray) -> np.ndarray:
    """Class indices sorted by training count, descending; ties keep class order."""
    return np.argsort(-counts, kind="stable")


def _per_class(values: Any, c: int, what: str) -> np.ndarray:
    if values is None:
        raise ValueError(f"{what} is missing (null): the record has no gradient statistics; "
                         f"was it recorded for a loss without `stats`?")
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (c,):
        raise ValueError(f"{what} must have one value per class ({c} from train_counts), got "
                         f"shape {arr.shape}")
    return arr


def _class_axis(ax: "Axes", order: np.ndarray) -> None:
    """x axis of classes sorted head to tail: class ids as ticks when few, ranks otherwise."""
    c = order.size
    ax.set_xlim(-0.6, c - 0.4)
    if c <= _MAX_CLASS_TICKS:
        ax.set_xticks(np.arange(c))
        ax.set_xticklabels([str(i) for i in order], fontsize=8 if c > 20 else 9)
        ax.set_xlabel("class id, sorted by training count (head \u2192 tail)")
    else:
        ax.set_xlabel("class rank by training count (0 = most frequent, head \u2192 tail)")


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


def _width(c: int) -> float:
    return float(min(16.0, max(7.0, 2.5 + 0.22 * c)))


# --------------------------------------------------------------------------------------------
# Gradient ratio (the paper's figure 1)
# --------------------------------------------------------------------------------------------

def _gradient_ratio_figure(record: Mapping[str, Any], train_counts: Any,
                           title: Optional[str] = None, grads: bool = True) -> "Figure":
    counts = _as_counts(train_counts)
    c = counts.size
    order = _head_to_tail(counts)
    ratio = _per_class(record.get("ratio"), c, "record['ratio']")[order]
    with_grads = grads and record.get("pos_grad") is not None and record.get("neg_grad") is not None
    fig, axes = _new_figure(_width(c), 6.4 if with_grads else 3.8, nrows=2 if with_grads else 1,
                            sharex=True)
    ax = axes[0]
    x = np.arange(c)
    ax.bar(x, ratio, width=0.8, color="tab:blue", label="positive / negative gradient")
    ax.axhline(1.0, color="tab:red", lw=1, ls=":", label="balanced (ratio = 1)")
    ax.set_ylabel("accumulated gradient ratio P / N")
    ax.set_ylim(bottom=0)
    twin = _count_twin(ax, counts[order])
    handles = ax.get_legend_handles_labels()
    thandles = twin.get_legend_handles_labels()
    ax.legend(handles[0] + thandles[0], handles[1] + thandles[1], loc="upper right",
              fontsize=8)
    step = record.get("step")
    ax.set_title(title if title is not None else
                 "Accumulated positive/negative gradient ratio per class"
                 + (f" (step {step})" if step is not None else ""))
    if with_grads:
        ax2 = axes[1]
        pos = _per_class(record["pos_grad"], c, "record['pos_grad']")[order]
        neg = _per_class(record["neg_grad"], c, "record['neg_grad']")[order]
        few = c <= 100  # markers only while they stay distinguishable
        ax2.plot(x, np.where(pos > 0, pos, np.nan), marker="o" if few else None, ms=3,
                 color="tab:green", label="positive gradient P")
        ax2.plot(x, np.where(neg > 0, neg, np.nan), marker="s" if few else None, ms=3,
                 color="tab:orange", label="negative gradient N")
        if (pos > 0).any() or (neg > 0).any():
            ax2.set_yscale("log")
        ax2.set_ylabel("accumulated |gradient| (log)")
        ax2.legend(loc="upper right", fontsize=8)
        ax.tick_params(labelbottom=False)
        _class_axis(ax2, order)
    else:
        _class_axis(ax, order)
    return fig


def plot_gradient_ratio(record: Mapping[str, Any], train_counts: Any, out_png: PathLike,
                        title: Optional[str] = None, grads: bool = True) -> Path:
    """Bar chart of the accumulated gradient ratio ``P_j / N_j`` of every class.

    The paper's figure 1: classes sorted by training count (head on the left), a dotted line
    at the balanced ratio 1 and the training counts on a secondary log axis. With ``grads``
    (and when the record has them) a second panel shows ``P_j`` and ``N_j`` on a log scale.

    Args:
        record: one :class:`~eqlosses.monitor.StatsRecorder` record (``ratio`` and optionally
            ``pos_grad``, ``neg_grad``, ``step``).
        train_counts: ``[C]`` training samples per class.
        out_png: the image file to write.
        title: the figure title (default: names the record's step).
        grads: whether to draw the second panel.
    """
    return _save(_gradient_ratio_figure(record, train_counts, title, grads), out_png)


# --------------------------------------------------------------------------------------------
# Ratio evolution
# --------------------------------------------------------------------------------------------

def _ratio_evolution_figure(records: Sequence[Mapping[str, Any]], train_counts: Any,
                            title: Optional[str] = None) -> "Figure":
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    counts = _as_counts(train_counts)
    c = counts.size
    usable = [r for r in records if r.get("ratio") is not None]
    if not usable:
        raise ValueError(f"none of the {len(records)} records has a gradient ratio (records of "
                         f"a loss without `stats`?)")
    steps = np.array([float(r["step"]) for r in usable])
    ratios = np.stack([_per_class(r["ratio"], c, f"ratio of the record of step {r['step']}")
                       for r in usable])  # [T, C]
    order = _head_to_tail(counts)
    fig, (ax,) = _new_figure(8.5, 4.6)
    cmap = colormaps["viridis"]
    norm = Normalize(vmin=0, vmax=max(c - 1, 1))
    lw = 1.6 if c <= 20 else (0.9 if c <= 200 else 0.5)
    # Draw the tail first so that the (fewer-sample) head lines stay visible on top.
    for rank in reversed(range(c)):
        j = order[rank]
        ax.plot(steps, ratios[:, j], color=cmap(norm(rank)), lw=lw,
                marker="o" if len(steps) <= 12 else None, ms=3)
    ax.axhline(1.0, color="tab:red", lw=1, ls=":", label="balanced (ratio = 1)")
    ax.set_xlabel("training step")
    ax.set_ylabel("accumulated gradient ratio P / N")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)
    sm = ScalarMappable(norm=norm, cmap=cmap)
    cbar = fig.colorbar(sm, ax=ax)
    head, tail = order[0], order[-1]
    cbar.set_ticks([0, max(c - 1, 1)])
    cbar.set_ticklabels([f"head\n(class {head}, n={counts[head]:g})",
                         f"tail\n(class {tail}, n={counts[tail]:g})"])
    cbar.ax.invert_yaxis()  # head at the top
    cbar.set_label("class frequency rank")
    ax.set_title(title if title is not None else "Gradient ratio of each class during training")
    return fig


def plot_ratio_evolution(records: Sequence[Mapping[str, Any]], train_counts: Any,
                         out_png: PathLike, title: Optional[str] = None) -> Path:
    """The gradient ratio of every class against the training step.

    One line per class, coloured by frequency rank (viridis: head dark, tail yellow) with a
    colorbar naming the head and tail classes. Records with a null ``ratio`` are skipped.

    Args:
        records: :class:`~eqlosses.monitor.StatsRecorder` records (``read_jsonl`` output).
        train_counts: ``[C]`` training samples per class.
        out_png: the image file to write.
        title: the figure title.
    """
    return _save(_ratio_evolution_figure(records, train_counts, title), out_png)


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------

_MARKERS = "osD^vP*Xh<>"


def _per_class_accuracy_figure(runs: Mapping[str, Sequence[float]], train_counts: Any,
                               title: Optional[str] = None, metric: str = "accuracy"
                               ) -> "Figure":
    from matplotlib.ticker import PercentFormatter

    counts = _as_counts(train_counts)
    c = counts.size
    if not runs:
        raise ValueError("runs is empty: give at least one run name -> per-class accuracy")
    order = _head_to_tail(counts)
    fig, (ax,) = _new_figure(_width(c), 4.6)
    x = np.arange(c)
    twin = _count_twin(ax, counts[order], kind="bar")
    for i, (name, acc) in enumerate(runs.items()):
        values = _per_class(acc, c, f"per-class accuracy of run {name!r}")[order]
        ax.plot(x, values, marker=_MARKERS[i % len(_MARKERS)] if c <= 100 else None, ms=4,
                lw=1.3, label=str(name))
    ax.set_ylim(-0.02, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_ylabel(f"per-class {metric}")
    ax.grid(axis="y", alpha=0.3)
    _class_axis(ax, order)
    handles, labels = ax.get_legend_handles_labels()
    th, tl = twin.get_legend_handles_labels()
    ax.legend(handles + th, labels + tl, loc="lower left", fontsize=8)
    ax.set_title(title if title is not None else
                 f"Per-class {metric}, classes sorted by training count")
    return fig


def plot_per_class_accuracy(runs: Mapping[str, Sequence[float]], train_counts: Any,
                            out_png: PathLike, title: Optional[str] = None,
                            metric: str = "accuracy") -> Path:
    """Per-class accuracy (or AP, IoU: ``metric`` names it) of several runs, classes sorted
    by training count (head left).

    One line with markers per run (NaN, a class without test samples, leaves a gap) over grey
    bars of the training count on a secondary log axis.

    Args:
        runs: run name -> ``[C]`` per-class accuracies in ``[0, 1]`` (the
            ``per_class_accuracy`` of :meth:`ClassificationMetrics.compute`).
        train_counts: ``[C]`` training samples per class.
        out_png: the image file to write.
        title: the figure title.
        metric: what the values are, for the axis label and default title.
    """
    return _save(_per_class_accuracy_figure(runs, train_counts, title, metric), out_png)


def _group_accuracy_figure(runs: Mapping[str, Mapping[str, float]],
                           title: Optional[str] = None, metric: str = "accuracy") -> "Figure":
    from matplotlib.ticker import PercentFormatter

    if not runs:
        raise ValueError("runs is empty: give at least one run name -> {group: accuracy}")
    groups: List[str] = []
    for accs in runs.values():
        groups.extend(g for g in accs if g not in groups)
    if not groups:
        raise ValueError("the runs name no group accuracy")
    n = len(runs)
    fig, (ax,) = _new_figure(max(6.0, 1.2 + len(groups) * (0.5 + 0.45 * n)), 4.2)
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
    ax.legend(fontsize=8, loc="upper center", ncols=min(n, 4), bbox_to_anchor=(0.5, -0.08))
    ax.set_title(title if title is not None else
                 f"{metric[0].upper()}{metric[1:]} overall and per frequency group")
    return fig


def plot_group_accuracy(runs: Mapping[str, Mapping[str, float]], out_png: PathLike,
                        title: Optional[str] = None, metric: str = "accuracy") -> Path:
    """Grouped bars of the accuracy of each run, overall and per frequency group.

    Args:
        runs: run name -> {group: accuracy in ``[0, 1]``}, e.g.
            ``{"CE": {"overall": 0.88, "many": 0.99, "medium": 0.97, "few": 0.64}}``. The
            groups are shown in the order they first appear; a missing or NaN value is drawn
            as an empty bar labelled ``n/a``.
        out_png: the image file to write.
        title: the figure title.
        metric: what the values are (``"accuracy"``, ``"AP"``, ``"mIoU"``).
    """
    return _save(_group_accuracy_figure(runs, title, metric), out_png)

