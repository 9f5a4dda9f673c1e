"""Shared by the task benchmark scripts: reading nested metrics and writing the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List


def get(metrics: Any, key: str) -> Any:
    """``metrics[key]``, where a dotted key reads a nested dict (``segm.APr``)."""
    value = metrics
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def cell(value: Any) -> str:
    """A fraction as a percentage with one decimal; ``-`` for a missing or NaN value."""
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def write_table(out: Path, lines: List[str]) -> str:
    """Write ``out/table.md`` and print it."""
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return table
