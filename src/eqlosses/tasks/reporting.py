"""Tables, plots and HTML reports from run directories, finished or not.

A run directory holds ``config.yaml`` (written when training starts: the task and every
setting), ``log.jsonl`` (a ``start`` record with the class counts, then ``step`` and ``eval``
records), the statistics history ``stats.bin`` (``stats.jsonl`` for older runs) and, once the
run has finished, ``metrics.json``. :func:`report_run` draws whatever is there: a running,
stopped or crashed run gets its training curves and statistics figures and a note that it has
not finished; every missing piece is a note in the report, never a traceback.
"""

from __future__ import annotations

import json
import math
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..data.frequency import head_to_tail

__all__ = ["load_run", "format_table", "report_run", "compare_runs", "task_of",
           "run_settings", "group_ratio_text"]


# --------------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------------

def _read_config(run_dir: Path, notes: List[str]) -> Optional[Dict[str, Any]]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml  # a dependency of the package

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        notes.append(f"config.yaml is not valid YAML ({err}); the settings are not shown.")
        return None
    if not isinstance(data, dict):
        notes.append("config.yaml does not hold a mapping; the settings are not shown.")
        return None
    return data


def _read_log(run_dir: Path, notes: List[str]) -> List[Dict[str, Any]]:
    from ..monitor.recorder import read_jsonl

    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            records = read_jsonl(path)
        except ValueError as err:
            notes.append(f"log.jsonl could not be read ({err}); no training curves.")
            return []
    notes.extend(f"log.jsonl: {w.message}" for w in caught
                 if issubclass(w.category, RuntimeWarning))
    return records


def _read_metrics(run_dir: Path, notes: List[str]) -> Optional[Dict[str, Any]]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        notes.append(f"metrics.json does not parse ({err}): was the run killed while writing "
                     f"it? The run is treated as not finished.")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        notes.append("metrics.json has no 'metrics' dict; the run is treated as not finished.")
        return None
    return data


def _start_counts(log: Sequence[Dict[str, Any]]) -> Tuple[Optional[list], Optional[str]]:
    """The class counts of the last ``start`` record (a resumed run logs one per start)."""
    for rec in reversed(log):
        if rec.get("kind") == "start":
            for key, task in (("train_counts", "cls"), ("train_image_counts", "det"),
                              ("train_pixel_counts", "seg")):
                if rec.get(key) is not None:
                    return list(rec[key]), task
            return None, None
    return None, None


def _read_statistics(run_dir: Path, notes: List[str], loss: str
                     ) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """(ratio history, latest snapshot) of the run, or None where there are none."""
    from ..monitor.recorder import LEGACY_STATS_FILE, STATS_FILE, latest_stats, read_stats

    if not ((run_dir / STATS_FILE).is_file() or (run_dir / LEGACY_STATS_FILE).is_file()):
        notes.append(f"No gradient statistics were recorded ({STATS_FILE} is missing): no "
                     f"gradient-ratio figures.")
        return None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            history = read_stats(run_dir, fields=["ratio"])
            latest = latest_stats(run_dir)
        except ValueError as err:
            notes.append(f"The gradient statistics could not be read ({err}).")
            return None, None
    notes.extend(f"Statistics: {w.message}" for w in caught
                 if issubclass(w.category, RuntimeWarning))
    if latest is None:
        notes.append("No gradient statistics have been recorded yet (the first record comes "
                     "after `stats_every` steps).")
        return None, None
    if latest.get("ratio") is None:
        notes.append(f"The loss ({loss}) kept no gradient statistics in this run (built with "
                     f"track_statistics=False, or recorded by an older version), so there is "
                     f"no gradient ratio to show (its class terms are recorded).")
        return None, latest
    return history, latest


def _has_statistics(run_dir: Path) -> bool:
    from ..monitor.recorder import LEGACY_STATS_FILE, STATS_FILE

    return any((run_dir / name).is_file() for name in (STATS_FILE, LEGACY_STATS_FILE))


