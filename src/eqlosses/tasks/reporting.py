"""Tables, plots and HTML reports from run directories (metrics.json + stats.jsonl)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..data.frequency import head_to_tail

__all__ = ["load_run", "format_table", "report_run", "compare_runs"]


def load_run(run_dir: Path) -> Dict[str, Any]:
    """A finished run's ``metrics.json`` plus its statistics records (if any)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.json: is it an eqlosses run "
                                f"directory, and did the run finish (or resume it)?")
    run = json.loads(path.read_text())
    run["dir"] = run_dir
    stats = run_dir / "stats.jsonl"
    if stats.is_file():
        from ..monitor.recorder import read_jsonl
        run["stats"] = read_jsonl(stats)
    else:
        run["stats"] = []
    return run


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "   -  "
    return f"{100 * value:6.2f}"


def format_table(runs: Sequence[Dict[str, Any]]) -> str:
    """A plain-text table: top-1, balanced accuracy and accuracy by frequency group (%)."""
    group_names: List[str] = []
    for run in runs:
        for name in run["metrics"].get("groups", {}):
            if name not in group_names:
                group_names.append(name)
    group_names = head_to_tail(group_names)
    width = max([len("run")] + [len(r["name"]) for r in runs])
    head = f"{'run':<{width}}  {'loss':<16} {'top1':>6} {'bal.':>6} " + " ".join(
        f"{g:>6}" for g in group_names)
    lines = [head, "-" * len(head)]
    for run in runs:
        m = run["metrics"]
        lines.append(f"{run['name']:<{width}}  {run['loss']:<16} {_pct(m.get('top1'))} "
                     f"{_pct(m.get('balanced_accuracy'))} "
                     + " ".join(_pct(m.get("groups", {}).get(g)) for g in group_names))
    bounds = runs[0]["metrics"].get("group_bounds") if runs else None
    if bounds:
        lines.append("groups by training images per class: " + ", ".join(
            f"{g} {_bounds_text(b)}" for g, b in bounds.items()))
    return "\n".join(lines)


def _bounds_text(bounds: Sequence[float]) -> str:
    low, high = bounds
    if low is None or (isinstance(low, float) and math.isinf(low)):
        return f"<= {high:g}"
    if high is None or (isinstance(high, float) and math.isinf(high)):
        return f"> {low:g}"
    return f"({low:g}, {high:g}]"


def report_run(run_dir: Path) -> Path:
    """Plots and a self-contained HTML report for one run, written inside the run directory."""
    from ..monitor import plots
    from ..monitor.report import write_html_report

    run = load_run(run_dir)
    out = Path(run_dir) / "plots"
    counts = run["train_counts"]
    images = [plots.plot_per_class_accuracy({run["name"]: run["metrics"]["per_class_accuracy"]},
                                            counts, out / "per_class_accuracy.png")]
    if run["stats"] and run["stats"][-1].get("ratio") is not None:
        images.append(plots.plot_gradient_ratio(run["stats"][-1], counts,
                                                out / "gradient_ratio.png"))
        images.append(plots.plot_ratio_evolution(run["stats"], counts,
                                                 out / "ratio_evolution.png"))
    return write_html_report(Path(run_dir) / "report.html", f"eqlosses run {run['name']}",
                             [run], images, notes=format_table([run]))


def compare_runs(run_dirs: Sequence[Path], out_dir: Path, title: str = "eqlosses comparison"
                 ) -> Dict[str, Any]:
    """Table, side-by-side plots and one HTML report for several runs."""
    from ..monitor import plots
    from ..monitor.report import write_html_report

    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise ValueError("compare needs at least one run directory")
    counts = runs[0]["train_counts"]
    for run in runs[1:]:
        if run["train_counts"] != counts:
            raise ValueError(f"runs {runs[0]['name']} and {run['name']} were trained on "
                             f"different data (class counts differ); compare like with like")
    out_dir = Path(out_dir)
    images = [
        plots.plot_group_accuracy({r["name"]: {"overall": r["metrics"]["top1"],
                                               **r["metrics"].get("groups", {})}
                                   for r in runs}, out_dir / "group_accuracy.png"),
        plots.plot_per_class_accuracy({r["name"]: r["metrics"]["per_class_accuracy"]
                                       for r in runs}, counts,
                                      out_dir / "per_class_accuracy.png"),
    ]
    for run in runs:
        if run["stats"] and run["stats"][-1].get("ratio") is not None:
            images.append(plots.plot_gradient_ratio(
                run["stats"][-1], counts, out_dir / f"gradient_ratio_{run['name']}.png",
                title=f"{run['name']}: accumulated gradient ratio"))
    table = format_table(runs)
    (out_dir / "table.txt").write_text(table + "\n")
    report = write_html_report(out_dir / "report.html", title, runs, images, notes=table)
    return {"table": table, "report": report, "images": images}
