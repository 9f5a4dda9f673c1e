"""The figures: files written, PNGs that decode to the expected size, classes sorted head to
tail, the expected axes; matplotlib imported only when a figure is drawn."""

import math
import subprocess
import sys

import numpy as np
import pytest

from eqlosses.monitor import plots
from eqlosses.monitor import (plot_gradient_ratio, plot_group_accuracy, plot_per_class_accuracy,
                              plot_ratio_evolution)

# Unsorted on purpose: head to tail is class 1 (900), 3 (120), 2 (40), 0 (7), 4 (2).
COUNTS = [7, 900, 40, 120, 2]
HEAD_TO_TAIL = [1, 3, 2, 0, 4]
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


def test_gradient_ratio_bars_are_sorted_head_to_tail(mpl, tmp_path):
    out = plot_gradient_ratio(RECORD, COUNTS, tmp_path / "figs" / "ratio.png")
    assert out == tmp_path / "figs" / "ratio.png"
    two_panels = read_png(out)
    one_panel = read_png(plot_gradient_ratio(RECORD, COUNTS, tmp_path / "r1.png", grads=False))
    assert two_panels.shape[1] == one_panel.shape[1]
    assert two_panels.shape[0] > 1.5 * one_panel.shape[0]  # the second panel was drawn

    fig = plots._gradient_ratio_figure(RECORD, COUNTS)
    assert len(fig.axes) == 3  # ratio bars, gradients panel, training-count twin axis
    bars_ax, grads_ax = fig.axes[0], fig.axes[1]
    heights = [b.get_height() for b in bars_ax.containers[0]]
    assert heights == pytest.approx([RECORD["ratio"][j] for j in HEAD_TO_TAIL])
    assert [t.get_text() for t in grads_ax.get_xticklabels()] == [str(j) for j in HEAD_TO_TAIL]
    assert grads_ax.get_yscale() == "log"
    pos_line = grads_ax.lines[0]
    assert list(pos_line.get_ydata()) == pytest.approx([RECORD["pos_grad"][j]
                                                        for j in HEAD_TO_TAIL])
    assert len(plots._gradient_ratio_figure(RECORD, COUNTS, grads=False).axes) == 2


def test_gradient_ratio_needs_statistics_and_matching_sizes(mpl, tmp_path):
    no_stats = {"step": 1, "ratio": None, "pos_grad": None, "neg_grad": None, "terms": {}}
    with pytest.raises(ValueError, match="loss without `stats`"):
        plot_gradient_ratio(no_stats, COUNTS, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"one value per class \(4 from train_counts\)"):
        plot_gradient_ratio(RECORD, COUNTS[:4], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_ratio_evolution_one_line_per_class_coloured_by_rank(mpl, tmp_path):
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    records = [{"step": s, "ratio": [0.1 * s, 0.9, 0.2 + 0.01 * s, 0.7, 0.01 * s]}
               for s in range(0, 50, 10)]
    records.insert(2, {"step": 15, "ratio": None})  # a record without statistics is skipped
    out = plot_ratio_evolution(records, COUNTS, tmp_path / "evo.png", title="evolution")
    read_png(out)

    fig = plots._ratio_evolution_figure(records, COUNTS)
    assert len(fig.axes) == 2  # the plot and its colorbar
    ax = fig.axes[0]
    class_lines = [ln for ln in ax.lines if len(ln.get_xdata()) == 5]
    assert len(class_lines) == 5
    head = next(ln for ln in class_lines if list(ln.get_ydata()) == [0.9] * 5)
    tail = next(ln for ln in class_lines if list(ln.get_ydata()) ==
                pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4]))  # class 4: 0.01 * s
    viridis = colormaps["viridis"]
    assert to_rgba(head.get_color()) == pytest.approx(viridis(0.0))
    assert to_rgba(tail.get_color()) == pytest.approx(viridis(1.0))
    assert list(head.get_xdata()) == [0, 10, 20, 30, 40]
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert labels[0].startswith("head") and "class 1" in labels[0]
    assert labels[1].startswith("tail") and "class 4" in labels[1]

    with pytest.raises(ValueError, match="none of the 1 records has a gradient ratio"):
        plot_ratio_evolution([{"step": 0, "ratio": None}], COUNTS, tmp_path / "y.png")