def load_run(run_dir: Path) -> Dict[str, Any]:
    """Everything a run directory holds, finished or not.

    Returns a dict with ``name``, ``loss``, ``task`` (from ``config.yaml``; for older runs
    without it, guessed from the metrics), ``config`` (the dict of ``config.yaml`` or None),
    ``finished`` (whether ``metrics.json`` exists), ``metrics`` (its metrics, or None),
    ``train_counts`` and ``class_names`` (from ``metrics.json``, else the counts of
    ``log.jsonl``'s start record; None when unknown), ``log`` (the records of ``log.jsonl``),
    ``stats`` (a :class:`~eqlosses.monitor.StatsHistory` of the gradient ratios, or None),
    ``latest_stats`` (the last statistics snapshot, or None), ``dir`` and ``notes`` (what is
    missing or damaged, as sentences), plus the other keys of ``metrics.json``.

    Raises FileNotFoundError when the directory does not exist or holds none of
    ``config.yaml``, ``log.jsonl``, ``metrics.json`` and a statistics history (a directory
    with only the ``stats.bin`` of a :class:`~eqlosses.monitor.StatsRecorder` in a loop of
    your own is read as a classification run whose counts are unknown).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist (expected a "
                                f"directory with config.yaml, log.jsonl and metrics.json)")
    notes: List[str] = []
    config = _read_config(run_dir, notes)
    log = _read_log(run_dir, notes)
    result = _read_metrics(run_dir, notes)
    if config is None and not log and result is None and not _has_statistics(run_dir):
        raise FileNotFoundError(f"{run_dir} is not an eqlosses run directory: it has no "
                                f"config.yaml, log.jsonl, metrics.json or stats.bin")
    run: Dict[str, Any] = dict(result or {})
    run["finished"] = result is not None
    run["metrics"] = result["metrics"] if result is not None else None
    run["dir"] = run_dir
    run["config"] = config
    run["log"] = log
    run.setdefault("name", run_dir.name)
    cfg_loss = (config or {}).get("loss")
    run.setdefault("loss", cfg_loss.get("name", "?") if isinstance(cfg_loss, dict) else "?")
    counts, start_task = _start_counts(log)
    if run.get("train_counts") is None:
        run["train_counts"] = counts
    run.setdefault("class_names", None)
    if isinstance(config, dict) and config.get("task") in _VIEWS:
        run["task"] = config["task"]
    elif run["metrics"] is not None:
        run["task"] = _guess_task(run["metrics"])
    else:
        run["task"] = start_task or "cls"
    if run["train_counts"] is None:
        notes.append("The training class counts are unknown (no metrics.json and no start "
                     "record in log.jsonl): classes are shown in index order.")
    run["stats"], run["latest_stats"] = _read_statistics(run_dir, notes, run["loss"])
    run["notes"] = notes
    return run


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

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
    counted: str  # what the training counts count


_VIEWS = {
    "cls": _TaskView((("top1", "top1"), ("balanced_accuracy", "bal.")), "top1",
                     "per_class_accuracy", "accuracy", "training images per class",
                     "training images"),
    "det": _TaskView((("AP", "AP"), ("AP50", "AP50"), ("APr", "APr"), ("APc", "APc"),
                      ("APf", "APf"), ("segm.AP", "mAP"), ("segm.APr", "mAPr"),
                      ("segm.APc", "mAPc"), ("segm.APf", "mAPf")), "AP", "per_class_ap",
                     "box AP", "LVIS groups by training images per class (rare 1-10, common "
                     "11-100, frequent > 100)", "training images containing the class"),
    "seg": _TaskView((("miou", "mIoU"), ("pixel_accuracy", "pixAcc"),
                      ("mean_accuracy", "mAcc")), "miou", "per_class_iou", "IoU",
                     "training pixel share per class", "training pixels"),
}


def _guess_task(metrics: Dict[str, Any]) -> str:
    return "seg" if "miou" in metrics else ("det" if "APr" in metrics else "cls")


def task_of(run: Dict[str, Any]) -> str:
    """``cls``, ``det`` or ``seg``: the run's ``task`` (from its ``config.yaml``, see
    :func:`load_run`), else guessed from the keys of its metrics (runs without a config).

    >>> task_of({"task": "seg", "metrics": {}}), task_of({"metrics": {"APr": 0.1}})
    ('seg', 'det')
    """
    task = run.get("task") or (run.get("config") or {}).get("task")
    if task in _VIEWS:
        return task
    return _guess_task(run.get("metrics") or {})


def _lookup(metrics: Dict[str, Any], key: str) -> Any:
    value: Any = metrics
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def format_table(runs: Sequence[Dict[str, Any]]) -> str:
    """A plain-text table (%) of the headline metrics of the runs' task (classification:
    top-1 and balanced accuracy; detection: box AP, AP50, AP_r/c/f and mask AP when
    present; segmentation: mIoU, pixel and mean accuracy), then one column per group."""
    task = task_of(runs[0]) if runs else "cls"
    view = _VIEWS[task]
    columns = [(k, label) for k, label in view.columns
               if any(_lookup(r["metrics"], k) is not None for r in runs)]
    group_names: List[str] = []
    for run in runs:
        for name in run["metrics"].get("groups", {}):
            if name not in group_names:
                group_names.append(name)
    group_names = head_to_tail(group_names)
    if task == "det":
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
    elif runs and task == "det":
        lines.append(view.groups_by)
    return "\n".join(lines)


def _bounds_text(bounds: Sequence[float]) -> str:
    low, high = bounds
    if low is None or (isinstance(low, float) and math.isinf(low)):
        return f"<= {high:g}"
    if high is None or (isinstance(high, float) and math.isinf(high)):
        return f"> {low:g}"
    return f"({low:g}, {high:g}]"


# --------------------------------------------------------------------------------------------
# Settings and status
# --------------------------------------------------------------------------------------------

def _kv(section: Any, skip: Sequence[str] = ()) -> str:
    if not isinstance(section, dict):
        return "" if section is None else str(section)
    return ", ".join(f"{k}={v}" for k, v in section.items()
                     if k not in skip and v is not None and v != {} and v != [])


def run_settings(config: Optional[Dict[str, Any]],
                 log: Sequence[Dict[str, Any]] = ()) -> Dict[str, str]:
    """The settings worth seeing at a glance, from a run's ``config.yaml`` (as a dict) and
    its log's start record: task, loss and its arguments, model, data, sampler, batch size,
    epochs, optimiser and learning rate, seed, device; empty without a config.

    >>> s = run_settings({"task": "cls", "seed": 3, "loss": {"name": "softmax_eql", "tau": 2},
    ...                   "optim": {"name": "sgd", "lr": 0.1, "epochs": 30}})
    >>> s["loss"], s["loss arguments"], s["epochs"], s["seed"]
    ('softmax_eql', 'tau=2', '30', '3')
    """
    if not config:
        return {}
    get = lambda section: config.get(section) if isinstance(config.get(section), dict) else {}
    loss, model, data, optim = get("loss"), get("model"), get("data"), get("optim")
    out: Dict[str, str] = {"task": str(config.get("task", "?")),
                           "loss": str(loss.get("name", "?")),
                           "loss arguments": _kv(loss, skip=("name",)) or "(defaults)"}
    if model:
        out["model"] = _kv(model)
    if data:
        out["data"] = _kv(data, skip=("batch_size", "eval_batch_size", "sampler",
                                      "rfs_threshold", "num_workers"))
        sampler = str(data.get("sampler", "?"))
        if sampler == "rfs":
            sampler += f" (threshold {data.get('rfs_threshold')})"
        out["sampler"] = sampler
        out["batch size"] = str(data.get("batch_size", "?"))
    if optim:
        out["epochs"] = str(optim.get("epochs", "?"))
        lr = f"{optim.get('lr', '?')} ({optim.get('name', '?')}"
        if optim.get("schedule"):
            lr += f", {optim['schedule']} schedule"
        if optim.get("warmup_epochs"):
            lr += f", {optim['warmup_epochs']} warm-up epochs"
        out["learning rate"] = lr + ")"
        out["optimiser"] = _kv(optim, skip=("name", "lr", "epochs", "schedule",
                                            "warmup_epochs"))
    for key in ("seed", "device", "stats_every"):
        if key in config:
            out[key.replace("_", " ")] = str(config[key])
    starts = [r for r in log if r.get("kind") == "start"]
    if starts:
        out["processes"] = str(starts[-1].get("world_size", "?"))
        if starts[-1].get("device"):
            out["device"] = f"{out.get('device', '?')} (ran on {starts[-1]['device']})"
    return out


def _progress(run: Dict[str, Any]) -> Tuple[Optional[int], Optional[int]]:
    """(last logged step, last epoch) of the run's log."""
    step = epoch = None
    for rec in run["log"]:
        if rec.get("kind") in ("step", "eval", "interrupted") and rec.get("step") is not None:
            step = int(rec["step"])
            if rec.get("kind") != "eval":  # an eval's epoch counts the epochs done
                epoch = int(rec.get("epoch") or 0)  # from 0
    return step, epoch


