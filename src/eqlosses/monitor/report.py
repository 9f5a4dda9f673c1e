"""A self-contained HTML report of long-tailed training runs.

One file, no JavaScript, no external resource: the CSS is inline and the figures are embedded
as base64 ``data:`` URIs, so the report opens in any browser from disk, can be mailed or
archived, and never changes. All text taken from the runs, the title, the captions and the
notes is escaped.

A report has, in order: the title; a status line (e.g. that the run has not finished) and
notes on what is missing; the results table with the frequency groups' thresholds; the run
settings (one column per run, the values that differ between runs highlighted, the full
``config.yaml`` of each run in a collapsed block); what the gradient ratio is and how to read
it; the figures, each with a title and a caption; free notes, pre-formatted.
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..data.frequency import head_to_tail

__all__ = ["write_html_report", "ReportImage", "GRADIENT_RATIO_EXPLANATION"]

PathLike = Union[str, "os.PathLike[str]"]

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".svg": "image/svg+xml"}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .35em .8em; }
th { background: #f3f3f3; text-align: center; }
td.num { text-align: right; }
td.best { font-weight: bold; background: #eef7ee; }
p.bounds, p.meta { color: #555; font-size: .92em; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: .92em; max-width: 60em; }
pre { background: #fafafa; border-left: 3px solid #ccc; padding: .6em 1em; overflow-x: auto;
      font-size: .88em; }
p.status { background: #fff6e0; border-left: 4px solid #e0a000; padding: .6em 1em; }
ul.missing { color: #555; font-size: .92em; }
div.explain { background: #f4f8fc; border-left: 4px solid #4a86c5; padding: .2em 1em; }
table.settings td { vertical-align: top; }
table.settings td.differs { background: #fff6e0; }
details { margin: .5em 0; }
"""

#: what the gradient ratio is and how to read it (plain text paragraphs)
GRADIENT_RATIO_EXPLANATION = (
    "The gradient ratio of class j is P_j / N_j: the accumulated magnitude of the positive "
    "gradients that the classifier of class j has received (from the samples of class j, "
    "raising its score) over the accumulated magnitude of its negative gradients (from the "
    "samples of every other class, lowering its score), both summed over all training steps "
    "so far. A ratio of 1 means that the class has been pushed up as much as down: it is "
    "balanced.",
    "The argument of the equalization losses (Tan et al., The Equalization Losses, "
    "arXiv:2210.05566): under a plain loss (cross-entropy, sigmoid cross-entropy, focal loss) "
    "a head class has a ratio close to 1, but a tail class, with few positive samples and the "
    "negatives of all the other classes, ends far below 1: its classifier is mostly "
    "suppressed, and its recall and accuracy drop. Each equalization loss re-weights or "
    "re-shapes the loss of every class as a function of its ratio (or of P_j) so as to lift "
    "the tail's ratios towards 1.",
    "How to read the figures: in the bar chart the classes are sorted by training count, head "
    "on the left, with the count as a dashed line on the right-hand log axis; bars far below "
    "the dotted line at 1 are suppressed classes. The panel under it shows P_j and N_j "
    "themselves on a log scale: where N_j towers over P_j the class is dominated by negative "
    "gradient. In the evolution figure every class is one line, dark for the head and yellow "
    "for the tail; the ratios move fast early (the first steps) and settle as the sums grow. "
    "Losses without gradient statistics (cross-entropy, balanced softmax) record no ratio.",
)


@dataclass(frozen=True)
class ReportImage:
    """A figure of a report: the image file, its title and a caption saying how to read it.

    >>> ReportImage("ratio.png", "Gradient ratio per class").title
    'Gradient ratio per class'
    """

    path: "PathLike"
    title: str
    caption: str = ""


