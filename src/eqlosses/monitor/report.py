"""A self-contained HTML report of long-tailed classification runs.

One file, no JavaScript, no external resource: the CSS is inline and the figures are embedded
as base64 ``data:`` URIs, so the report opens in any browser from disk, can be mailed or
archived, and never changes. All text taken from the runs, the title and the notes is escaped.
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..data.frequency import head_to_tail

__all__ = ["write_html_report"]

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
figcaption { color: #555; font-size: .9em; }
div.notes { white-space: pre-wrap; background: #fafafa; border-left: 3px solid #ccc;
            padding: .6em 1em; }
"""


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


def _figure(image: PathLike) -> str:
    path = Path(image)
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"cannot embed {path}: expected an image file ending in "
                         f"{sorted(_MIME)}, found {path.suffix or 'no suffix'!r}")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(path.stem.replace("_", " "))
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>")


def write_html_report(out_html: PathLike, title: str, runs: Sequence[Mapping[str, Any]],
                      images: Sequence[PathLike], notes: str = "",
                      columns: Sequence[Tuple[str, str]] = CLASSIFICATION_COLUMNS,
                      group_note: Optional[str] = None) -> Path:
    """Write one self-contained HTML report and return its path.

    The report has the title, a results table (one row per run: name, loss, top-1, balanced
    accuracy and each frequency group's accuracy, in percent, the best of each column in bold;
    ``–`` where a value is missing or NaN) with the group thresholds stated under it (from the
    runs' ``group_bounds``), the figures (embedded as ``data:`` URIs, captioned with their file
    names) and the notes (pre-formatted text).

    Args:
        out_html: the file to write (parent directories are created).
        title: the report title.
        runs: dicts with at least ``name``, ``loss`` and ``metrics`` (the dict of
            :meth:`ClassificationMetrics.compute <eqlosses.metrics.ClassificationMetrics.compute>`);
            other keys are ignored.
        images: image files (PNG, JPEG, GIF or SVG) to embed, in order.
        notes: free text shown at the end.
        columns: the headline columns as ``(metric key, label)``; a dotted key reads a
            nested dict (``("segm.AP", "mask AP")``); default top-1 and balanced accuracy.
            The frequency groups' columns follow.
        group_note: the sentence under the table that explains the groups (default: the
            classification groups, from the runs' ``group_bounds``).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "report.html"
        >>> run = {"name": "ce", "loss": "CrossEntropyLoss",
        ...        "metrics": {"top1": 0.5, "balanced_accuracy": 0.25, "groups": {}}}
        >>> text = write_html_report(out, "Demo", [run], []).read_text()
        >>> "<td class=\\"num\\">50.00</td>" in text
        True
    """
    _check_runs(runs)
    e = html.escape
    table, _ = _results_table(runs, columns) if runs else ("<p>No runs.</p>", [])
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
        "<h2>Results</h2>",
        table,
    ]
    if runs:
        note = (f'<p class="bounds">{e(group_note)}</p>' if group_note is not None
                else _bounds_note(runs))
        if note:
            parts.append(note)
    if images:
        parts.append("<h2>Figures</h2>")
        parts.extend(_figure(img) for img in images)
    if notes:
        parts += ["<h2>Notes</h2>", f'<div class="notes">{e(str(notes))}</div>']
    parts += ["</body>", "</html>", ""]
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