def _status(run: Dict[str, Any]) -> str:
    epochs = ((run.get("config") or {}).get("optim") or {}).get("epochs")
    step, epoch = _progress(run)
    if run["finished"]:
        done = (f" after {epochs} epoch{'s' if epochs != 1 else ''}" if epochs is not None
                else "")
        return (f"The run has finished{done}" + (f" ({step} steps)." if step else "."))
    where = "No training step has been logged yet."
    if step is not None:
        where = f"The last logged step is {step}" + (
            f", in epoch {epoch + 1}" + (f" of {epochs}" if epochs is not None else "")
            if epoch is not None else "") + "."
    stopped = [r for r in run["log"] if r.get("kind") == "interrupted"]
    how = ""
    if stopped and stopped[-1] is run["log"][-1]:
        saved = stopped[-1].get("saved")
        how = (f" It was interrupted at step {stopped[-1].get('step')}"
               + (f" with a checkpoint saved; `eqlosses train {run['task']} --resume --run "
                  f"{shlex.quote(str(run['dir']))}` continues it." if saved else "."))
    return (f"This run has not finished: there is no metrics.json yet (it is still "
            f"training, or it stopped or crashed). {where}{how} The figures show the run as "
            f"far as it got; the final metrics come with metrics.json.")


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def _captions(view: _TaskView) -> Dict[str, str]:
    return {
        "curves": ("Top: the training loss at each logged step (faint; with its moving "
                   "average on long runs) and the learning rate (dashed, right axis). Bottom, "
                   "when the run has been evaluated: the evaluation metrics after each "
                   "evaluation (solid) and each frequency group's (dashed)."),
        "per_class": (f"Each point is one class's {view.metric} on the evaluation set; the "
                      f"classes are sorted by training count, head on the left, and the grey "
                      f"bars are the training counts ({view.counted}, right axis, log scale). "
                      f"Under a plain loss the {view.metric} falls from head to tail; a gap is "
                      f"a class without evaluation samples."),
        "groups": (f"The {view.metric} overall and per frequency group ({view.groups_by}), one "
                   f"bar per run, numbers in percent. The tail groups show whether a loss "
                   f"helps the rare classes and what it costs the frequent ones."),
        "ratio": ("Top: the accumulated gradient ratio P/N of every class at the last recorded "
                  "step, classes sorted by training count (head on the left; dashed line: "
                  "training count, right log axis); the dotted red line is the balanced ratio "
                  "1. Bottom: the accumulated positive (P) and negative (N) gradient "
                  "magnitudes, log scale. Ratios far below 1 mark classes whose classifier "
                  "is mostly pushed down."),
        "ratio_runs": ("The paper's figure 1 on this data: the accumulated gradient ratio P/N "
                       "of every class at the last recorded step, one colour per run, classes "
                       "sorted by training count (head on the left; dashed line: training "
                       "count, right log axis); the dotted red line is the balanced ratio 1. "
                       "Under a plain loss (cross-entropy) the tail classes' ratios fall "
                       "below 1: their classifiers receive more negative than positive "
                       "gradient; an equalization loss lifts them towards 1. The ratios are "
                       "accumulated from step 0: once a model fits an easy training set they "
                       "drift back towards 1, so read the evolution figure too."),
        "evolution": ("The gradient ratio of every class at each recorded step, one line per "
                      "class coloured by frequency rank (dark: head, yellow: tail); the dotted "
                      "red line is the balanced ratio 1. Whether the tail lines rise towards 1 "
                      "shows whether the loss is equalising the classes."),
    }