def _finite(value: Any) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt_bound(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _describe_bounds(bounds: Mapping[str, Sequence[float]]) -> str:
    """Describe thresholds: a group holds the classes with ``low < count <= high``.

    ``{"few": (-inf, 19), "medium": (19, 100)}`` -> "few: count ≤ 19; medium: 20 ≤ count ≤ 100"
    """
    parts = []
    for name, (lo, hi) in bounds.items():
        lo, hi = float(lo), float(hi)
        if math.isinf(lo) and math.isinf(hi):
            rule = "any count"
        elif math.isinf(lo):
            rule = f"count \u2264 {_fmt_bound(hi)}"
        elif math.isinf(hi):
            rule = f"count > {_fmt_bound(lo)}"
        elif lo.is_integer():  # counts are integers: state the smallest count of the group
            rule = f"{_fmt_bound(lo + 1)} \u2264 count \u2264 {_fmt_bound(hi)}"
        else:
            rule = f"{_fmt_bound(lo)} < count \u2264 {_fmt_bound(hi)}"
        parts.append(f"{name}: {rule}")
    return "; ".join(parts)


def _check_runs(runs: Sequence[Mapping[str, Any]]) -> None:
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise ValueError(f"runs[{i}] must be a dict with 'name', 'loss' and 'metrics', got "
                             f"{type(run).__name__}")
        missing = [k for k in ("name", "loss", "metrics") if k not in run]
        if missing:
            raise ValueError(f"runs[{i}] lacks {missing}; each run needs 'name', 'loss' and "
                             f"'metrics' (found keys {sorted(run)})")
        if not isinstance(run["metrics"], Mapping):
            found = type(run["metrics"]).__name__
            raise ValueError(f"runs[{i}]['metrics'] must be the dict of "
                             f"a metrics compute(), got {found}")


#: the headline columns (metric key, label) of the classification results table
CLASSIFICATION_COLUMNS = (("top1", "Top-1"), ("balanced_accuracy", "Balanced acc."))


def _lookup(metrics: Mapping[str, Any], key: str) -> Any:
    """``metrics[key]``, where a dotted key reads a nested dict (``segm.AP``)."""
    value: Any = metrics
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _results_table(runs: Sequence[Mapping[str, Any]],
                   columns: Sequence[Tuple[str, str]] = CLASSIFICATION_COLUMNS
                   ) -> Tuple[str, List[str]]:
    groups: List[str] = []
    for run in runs:
        groups.extend(g for g in (run["metrics"].get("groups") or {}) if g not in groups)
    groups = head_to_tail(groups)
    all_columns = [(key, f"{label} (%)") for key, label in columns]
    all_columns += [(f"groups.{g}", f"{g} (%)") for g in groups]
    values: List[List[Optional[float]]] = []
    for run in runs:
        values.append([_finite(_lookup(run["metrics"], key)) for key, _ in all_columns])
    columns = all_columns
    best = []
    for j in range(len(columns)):
        col = [row[j] for row in values if row[j] is not None]
        best.append(max(col) if len(col) > 1 else None)

    e = html.escape
    head = "".join(f"<th>{e(label)}</th>" for _, label in columns)
    lines = ["<table>", f"<thead><tr><th>Run</th><th>Loss</th>{head}</tr></thead>", "<tbody>"]
    for run, row in zip(runs, values):
        cells = []
        for j, v in enumerate(row):
            if v is None:
                cells.append('<td class="num">\u2013</td>')
            else:
                cls = "num best" if best[j] is not None and v == best[j] else "num"
                cells.append(f'<td class="{cls}">{100 * v:.2f}</td>')
        lines.append(f"<tr><td>{e(str(run['name']))}</td><td>{e(str(run['loss']))}</td>"
                     f"{''.join(cells)}</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines), groups


def _bounds_note(runs: Sequence[Mapping[str, Any]]) -> str:
    described: Dict[str, List[str]] = {}
    for run in runs:
        bounds = run["metrics"].get("group_bounds") or {}
        if bounds:
            described.setdefault(_describe_bounds(bounds), []).append(str(run["name"]))
    if not described:
        return ""
    e = html.escape
    if len(described) == 1:
        (text,) = described
        return (f'<p class="bounds">Frequency groups by training count per class: {e(text)}. '
                f"A group's accuracy is the mean of the per-class accuracies of its classes "
                f"that have test samples; balanced accuracy is the same mean over all "
                f"classes.</p>")
    items = "".join(f"<li>{e(', '.join(names))}: {e(text)}</li>"
                    for text, names in described.items())
    return (f'<p class="bounds">Frequency groups by training count per class (they differ '
            f"between runs):</p><ul>{items}</ul>")


def _figure(image: Union[PathLike, ReportImage]) -> str:
    if isinstance(image, ReportImage):
        path, title, caption = Path(image.path), image.title, image.caption
    else:
        path = Path(image)
        title, caption = path.stem.replace("_", " "), ""
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"cannot embed {path}: expected an image file ending in "
                         f"{sorted(_MIME)}, found {path.suffix or 'no suffix'!r}")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    e = html.escape
    text = f"<b>{e(title)}.</b> {e(caption)}" if caption else e(title)
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{e(title)}">'
            f"<figcaption>{text}</figcaption></figure>")


