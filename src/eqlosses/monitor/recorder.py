"""Record a loss's per-class gradient statistics during training, one JSON line per record.

Each line is a JSON object::

    {"step": 100, "epoch": 1, "num_updates": 100,
     "pos_grad": [P_0, ...], "neg_grad": [Nn_0, ...], "ratio": [g_0, ...],
     "terms": {"indicator": [...], "margin": [...]}}

with ``g_j = P_j / (Nn_j + eps)`` (``loss.stats.ratio(init=1.0)``) and ``terms`` what
``loss.class_terms()`` returns (the weights, margins or ratios in force). For a loss without
gradient statistics (cross-entropy, balanced softmax, ...) ``num_updates``, ``pos_grad``,
``neg_grad`` and ``ratio`` are null. Non-finite numbers are written as ``NaN``/``Infinity``
(Python's ``json`` reads them back).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from .. import distributed
from ..stats import GradientStatistics

__all__ = ["StatsRecorder", "read_jsonl"]

PathLike = Union[str, "os.PathLike[str]"]


def _to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    return value


def _drop_partial_last_line(path: Path) -> bool:
    """Remove a last line that does not end with a newline (a write cut short by a killed run).

    Returns whether something was removed. Reads the file backwards in chunks, so a large file
    costs no more than its last line.
    """
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return False
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return False
        pos = end
        keep = 0
        while pos > 0:
            size = min(65536, pos)
            pos -= size
            f.seek(pos)
            chunk = f.read(size)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = pos + nl + 1
                break
        f.truncate(keep)
        return True


class StatsRecorder:
    """Append a loss's gradient statistics and class terms to a JSON-lines file.

    Only the process of rank 0 writes (the statistics are identical on every rank); the other
    ranks' :meth:`record` does nothing and communicates nothing, so it may be called on a
    subset of the ranks. The file is appended to, so that a resumed run continues it; a last
    line cut short by a killed run is removed before the first new line is written. Each line
    is flushed when written.

    Args:
        path: the ``.jsonl`` file (parent directories are created).
        loss: the loss module; a :class:`~eqlosses.GradientStatistics` is read from its
            ``stats`` attribute when it has one, and its ``class_terms()`` when it has them.
        every: record the steps that are multiples of ``every``.

    Example:
        >>> import tempfile
        >>> from eqlosses import SoftmaxEQLLoss
        >>> crit = SoftmaxEQLLoss(num_classes=2)
        >>> path = Path(tempfile.mkdtemp()) / "stats.jsonl"
        >>> rec = StatsRecorder(path, crit, every=10)
        >>> rec.record(step=3, epoch=0) is None  # not a multiple of 10
        True
        >>> rec.record(step=10, epoch=0)["ratio"]
        [1.0, 1.0]
        >>> [r["step"] for r in read_jsonl(path)]
        [10]
    """

    def __init__(self, path: PathLike, loss: nn.Module, every: int = 1) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.path = Path(path)
        self.loss = loss
        self.every = every
        self._tail_checked = False

    @property
    def stats(self) -> Optional[GradientStatistics]:
        """The loss's gradient statistics, or None for a loss that keeps none."""
        stats = getattr(self.loss, "stats", None)
        return stats if isinstance(stats, GradientStatistics) else None

    def snapshot(self, step: int, epoch: int) -> Dict[str, Any]:
        """The record for ``step`` and ``epoch`` as a dict (nothing is written)."""
        stats = self.stats
        class_terms = getattr(self.loss, "class_terms", None)
        terms = class_terms() if callable(class_terms) else {}
        return {
            "step": int(step),
            "epoch": int(epoch),
            "num_updates": None if stats is None else int(stats.num_updates),
            "pos_grad": None if stats is None else _to_json(stats.pos_grad),
            "neg_grad": None if stats is None else _to_json(stats.neg_grad),
            # the loss's own ratio where it has one (its initial value and clamping), else P/N
            "ratio": None if stats is None else _to_json(
                terms["ratio"] if "ratio" in terms else stats.ratio(init=1.0)),
            "terms": {str(name): _to_json(value) for name, value in terms.items()},
        }

    @torch.no_grad()
    def record(self, step: int, epoch: int, force: bool = False) -> Optional[Dict[str, Any]]:
        """Append one line when ``step % every == 0`` (or ``force``) on rank 0.

        Returns the record written, or None when nothing was written (another step, or a
        rank other than 0).
        """
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"step must be an int, got {step!r}")
        if not (force or step % self.every == 0) or distributed.rank() != 0:
            return None
        rec = self.snapshot(step, epoch)
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._tail_checked:
            if self.path.exists() and _drop_partial_last_line(self.path):
                warnings.warn(f"{self.path}: removed a truncated last line (an interrupted run?) "
                              f"before appending", RuntimeWarning, stacklevel=2)
            self._tail_checked = True
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
        return rec


def read_jsonl(path: PathLike) -> List[Dict[str, Any]]:
    """Read a JSON-lines file of objects, e.g. a :class:`StatsRecorder` file.

    Blank lines are skipped. A last line that does not parse and has no final newline (a run
    killed while writing it) is dropped with a warning; any other line that is not a JSON
    object is a ``ValueError`` naming the file and the line number.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "r.jsonl"
    >>> _ = p.write_text('{"step": 0}\\n{"step": 1}\\n{"st')
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     read_jsonl(p)
    [{'step': 0}, {'step': 1}]
    >>> len(caught)
    1
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    # With a final newline, split() leaves an empty last element; without one, the last
    # element is a line whose writing may have been cut short.
    unterminated = len(lines) - 1 if lines[-1] != "" else None
    out: List[Dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if i == unterminated:
                warnings.warn(f"{path}: ignored a truncated last line {i + 1} (an interrupted "
                              f"run?): {err}", RuntimeWarning, stacklevel=2)
                break
            raise ValueError(f"{path}, line {i + 1}: not valid JSON ({err}): "
                             f"{line[:80]!r}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}, line {i + 1}: expected a JSON object, found "
                             f"{type(obj).__name__}: {line[:80]!r}")
        out.append(obj)
    return out