def test_ratio_evolution_xdata_skips_null_records(mpl):
    records = [{"step": 0, "ratio": [1.0] * 5}, {"step": 5, "ratio": None},
               {"step": 10, "ratio": [0.5] * 5}]
    ax = plots._ratio_evolution_figure(records, COUNTS).axes[0]
    class_lines = [ln for ln in ax.lines if not ln.get_label().startswith("balanced")]
    assert len(class_lines) == 5
    assert all(list(ln.get_xdata()) == [0, 10] for ln in class_lines)


def test_per_class_accuracy_lines_sorted_by_training_count(mpl, tmp_path):
    runs = {"CE": [0.2, 0.99, 0.7, 0.9, 0.0],
            "Softmax-EQL": [0.5, 0.97, 0.8, 0.9, math.nan]}  # class 4: no test sample
    out = plot_per_class_accuracy(runs, np.array(COUNTS), tmp_path / "pca.png")
    read_png(out)

    fig = plots._per_class_accuracy_figure(runs, COUNTS)
    assert len(fig.axes) == 2  # accuracy and the training-count twin axis
    ax, twin = fig.axes
    assert [ln.get_label() for ln in ax.lines] == ["CE", "Softmax-EQL"]
    assert list(ax.lines[0].get_ydata()) == [runs["CE"][j] for j in HEAD_TO_TAIL]
    assert math.isnan(ax.lines[1].get_ydata()[-1])
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(j) for j in HEAD_TO_TAIL]
    assert twin.get_yscale() == "log"
    assert [b.get_height() for b in twin.containers[0]] == [COUNTS[j] for j in HEAD_TO_TAIL]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["CE", "Softmax-EQL", "training count"]

    with pytest.raises(ValueError, match="run 'CE'"):
        plot_per_class_accuracy({"CE": [0.5]}, COUNTS, tmp_path / "z.png")


def test_many_classes_use_rank_axis(mpl):
    c = 60
    counts = np.round(1000 * 0.9 ** np.arange(c)) + 1
    record = {"step": 1, "ratio": list(np.linspace(1, 0.1, c)),
              "pos_grad": list(np.linspace(5, 1, c)), "neg_grad": [5.0] * c}
    fig = plots._gradient_ratio_figure(record, counts)
    assert "class rank" in fig.axes[1].get_xlabel()
    assert len(fig.axes[0].containers[0]) == c


def test_group_accuracy_grouped_bars(mpl, tmp_path):
    runs = {"CE": {"overall": 0.881, "many": 0.991, "medium": 0.977, "few": 0.637},
            "Softmax-EQL": {"overall": 0.914, "many": 0.994, "medium": 0.987,
                            "few": math.nan}}
    out = plot_group_accuracy(runs, tmp_path / "deep" / "groups.png")
    read_png(out)

    fig = plots._group_accuracy_figure(runs)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["overall", "many", "medium", "few"]
    assert len(ax.containers) == 2
    assert [b.get_height() for b in ax.containers[0]] == pytest.approx([0.881, 0.991, 0.977,
                                                                        0.637])
    labels = [t.get_text() for t in ax.texts]
    assert "88.1" in labels and "91.4" in labels and "n/a" in labels
    with pytest.raises(ValueError, match="runs is empty"):
        plot_group_accuracy({}, tmp_path / "e.png")


def test_missing_matplotlib_gives_the_install_hint(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(ImportError, match=r"pip install eqlosses\[plot\]"):
        plot_group_accuracy({"a": {"overall": 0.5}}, tmp_path / "g.png")


def test_importing_the_package_does_not_import_matplotlib():
    code = ("import sys, eqlosses, eqlosses.metrics, eqlosses.monitor, eqlosses.monitor.plots; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
