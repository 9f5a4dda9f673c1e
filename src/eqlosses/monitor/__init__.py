"""Training monitoring: gradient-statistics recorder, diagnosis, figures and an HTML report.

:class:`StatsRecorder` writes a run's bounded statistics history (``stats.bin``);
:func:`read_stats` and :func:`latest_stats` read it back (and the ``stats.jsonl`` of older
runs). The figures (:mod:`eqlosses.monitor.plots`) need matplotlib
(``pip install eqlosses[plot]``), imported only when a plotting function is called; the rest is
standard library, numpy and torch. :class:`GradientMonitor` and :func:`group_ratios`
(:mod:`eqlosses.monitor.diagnosis`) diagnose any training loop from its logits and targets.
"""

from .diagnosis import GradientMonitor, class_ratios, group_ratios
from .plots import (plot_gradient_ratio, plot_gradient_ratio_runs, plot_group_accuracy,
                    plot_per_class_accuracy, plot_ratio_evolution, plot_ratio_evolution_runs,
                    plot_training_curves)
from .recorder import (LEGACY_STATS_FILE, STATS_FILE, StatsHistory, StatsRecorder,
                       latest_stats, read_jsonl, read_stats, truncate_stats)
from .report import GRADIENT_RATIO_EXPLANATION, ReportImage, write_html_report

__all__ = ["StatsRecorder", "StatsHistory", "read_stats", "latest_stats", "truncate_stats",
           "read_jsonl", "STATS_FILE", "LEGACY_STATS_FILE", "GradientMonitor", "group_ratios",
           "class_ratios", "plot_gradient_ratio", "plot_gradient_ratio_runs",
           "plot_ratio_evolution", "plot_ratio_evolution_runs", "plot_per_class_accuracy",
           "plot_group_accuracy", "plot_training_curves", "write_html_report", "ReportImage",
           "GRADIENT_RATIO_EXPLANATION"]
