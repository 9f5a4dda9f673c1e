"""The figures, through the public API only: each plot_* returns its Figure, writes a PNG when
asked, draws into given axes; classes sorted head to tail and named when few; legends outside
the data; matplotlib imported only when a figure is drawn."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from eqlosses import SoftmaxEQLLoss
from eqlosses.monitor import (StatsRecorder, plot_gradient_ratio, plot_group_accuracy,
                              plot_per_class_accuracy, plot_ratio_evolution,
                              plot_ratio_evolution_runs, plot_training_curves, read_stats)

# Unsorted on purpose: head to tail is class 1 (900), 3 (120), 2 (40), 0 (7), 4 (2).
COUNTS = [7, 900, 40, 120, 2]
HEAD_TO_TAIL = [1, 3, 2, 0, 4]
NAMES = ["zebra", "cat", "dog", "cow", "okapi"]
RECORD = {"step": 300, "epoch": 2, "num_updates": 300,
          "pos_grad": [0.5, 40.0, 6.0, 12.0, 0.2], "neg_grad": [5.0, 42.0, 20.0, 16.0, 4.0],
          "ratio": [0.1, 40 / 42, 0.3, 0.75, 0.05], "terms": {}}


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def read_png(path):
    from matplotlib.image import imread

    assert path.stat().st_size > 10_000  # a drawn figure, not an empty canvas
    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.05  # not a blank image
    return img


def tick_texts(ax):
    return [t.get_text() for t in ax.get_xticklabels()]


def legend_is_outside(fig, ax):
    """The legend of ``ax`` lies above its plotting area (it covers no data)."""
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    legend = ax.get_legend().get_window_extent(renderer)
    return legend.y0 >= ax.get_window_extent(renderer).y1 - 1


def test_gradient_ratio_bars_sorted_head_to_tail(mpl, tmp_path):
    fig = plot_gradient_ratio(RECORD, COUNTS, tmp_path / "figs" / "ratio.png")
    two_panels = read_png(tmp_path / "figs" / "ratio.png")
    one = plot_gradient_ratio(RECORD, COUNTS, tmp_path / "r1.png", grads=False)
    assert len(one.axes) == 2  # ratio bars and the count axis
    one_panel = read_png(tmp_path / "r1.png")
    assert two_panels.shape[1] == one_panel.shape[1]
    assert two_panels.shape[0] > 1.5 * one_panel.shape[0]  # the second panel was drawn

    assert len(fig.axes) == 3  # ratio bars, gradients panel, training-count twin axis
    bars_ax, grads_ax = fig.axes[0], fig.axes[1]
    heights = [b.get_height() for b in bars_ax.containers[0]]
    assert heights == pytest.approx([RECORD["ratio"][j] for j in HEAD_TO_TAIL])
    assert tick_texts(grads_ax) == [str(j) for j in HEAD_TO_TAIL]
    assert grads_ax.get_yscale() == "log"
    assert grads_ax.lines[0].get_ydata().tolist() == pytest.approx(
        [RECORD["pos_grad"][j] for j in HEAD_TO_TAIL])
    assert "step 300" in bars_ax.get_title()
    assert legend_is_outside(fig, bars_ax)


def test_gradient_ratio_with_class_names_and_given_axes(mpl):
    from matplotlib.figure import Figure

    fig = plot_gradient_ratio(RECORD, COUNTS, class_names=NAMES)
    assert tick_texts(fig.axes[1]) == [NAMES[j] for j in HEAD_TO_TAIL]
    assert "class, sorted by training count" in fig.axes[1].get_xlabel()

    mine = Figure()
    ax = mine.subplots()
    assert plot_gradient_ratio(RECORD, None, ax=ax) is mine  # one axes: the ratio panel only
    assert [b.get_height() for b in ax.containers[0]] == pytest.approx(RECORD["ratio"])
    assert tick_texts(ax) == ["0", "1", "2", "3", "4"]  # no counts: class order
    assert len(mine.axes) == 1  # no count axis without counts


def test_gradient_ratio_reads_a_run_directory(mpl, tmp_path):
    crit = SoftmaxEQLLoss(num_classes=5)
    crit.stats.pos_grad.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    crit.stats.neg_grad.fill_(10.0)
    StatsRecorder(tmp_path / "stats.bin", crit).record(40, epoch=1)
    fig = plot_gradient_ratio(tmp_path, COUNTS)
    heights = [b.get_height() for b in fig.axes[0].containers[0]]
    assert heights == pytest.approx([(j + 1) / 10 for j in HEAD_TO_TAIL], rel=1e-5)
    assert "step 40" in fig.axes[0].get_title()


def test_gradient_ratio_needs_statistics_and_matching_sizes(mpl, tmp_path):
    no_stats = {"step": 1, "ratio": None, "pos_grad": None, "neg_grad": None, "terms": {}}
    with pytest.raises(ValueError, match="loss without `stats`"):
        plot_gradient_ratio(no_stats, COUNTS, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"one value per class \(4 from train_counts\)"):
        plot_gradient_ratio(RECORD, COUNTS[:4], tmp_path / "x.png")
    with pytest.raises(ValueError, match="class_names must name the 5 classes, got 2"):
        plot_gradient_ratio(RECORD, COUNTS, class_names=["a", "b"])
    assert not (tmp_path / "x.png").exists()


def test_many_classes_use_a_rank_axis_few_get_every_name(mpl):
    for c, named in ((60, True), (61, False)):
        counts = np.round(1000 * 0.9 ** np.arange(c)) + 1
        record = {"step": 1, "ratio": list(np.linspace(1, 0.1, c)),
                  "pos_grad": list(np.linspace(5, 1, c)), "neg_grad": [5.0] * c}
        names = [f"c{j}" for j in range(c)]
        fig = plot_gradient_ratio(record, counts, class_names=names)
        assert len(fig.axes[0].containers[0]) == c
        if named:
            assert tick_texts(fig.axes[1]) == names  # counts descending: class order
        else:
            assert "class rank" in fig.axes[1].get_xlabel()


def test_ratio_evolution_one_line_per_class_coloured_by_rank(mpl, tmp_path):
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    records = [{"step": s, "ratio": [0.1 * s, 0.9, 0.2 + 0.01 * s, 0.7, 0.01 * s]}
               for s in range(0, 50, 10)]
    records.insert(2, {"step": 15, "ratio": None})  # a record without statistics is skipped
    fig = plot_ratio_evolution(records, COUNTS, tmp_path / "evo.png", title="evolution",
                               class_names=NAMES)
    read_png(tmp_path / "evo.png")
    assert len(fig.axes) == 2  # the plot and its colorbar
    ax = fig.axes[0]
    class_lines = [ln for ln in ax.lines if len(ln.get_xdata()) == 5]
    assert len(class_lines) == 5
    head = next(ln for ln in class_lines if ln.get_ydata().tolist() == [0.9] * 5)
    tail = next(ln for ln in class_lines if ln.get_ydata().tolist() ==
                pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4]))  # class 4: 0.01 * s
    viridis = colormaps["viridis"]
    assert to_rgba(head.get_color()) == pytest.approx(viridis(0.0))
    assert to_rgba(tail.get_color()) == pytest.approx(viridis(1.0))
    assert head.get_xdata().tolist() == [0, 10, 20, 30, 40]
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert labels[0].startswith("head") and "cat" in labels[0]
    assert labels[1].startswith("tail") and "okapi" in labels[1]
    assert legend_is_outside(fig, ax)

    with pytest.raises(ValueError, match="none of the 1 records has a gradient ratio"):
        plot_ratio_evolution([{"step": 0, "ratio": None}], COUNTS, tmp_path / "y.png")


def test_ratio_evolution_of_a_recorded_history(mpl, tmp_path):
    crit = SoftmaxEQLLoss(num_classes=5)
    rec = StatsRecorder(tmp_path / "stats.bin", crit)
    for step in (10, 20, 30):
        crit.stats.pos_grad.fill_(step)
        crit.stats.neg_grad.copy_(torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0],
                                               dtype=torch.float64))
        rec.record(step, epoch=0)
    for source in (read_stats(tmp_path / "stats.bin"), tmp_path):  # a history or a directory
        fig = plot_ratio_evolution(source, COUNTS)
        lines = [ln for ln in fig.axes[0].lines if len(ln.get_xdata()) == 3]
        assert len(lines) == 5
        assert all(ln.get_xdata().tolist() == [10, 20, 30] for ln in lines)
        class0 = next(ln for ln in lines if ln.get_ydata()[0] == pytest.approx(1.0))
        assert class0.get_ydata().tolist() == pytest.approx([1.0, 2.0, 3.0])


def test_ratio_evolution_runs_side_by_side(mpl, tmp_path):
    runs = {"ce": [{"step": s, "ratio": [1.0, 0.9, 0.5, 0.8, 0.1]} for s in (1, 2)],
            "eql": [{"step": s, "ratio": [1.0, 0.9, 0.9, 0.9, 0.8]} for s in (1, 2, 3)]}
    fig = plot_ratio_evolution_runs(runs, COUNTS, tmp_path / "both.png", class_names=NAMES)
    read_png(tmp_path / "both.png")
    panels = [ax for ax in fig.axes if ax.get_title() in runs]
    assert [ax.get_title() for ax in panels] == ["ce", "eql"]
    assert panels[0].get_shared_y_axes().joined(panels[0], panels[1])
    assert [len(ax.lines[0].get_xdata()) for ax in panels] == [2, 3]
    with pytest.raises(ValueError, match="runs is empty"):
        plot_ratio_evolution_runs({}, COUNTS)


def test_per_class_accuracy_lines_sorted_by_training_count(mpl, tmp_path):
    runs = {"CE": [0.2, 0.99, 0.7, 0.9, 0.0],
            "Softmax-EQL": [0.5, 0.97, 0.8, 0.9, math.nan]}  # class 4: no test sample
    fig = plot_per_class_accuracy(runs, np.array(COUNTS), tmp_path / "pca.png",
                                  class_names=NAMES)
    read_png(tmp_path / "pca.png")
    assert len(fig.axes) == 2  # accuracy and the training-count twin axis
    ax, twin = fig.axes
    assert [ln.get_label() for ln in ax.lines] == ["CE", "Softmax-EQL"]
    assert ax.lines[0].get_ydata().tolist() == [runs["CE"][j] for j in HEAD_TO_TAIL]
    assert math.isnan(ax.lines[1].get_ydata()[-1])
    assert tick_texts(ax) == [NAMES[j] for j in HEAD_TO_TAIL]
    assert twin.get_yscale() == "log"
    assert [b.get_height() for b in twin.containers[0]] == [COUNTS[j] for j in HEAD_TO_TAIL]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["CE", "Softmax-EQL", "training count"]
    assert legend_is_outside(fig, ax)

    with pytest.raises(ValueError, match="run 'CE'"):
        plot_per_class_accuracy({"CE": [0.5]}, COUNTS, tmp_path / "z.png")


def test_group_accuracy_grouped_bars(mpl, tmp_path):
    from matplotlib.figure import Figure

    runs = {"CE": {"overall": 0.881, "many": 0.991, "medium": 0.977, "few": 0.637},
            "Softmax-EQL": {"overall": 0.914, "many": 0.994, "medium": 0.987,
                            "few": math.nan}}
    fig = plot_group_accuracy(runs, tmp_path / "deep" / "groups.png")
    read_png(tmp_path / "deep" / "groups.png")
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert tick_texts(ax) == ["overall", "many", "medium", "few"]
    assert len(ax.containers) == 2
    assert [b.get_height() for b in ax.containers[0]] == pytest.approx([0.881, 0.991, 0.977,
                                                                        0.637])
    labels = [t.get_text() for t in ax.texts]
    assert "88.1" in labels and "91.4" in labels and "n/a" in labels
    assert legend_is_outside(fig, ax)  # never over the bars

    mine = Figure()
    ax = mine.subplots()
    assert plot_group_accuracy(runs, ax=ax) is mine and len(ax.containers) == 2
    with pytest.raises(ValueError, match="runs is empty"):
        plot_group_accuracy({}, tmp_path / "e.png")


def test_training_curves(mpl, tmp_path):
    log = [{"kind": "start", "train_counts": COUNTS}]
    log += [{"kind": "step", "epoch": 0, "step": s, "loss": 3.0 / s, "lr": 0.01 * s}
            for s in range(1, 61)]
    log += [{"kind": "eval", "epoch": e, "step": 20 * e, "top1": 0.3 * e,
             "groups": {"many": 0.3, "few": 0.05 * e}} for e in (1, 2)]
    fig = plot_training_curves(log, tmp_path / "curves.png")
    read_png(tmp_path / "curves.png")
    loss_ax, eval_ax, lr_ax = fig.axes
    raw = next(ln for ln in loss_ax.lines if ln.get_label() == "loss (logged)")
    assert raw.get_ydata().tolist() == pytest.approx([3.0 / s for s in range(1, 61)])
    assert lr_ax.lines[0].get_ydata().tolist() == pytest.approx([0.01 * s
                                                                  for s in range(1, 61)])
    top1 = next(ln for ln in eval_ax.lines if ln.get_label() == "top1")
    assert top1.get_xdata().tolist() == [20, 40] and top1.get_ydata().tolist() == [0.3, 0.6]
    assert next(ln for ln in eval_ax.lines if ln.get_label() == "few").get_linestyle() == "--"

    only_steps = plot_training_curves(log[:5])  # not evaluated yet: one panel (and lr axis)
    assert len(only_steps.axes) == 2
    with pytest.raises(ValueError, match="no training step and no evaluation"):
        plot_training_curves([{"kind": "start"}])


def test_missing_matplotlib_gives_the_install_hint(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(ImportError, match=r"pip install eqlosses\[plot\]"):
        plot_group_accuracy({"a": {"overall": 0.5}}, tmp_path / "g.png")


@pytest.mark.slow
def test_importing_the_package_does_not_import_matplotlib():
    code = ("import sys, eqlosses, eqlosses.metrics, eqlosses.monitor, eqlosses.monitor.plots; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
