"""Tables, plots and HTML reports from run directories (metrics.json + stats.jsonl)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from ..data.frequency import head_to_tail

__all__ = ["load_run", "format_table", "report_run", "compare_runs", "task_of"]


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


@dataclass(frozen=True)
class _TaskView:
    """How a task's metrics are shown: headline columns, per-class metric, group wording."""

    columns: Tuple[Tuple[str, str], ...]
    overall: str  # the key of the overall number, for the group plot
    per_class: str  # the key of the per-class values
    metric: str  # what the numbers are
    groups_by: str  # what the groups are counted in


_VIEWS = {
    "cls": _TaskView((("top1", "top1"), ("balanced_accuracy", "bal.")), "top1",
                     "per_class_accuracy", "accuracy", "training images per class"),
    "det": _TaskView((("AP", "AP"), ("AP50", "AP50"), ("APr", "APr"), ("APc", "APc"),
                      ("APf", "APf"), ("segm.AP", "mAP"), ("segm.APr", "mAPr"),
                      ("segm.APc", "mAPc"), ("segm.APf", "mAPf")), "AP", "per_class_ap",
                     "box AP", "LVIS groups by training images per class (rare 1-10, common "
                     "11-100, frequent > 100)"),
    "seg": _TaskView((("miou", "mIoU"), ("pixel_accuracy", "pixAcc"),
                      ("mean_accuracy", "mAcc")), "miou", "per_class_iou", "IoU",
                     "training pixel share per class"),
}


def task_of(run: Dict[str, Any]) -> str:
    """``cls``, ``det`` or ``seg``, from the keys of a run's metrics."""
    m = run["metrics"]
    return "seg" if "miou" in m else ("det" if "APr" in m else "cls")


def _lookup(metrics: Dict[str, Any], key: str) -> Any:
    value: Any = metrics
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def format_table(runs: Sequence[Dict[str, Any]]) -> str:
    """A plain-text table (%) of the headline metrics of the runs' task (classification:
    top-1 and balanced accuracy; detection: box AP, AP50, AP_r/c/f and mask AP when
    present; segmentation: mIoU, pixel and mean accuracy), then one column per group."""
    view = _VIEWS[task_of(runs[0])] if runs else _VIEWS["cls"]
    columns = [(k, label) for k, label in view.columns
               if any(_lookup(r["metrics"], k) is not None for r in runs)]
    group_names: List[str] = []
    for run in runs:
        for name in run["metrics"].get("groups", {}):
            if name not in group_names:
                group_names.append(name)
    group_names = head_to_tail(group_names)
    if task_of(runs[0]) == "det" if runs else False:
        group_names = []  # APr / APc / APf are the groups
    width = max([len("run")] + [len(r["name"]) for r in runs])
    head = f"{'run':<{width}}  {'loss':<16} " + " ".join(
        f"{label:>6}" for _, label in columns) + " " + " ".join(f"{g:>6}" for g in group_names)
    lines = [head.rstrip(), "-" * len(head.rstrip())]
    for run in runs:
        m = run["metrics"]
        lines.append((f"{run['name']:<{width}}  {run['loss']:<16} "
                      + " ".join(_pct(_lookup(m, k)) for k, _ in columns) + " "
                      + " ".join(_pct(m.get("groups", {}).get(g)) for g in group_names)
                      ).rstrip())
    bounds = runs[0]["metrics"].get("group_bounds") if runs else None
    if bounds:
        lines.append(f"groups by {view.groups_by}: " + ", ".join(
            f"{g} {_bounds_text(b)}" for g, b in bounds.items()))
    elif runs and task_of(runs[0]) == "det":
        lines.append(view.groups_by)
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
    view = _VIEWS[task_of(run)]
    out = Path(run_dir) / "plots"
    counts = run["train_counts"]
    images = [plots.plot_per_class_accuracy({run["name"]: run["metrics"][view.per_class]},
                                            counts, out / f"{view.per_class}.png",
                                            metric=view.metric)]
    if run["stats"] and run["stats"][-1].get("ratio") is not None:
        images.append(plots.plot_gradient_ratio(run["stats"][-1], counts,
                                                out / "gradient_ratio.png"))
        images.append(plots.plot_ratio_evolution(run["stats"], counts,
                                                 out / "ratio_evolution.png"))
    return write_html_report(Path(run_dir) / "report.html", f"eqlosses run {run['name']}",
                             [run], images, notes=format_table([run]), **_report_args(run))


def _report_args(run: Dict[str, Any]) -> Dict[str, Any]:
    task = task_of(run)
    if task == "cls":
        return {}
    view = _VIEWS[task]
    columns = [(k, label) for k, label in view.columns if _lookup(run["metrics"], k) is not None]
    note = f"Groups: {view.groups_by}."
    bounds = run["metrics"].get("group_bounds")
    if bounds:
        note = f"Groups by {view.groups_by}: " + ", ".join(
            f"{g} {_bounds_text(b)}" for g, b in bounds.items()) + "."
    return {"columns": columns, "group_note": note}


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
    tasks = {task_of(r) for r in runs}
    if len(tasks) > 1:
        raise ValueError(f"the runs are of different tasks ({', '.join(sorted(tasks))}); "
                         f"compare like with like")
    view = _VIEWS[tasks.pop()]
    out_dir = Path(out_dir)
    images = [
        plots.plot_group_accuracy({r["name"]: {"overall": r["metrics"][view.overall],
                                               **r["metrics"].get("groups", {})}
                                   for r in runs}, out_dir / "group_metric.png",
                                  metric=view.metric),
        plots.plot_per_class_accuracy({r["name"]: r["metrics"][view.per_class]
                                       for r in runs}, counts,
                                      out_dir / f"{view.per_class}.png", metric=view.metric),
    ]
    for run in runs:
        if run["stats"] and run["stats"][-1].get("ratio") is not None:
            images.append(plots.plot_gradient_ratio(
                run["stats"][-1], counts, out_dir / f"gradient_ratio_{run['name']}.png",
                title=f"{run['name']}: accumulated gradient ratio"))
    table = format_table(runs)
    (out_dir / "table.txt").write_text(table + "\n")
    report = write_html_report(out_dir / "report.html", title, runs, images, notes=table,
                               **_report_args(runs[0]))
    return {"table": table, "report": report, "images": images}
