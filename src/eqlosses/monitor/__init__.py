"""Training monitoring: gradient-statistics recorder, figures and an HTML report.

The figures (:mod:`eqlosses.monitor.plots`) need matplotlib (``pip install eqlosses[plot]``),
imported only when a plotting function is called; the rest is standard library and torch.
"""

from .plots import (plot_gradient_ratio, plot_group_accuracy, plot_per_class_accuracy,
                    plot_ratio_evolution)
from .recorder import StatsRecorder, read_jsonl
from .report import write_html_report

__all__ = ["StatsRecorder", "read_jsonl", "plot_gradient_ratio", "plot_ratio_evolution",
           "plot_per_class_accuracy", "plot_group_accuracy", "write_html_report"]