def _ratio_groups(task: str, metrics: Optional[Dict[str, Any]], counts: Any) -> Any:
    """The frequency groups of the run's classes, as its metrics define them (``group_bounds``
    over the training counts; segmentation: over the pixel share), LVIS groups for detection;
    None when they cannot be told."""
    import torch

    from ..data.frequency import FrequencyGroups, lvis_groups

    if counts is None:
        return None
    values = torch.as_tensor(counts, dtype=torch.float64)
    if task == "det":
        return lvis_groups(values)
    bounds = (metrics or {}).get("group_bounds")
    if not bounds:
        return None
    if task == "seg":
        values = values / values.sum().clamp(min=1)
    masks, kept = {}, {}
    for name, (low, high) in bounds.items():
        low = -math.inf if low is None else float(low)
        high = math.inf if high is None else float(high)
        masks[name], kept[name] = (values > low) & (values <= high), (low, high)
    return FrequencyGroups(masks=masks, bounds=kept)


def group_ratio_text(runs: Sequence[Dict[str, Any]]) -> str:
    """One sentence giving each run's mean gradient ratio per frequency group
    (:func:`eqlosses.monitor.diagnosis.group_ratios` of its latest statistics), or ``""``."""
    from ..monitor.diagnosis import group_ratios

    parts = []
    for run in runs:
        latest = run.get("latest_stats")
        if not latest or latest.get("pos_grad") is None or latest.get("neg_grad") is None:
            continue
        groups = _ratio_groups(task_of(run), run.get("metrics"), run.get("train_counts"))
        if groups is None:
            continue
        try:
            ratios = group_ratios(latest, run["train_counts"], groups)
        except ValueError:
            continue
        parts.append(f"{run['name']}: " + ", ".join(
            f"{g} {v:.3g}" for g, v in ratios.items()))
    if not parts:
        return ""
    return (" Mean ratio P/N per frequency group at the last recorded step (1 = balanced): "
            + "; ".join(parts) + ".")