def _settings_table(settings: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per setting, one column per run; values that differ between runs marked."""
    e = html.escape
    keys: List[str] = []
    for values in settings.values():
        keys.extend(k for k in values if k not in keys)
    names = list(settings)
    lines = ['<table class="settings">']
    if len(names) > 1:
        lines.append("<thead><tr><th>Setting</th>"
                     + "".join(f"<th>{e(str(n))}</th>" for n in names) + "</tr></thead>")
    lines.append("<tbody>")
    for key in keys:
        row = [settings[n].get(key) for n in names]
        differs = len(names) > 1 and len({str(v) for v in row}) > 1
        cls = ' class="differs"' if differs else ""
        cells = "".join(f"<td{cls}>{e('' if v is None else str(v))}</td>" for v in row)
        lines.append(f"<tr><th>{e(key)}</th>{cells}</tr>")
    lines += ["</tbody>", "</table>"]
    if len(names) > 1 and any(len({str(settings[n].get(k)) for n in names}) > 1
                              for k in keys):
        lines.append('<p class="meta">Highlighted: settings that differ between the runs.</p>')
    return "\n".join(lines)


def write_html_report(out_html: PathLike, title: str, runs: Sequence[Mapping[str, Any]],
                      images: Sequence[Union[PathLike, ReportImage]], notes: str = "",
                      columns: Sequence[Tuple[str, str]] = CLASSIFICATION_COLUMNS,
                      group_note: Optional[str] = None, *, status: Optional[str] = None,
                      missing: Sequence[str] = (), results_note: Optional[str] = None,
                      settings: Optional[Mapping[str, Mapping[str, Any]]] = None,
                      configs: Optional[Mapping[str, str]] = None,
                      explain_ratio: bool = False) -> Path:
    """Write one self-contained HTML report and return its path.

    The report has the title; the ``status`` (highlighted) and the ``missing`` notes; a
    results table (one row per run: name, loss, the headline columns and each frequency
    group's value, in percent, the best of each column in bold; ``–`` where a value is missing
    or NaN) with the group thresholds stated under it (from the runs' ``group_bounds``); the
    run settings; the explanation of the gradient ratio; the figures (embedded as ``data:``
    URIs, each with its title and caption) and the notes (pre-formatted text).

    Args:
        out_html: the file to write (parent directories are created).
        title: the report title.
        runs: dicts with at least ``name``, ``loss`` and ``metrics`` (the dict of
            :meth:`ClassificationMetrics.compute <eqlosses.metrics.ClassificationMetrics.compute>`);
            other keys are ignored. May be empty (no results yet).
        images: figures to embed, in order: :class:`ReportImage` (file, title, caption) or a
            plain image path (PNG, JPEG, GIF or SVG; captioned with its file name).
        notes: free text shown at the end, pre-formatted.
        columns: the headline columns as ``(metric key, label)``; a dotted key reads a
            nested dict (``("segm.AP", "mask AP")``); default top-1 and balanced accuracy.
            The frequency groups' columns follow.
        group_note: the sentence under the table that explains the groups (default: the
            classification groups, from the runs' ``group_bounds``).
        status: a sentence shown highlighted under the title (e.g. that the run has not
            finished).
        missing: notes on what the report could not show and why.
        results_note: a sentence under the results heading (e.g. where the numbers are from).
        settings: run name -> {setting: value}, shown as a table (one column per run).
        configs: run name -> the full configuration text (YAML), in collapsed blocks.
        explain_ratio: whether to explain the gradient ratio before the figures.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "report.html"
        >>> run = {"name": "ce", "loss": "CrossEntropyLoss",
        ...        "metrics": {"top1": 0.5, "balanced_accuracy": 0.25, "groups": {}}}
        >>> text = write_html_report(out, "Demo", [run], [],
        ...                          settings={"ce": {"optim.lr": 0.1}}).read_text()
        >>> "<td class=\\"num\\">50.00</td>" in text, "<th>optim.lr</th><td>0.1</td>" in text
        (True, True)
    """
    _check_runs(runs)
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(str(title))}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(str(title))}</h1>",
    ]
    if status:
        parts.append(f'<p class="status">{e(str(status))}</p>')
    if missing:
        parts.append('<ul class="missing">' + "".join(f"<li>{e(str(m))}</li>" for m in missing)
                     + "</ul>")
    parts.append("<h2>Results</h2>")
    if results_note:
        parts.append(f'<p class="meta">{e(str(results_note))}</p>')
    if runs:
        table, _ = _results_table(runs, columns)
        parts.append(table)
        note = (f'<p class="bounds">{e(group_note)}</p>' if group_note is not None
                else _bounds_note(runs))
        if note:
            parts.append(note)
    else:
        parts.append("<p>No results yet.</p>")
    if settings:
        parts += ["<h2>Settings</h2>", _settings_table(settings)]
    for name, text in (configs or {}).items():
        parts.append(f"<details><summary>Full configuration of {e(str(name))} "
                     f"(config.yaml)</summary><pre>{e(str(text))}</pre></details>")
    if explain_ratio:
        parts += ["<h2>The gradient ratio</h2>",
                  '<div class="explain">' + "".join(f"<p>{e(p)}</p>"
                                                    for p in GRADIENT_RATIO_EXPLANATION)
                  + "</div>"]
    if images:
        parts.append("<h2>Figures</h2>")
        parts.extend(_figure(img) for img in images)
    if notes:
        parts += ["<h2>Notes</h2>", f"<pre>{e(str(notes))}</pre>"]
    parts += ["</body>", "</html>", ""]
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