def _draw(missing: List[str], what: str, make: Callable[[], Any]) -> bool:
    """Run one plotting call; a ValueError becomes a note instead of a traceback."""
    try:
        make()
        return True
    except ValueError as err:
        missing.append(f"The {what} could not be drawn: {err}")
        return False


def _results_of(run: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """The runs for the results table and a note saying where the numbers come from."""
    if run["metrics"] is not None:
        return [run], None
    evals = [r for r in run["log"] if r.get("kind") == "eval"]
    if not evals:
        return [], "The run has not been evaluated yet."
    last = evals[-1]
    metrics = {k: v for k, v in last.items() if k not in ("kind", "epoch", "step")}
    return ([{"name": run["name"], "loss": run["loss"], "metrics": metrics}],
            f"From the last evaluation in log.jsonl (after epoch {last.get('epoch')}, step "
            f"{last.get('step')}); the run has not finished.")


def report_run(run_dir: Path) -> Path:
    """Plots and a self-contained HTML report for one run, written inside the run directory.

    Works on a finished run and on one that is still running, was stopped or crashed (no
    ``metrics.json``): it then shows the training curves, the statistics figures and the
    last evaluation logged, with a note that the run has not finished. Figures go to
    ``run_dir/plots``, the report to ``run_dir/report.html`` (returned).
    """
    from ..monitor import plots
    from ..monitor.report import ReportImage, write_html_report

    run = load_run(run_dir)
    task = task_of(run)
    view = _VIEWS[task]
    captions = _captions(view)
    out = Path(run_dir) / "plots"
    counts, names = run["train_counts"], run.get("class_names")
    missing = list(run["notes"])
    images: List[ReportImage] = []

    def add(key: str, png: Path, title: str, what: str, make: Callable[[Path], Any],
            caption: Optional[str] = None) -> None:
        if _draw(missing, what, lambda: make(png)):
            images.append(ReportImage(png, title, caption or captions[key]))

    if any(r.get("kind") in ("step", "eval") for r in run["log"]):
        add("curves", out / "training_curves.png", "Training curves", "training curves",
            lambda png: plots.plot_training_curves(run["log"], png))
    else:
        missing.append("No training step has been logged yet: no training curves.")
    per_class = (run["metrics"] or {}).get(view.per_class)
    if per_class is not None:
        add("per_class", out / f"{view.per_class}.png", f"Per-class {view.metric}",
            f"per-class {view.metric} figure",
            lambda png: plots.plot_per_class_accuracy(
                {run["name"]: per_class}, counts, png, metric=view.metric, class_names=names))
    elif run["finished"]:
        missing.append(f"metrics.json has no {view.per_class}: no per-class figure.")
    latest = run["latest_stats"]
    if run["stats"] is not None and latest is not None:
        add("ratio", out / "gradient_ratio.png",
            f"Gradient ratio per class at step {latest['step']}", "gradient-ratio figure",
            lambda png: plots.plot_gradient_ratio(latest, counts, png, class_names=names),
            captions["ratio"] + group_ratio_text([run]))
        add("evolution", out / "ratio_evolution.png", "Gradient ratio during training",
            "ratio-evolution figure",
            lambda png: plots.plot_ratio_evolution(run["stats"], counts, png,
                                                   class_names=names))
    results, results_note = _results_of(run)
    settings = run_settings(run["config"], run["log"])
    if run["config"] is None:
        missing.append("config.yaml is missing: the run settings are unknown (a run of an "
                       "older version?).")
    return write_html_report(
        Path(run_dir) / "report.html", f"eqlosses run {run['name']}", results, images,
        status=_status(run), missing=missing, results_note=results_note,
        settings={run["name"]: settings} if settings else None,
        configs=_config_texts([run]), explain_ratio=run["stats"] is not None,
        **_report_args(task, results))


def _config_texts(runs: Sequence[Dict[str, Any]]) -> Dict[str, str]:
    out = {}
    for run in runs:
        path = Path(run["dir"]) / "config.yaml"
        if run.get("config") is not None and path.is_file():
            out[str(run["name"])] = path.read_text(encoding="utf-8")
    return out


def _report_args(task: str, runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    if task == "cls" or not runs:
        return {}
    view = _VIEWS[task]
    columns = [(k, label) for k, label in view.columns
               if any(_lookup(r["metrics"], k) is not None for r in runs)]
    note = f"Groups: {view.groups_by}."
    bounds = runs[0]["metrics"].get("group_bounds")
    if bounds:
        note = f"Groups by {view.groups_by}: " + ", ".join(
            f"{g} {_bounds_text(b)}" for g, b in bounds.items()) + "."
    return {"columns": columns, "group_note": note}


def compare_runs(run_dirs: Sequence[Path], out_dir: Path, title: str = "eqlosses comparison"
                 ) -> Dict[str, Any]:
    """Table, side-by-side plots and one HTML report for several finished runs.

    The runs must be of one task and trained on the same data (class counts). Writes
    ``table.txt``, the figures and ``report.html`` into ``out_dir``; returns ``{"table",
    "report", "images"}`` (the images as paths). Runs with gradient statistics (every loss of
    the pipelines records them, the baselines with ``track_statistics``) get one figure of
    their per-class gradient ratios side by side (``gradient_ratio_runs.png``: the paper's
    figure 1 for, e.g., cross-entropy next to Softmax-EQL), captioned with each run's mean
    ratio per frequency group, then their ratio evolutions and one ratio figure per run.
    """
    from ..monitor import plots
    from ..monitor.report import ReportImage, write_html_report

    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    for d in run_dirs:
        if not (Path(d) / "metrics.json").is_file():
            raise FileNotFoundError(f"{d} has no metrics.json: compare needs finished runs "
                                    f"(draw an unfinished one with `eqlosses plot {d}`)")
    runs = [load_run(Path(d)) for d in run_dirs]
    unfinished = [str(r["dir"]) for r in runs if not r["finished"]]
    if unfinished:
        raise ValueError(f"these runs have a damaged metrics.json: {', '.join(unfinished)}")
    counts = runs[0]["train_counts"]
    for run in runs[1:]:
        if run["train_counts"] != counts:
            raise ValueError(f"runs {runs[0]['name']} and {run['name']} were trained on "
                             f"different data (class counts differ); compare like with like")
    tasks = {task_of(r) for r in runs}
    if len(tasks) > 1:
        raise ValueError(f"the runs are of different tasks ({', '.join(sorted(tasks))}); "
                         f"compare like with like")
    task = tasks.pop()
    view = _VIEWS[task]
    captions = _captions(view)
    names = next((r["class_names"] for r in runs if r.get("class_names")), None)
    out_dir = Path(out_dir)
    missing: List[str] = []
    images: List[ReportImage] = []

    def add(key: str, png: Path, title: str, what: str, make: Callable[[Path], Any],
            caption: Optional[str] = None) -> None:
        if _draw(missing, what, lambda: make(png)):
            images.append(ReportImage(png, title, caption or captions[key]))

    add("groups", out_dir / "group_metric.png",
        f"{view.metric[0].upper()}{view.metric[1:]} by frequency group",
        "group figure", lambda png: plots.plot_group_accuracy(
            {r["name"]: {"overall": r["metrics"].get(view.overall, math.nan),
                         **{g: r["metrics"]["groups"][g]
                            for g in head_to_tail(r["metrics"].get("groups") or {})}}
             for r in runs}, png,
            metric=view.metric))
    with_per_class = {r["name"]: r["metrics"][view.per_class] for r in runs
                      if r["metrics"].get(view.per_class) is not None}
    if with_per_class:
        add("per_class", out_dir / f"{view.per_class}.png", f"Per-class {view.metric}",
            f"per-class {view.metric} figure",
            lambda png: plots.plot_per_class_accuracy(with_per_class, counts, png,
                                                      metric=view.metric, class_names=names))
    with_stats = [r for r in runs if r["stats"] is not None]
    for run in runs:
        missing.extend(f"{run['name']}: {n}" for n in run["notes"])
    if with_stats:
        add("ratio_runs", out_dir / "gradient_ratio_runs.png",
            "Gradient ratio per class, per run", "gradient-ratio comparison figure",
            lambda png: plots.plot_gradient_ratio_runs(
                {r["name"]: r["latest_stats"] for r in with_stats}, counts, png,
                class_names=names),
            captions["ratio_runs"] + group_ratio_text(with_stats))
        add("evolution", out_dir / "ratio_evolution.png",
            "Gradient ratio during training, per run", "ratio-evolution figure",
            lambda png: plots.plot_ratio_evolution_runs(
                {r["name"]: r["stats"] for r in with_stats}, counts, png, class_names=names),
            captions["evolution"] + " One panel per run, on a shared y axis.")
    for run in with_stats:
        latest = run["latest_stats"]
        add("ratio", out_dir / f"gradient_ratio_{run['name']}.png",
            f"{run['name']}: gradient ratio per class at step {latest['step']}",
            f"gradient-ratio figure of {run['name']}",
            lambda png, run=run, latest=latest: plots.plot_gradient_ratio(
                latest, counts, png, title=f"{run['name']}: accumulated gradient ratio "
                                           f"(step {latest['step']})", class_names=names))
    table = format_table(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.txt").write_text(table + "\n")
    settings = {r["name"]: run_settings(r["config"], r["log"]) for r in runs if r["config"]}
    report = write_html_report(out_dir / "report.html", title, runs, images, missing=missing,
                               settings=settings or None, configs=_config_texts(runs),
                               explain_ratio=bool(with_stats), **_report_args(task, runs))
    return {"table": table, "report": report, "images": [Path(i.path) for i in images]}
