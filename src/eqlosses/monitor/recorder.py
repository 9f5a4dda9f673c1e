"""Record a loss's per-class gradient statistics during training in a bounded binary history.

:class:`StatsRecorder` writes ``stats.bin`` in a run directory; :func:`read_stats` reads the
history back (steps and ``[T, C]`` arrays), :func:`latest_stats` only the last snapshot, and
:func:`truncate_stats` forgets the records after a checkpoint's step (resume). The readers also
read the JSON-lines ``stats.jsonl`` of runs recorded before this format, streaming it.

What is recorded
----------------
Each record (snapshot) holds the ``step``, ``epoch`` and ``num_updates`` of the loss's
:class:`~eqlosses.GradientStatistics` and these float32 arrays:

* ``pos_grad`` and ``neg_grad``: the accumulated positive and negative gradient magnitude of
  each class, ``P_j`` and ``N_j``;
* ``ratio``: the gradient ratio ``g_j = P_j / (N_j + eps)`` (the loss's own ``ratio`` term when
  it has one, with its initial value and clamping, else ``stats.ratio(init=1.0)``);
* ``terms/<name>``: what ``loss.class_terms()`` returns (weights, margins, indicators in
  force). A ``ratio`` term is not stored twice: it is the ``ratio`` array.

A loss without gradient statistics (cross-entropy, balanced softmax, ...) records its terms
only; ``num_updates`` is then -1 in the file (None in the readers' dicts).

Which steps are kept
--------------------
Every record is written, but the history is thinned so that the file stays bounded however
long the run. The history holds the recorded steps divisible by ``stride`` (a power of two,
in the header, starting at 1); the most recent record is always there too, as the file's last
record, kept or not. When the kept records reach ``max_records`` (default 256), ``stride``
doubles (as often as needed) until at most ``max_records // 2`` remain, and the file is
rewritten (a temporary file, then an atomic rename). Early in a run every record is kept; a
long run keeps ``max_records / 2`` to ``max_records`` evenly spaced snapshots, plus the
latest. A file therefore holds at most ``max_records + 1`` records.

**Size bound**: at most ``12 + H + (max_records + 1) * R`` bytes, with ``H`` the JSON header
(< 1 KB) and ``R = 32 + 4 * (floats per record)``. For C = 1203 (LVIS) and five arrays
(Sigmoid-EQL: pos_grad, neg_grad, ratio, pos_weight, neg_weight; R = 24,092 bytes) that is
6.2 MB whatever the length of the run. A simulated LVIS schedule, 90,000 steps recorded every
10 (9,000 records), measured 3,397,348 bytes: 141 snapshots, the 140 steps divisible by 640
(stride 128) and the latest, step 90,000. The JSON-lines file of the same run is ~1.3 GB.

File format (``stats.bin``, version 1, little-endian)
-----------------------------------------------------
::

    bytes 0-7     magic  b"EQLSTAT1"
    bytes 8-11    uint32 H, the length of the JSON header
    bytes 12-     H bytes of UTF-8 JSON, padded with spaces so that records start at a
                  multiple of 8
    then N records of R bytes:
        int64   step
        int64   epoch
        int64   num_updates          (-1: the loss keeps no statistics)
        uint32  flags                (bit 0: kept in the history; 0: latest snapshot only)
        uint32  crc32                (zlib.crc32 of the record's other 28 + 4 * L bytes)
        float32 values[L]            the header's arrays, flattened, in header order

The header, e.g.::

    {"format": "eqlosses-stats", "version": 1, "num_classes": 1203, "has_stats": true,
     "arrays": [{"name": "pos_grad", "shape": [1203]}, ..., {"name": "terms/pos_weight",
     "shape": [1203]}], "aliases": {"terms/ratio": "ratio"}, "record_bytes": 24092,
     "max_records": 256, "stride": 1}

Records are in increasing step order. Only the last record is ever rewritten in place (the
latest snapshot, replaced by the next one); a record cut short or torn by a killed run is
detected by the file size or its checksum, dropped with a warning by the readers and removed
before the recorder appends. A complete file reads with numpy alone (:func:`record_dtype`
spells out the record dtype from the header)::

    raw = open("stats.bin", "rb").read()
    size = int.from_bytes(raw[8:12], "little")
    header = json.loads(raw[12:12 + size])
    records = np.frombuffer(raw, dtype=record_dtype(header), offset=12 + size)
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..stats import GradientStatistics

__all__ = ["StatsRecorder", "StatsHistory", "read_stats", "latest_stats", "truncate_stats",
           "read_jsonl", "record_dtype", "STATS_FILE", "LEGACY_STATS_FILE"]

PathLike = Union[str, "os.PathLike[str]"]

#: the statistics file of a run directory
STATS_FILE = "stats.bin"
#: the JSON-lines file of runs recorded before ``stats.bin`` (read, never written)
LEGACY_STATS_FILE = "stats.jsonl"

_MAGIC = b"EQLSTAT1"
_FORMAT = "eqlosses-stats"
_VERSION = 1
_FIXED = 32  # step, epoch, num_updates, flags, crc
_KEPT = 1


# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------

def record_dtype(header: Dict[str, Any]) -> np.dtype:
    """The numpy structured dtype of one record of a file with this ``header``.

    >>> dt = record_dtype({"arrays": [{"name": "ratio", "shape": [3]}]})
    >>> dt.itemsize, dt.names
    (44, ('step', 'epoch', 'num_updates', 'flags', 'crc', 'values'))
    """
    length = sum(int(np.prod(a["shape"], dtype=np.int64)) for a in header["arrays"])
    return np.dtype([("step", "<i8"), ("epoch", "<i8"), ("num_updates", "<i8"),
                     ("flags", "<u4"), ("crc", "<u4"), ("values", "<f4", (length,))])


def _crc(raw: bytes) -> int:
    return zlib.crc32(raw[_FIXED:], zlib.crc32(raw[:28])) & 0xFFFFFFFF


def _pack(step: int, epoch: int, num_updates: int, flags: int, values: np.ndarray) -> bytes:
    body = struct.pack("<qqqI", step, epoch, num_updates, flags)
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    crc = zlib.crc32(data, zlib.crc32(body)) & 0xFFFFFFFF
    return body + struct.pack("<I", crc) + data


def _header_bytes(header: Dict[str, Any]) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    pad = (-(12 + len(text))) % 8
    text += b" " * pad
    return _MAGIC + struct.pack("<I", len(text)) + text


def _read_header(f, path: Path) -> Tuple[Dict[str, Any], int]:
    """(header, offset of the first record) of an open ``stats.bin``."""
    start = f.read(12)
    if len(start) < 12 or start[:8] != _MAGIC:
        raise ValueError(f"{path} is not an eqlosses statistics file: expected it to start "
                         f"with {_MAGIC!r}, found {start[:8]!r}")
    (size,) = struct.unpack("<I", start[8:12])
    raw = f.read(size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the JSON header of {size} bytes does not parse ({err}); "
                         f"the file is damaged") from None
    if header.get("format") != _FORMAT or header.get("version") != _VERSION:
        raise ValueError(f"{path}: expected format {_FORMAT!r} version {_VERSION}, found "
                         f"{header.get('format')!r} version {header.get('version')!r}")
    if record_dtype(header).itemsize != header.get("record_bytes"):
        raise ValueError(f"{path}: the header's record_bytes {header.get('record_bytes')} do "
                         f"not match its arrays ({record_dtype(header).itemsize} bytes)")
    return header, 12 + size


def _valid(raw: bytes, dtype: np.dtype) -> bool:
    return len(raw) == dtype.itemsize and _crc(raw) == struct.unpack("<I", raw[28:32])[0]


def _scan(path: Path, repair: bool = False, stacklevel: int = 3
          ) -> Tuple[Dict[str, Any], int, np.ndarray]:
    """Header, data offset and all complete records of ``path`` (a structured array).

    A partial last record (the file size) or a last record whose checksum fails (a torn
    rewrite) is dropped with a warning, and removed from the file when ``repair``. A bad
    checksum elsewhere is a ValueError.
    """
    with open(path, "rb+" if repair else "rb") as f:
        header, offset = _read_header(f, path)
        dtype = record_dtype(header)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        n, extra = divmod(max(size - offset, 0), dtype.itemsize)
        f.seek(offset)
        raw = f.read(n * dtype.itemsize)
        records = np.frombuffer(raw, dtype=dtype, count=n).copy() if n else np.zeros(0, dtype)
        bad = [i for i in range(n)
               if not _valid(raw[i * dtype.itemsize:(i + 1) * dtype.itemsize], dtype)]
        problem = None
        if bad and bad != [n - 1]:
            raise ValueError(f"{path}: record {bad[0]} of {n} fails its checksum; the file is "
                             f"damaged (only the last record can be cut short by a killed "
                             f"run)")
        if bad:
            problem = (f"dropped the last record (step {int(records['step'][-1])}?) whose "
                       f"checksum fails (a write cut short by an interrupted run?)")
            records = records[:-1]
        elif extra:
            problem = (f"dropped {extra} bytes of a last record cut short (an interrupted "
                       f"run?)")
        if problem is not None:
            if repair:
                f.truncate(offset + len(records) * dtype.itemsize)
                problem = problem.replace("dropped", "removed", 1)
            warnings.warn(f"{path}: {problem}", RuntimeWarning, stacklevel=stacklevel)
    return header, offset, records


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

class StatsRecorder:
    """Record a loss's gradient statistics and class terms in a bounded ``stats.bin`` file.

    Each :meth:`record` writes one snapshot (see the module documentation for the file
    format and which steps the history keeps: all of them early, at most ``max_records``
    evenly spaced ones later, plus always the latest). Only the process of rank 0 writes (the
    statistics are identical on every rank); the other ranks' :meth:`record` does nothing and
    communicates nothing, so it may be called on a subset of the ranks. An existing file is
    continued (a resumed run; call :func:`truncate_stats` first to forget the steps after the
    checkpoint), after a last record cut short by a killed run is removed with a warning. A
    record of a step not after the file's last one replaces the records from that step on,
    with a warning. Each record is flushed when written.

    Args:
        path: the file, conventionally ``run_dir / "stats.bin"`` (parent directories are
            created).
        loss: the loss module; a :class:`~eqlosses.GradientStatistics` is read from its
            ``stats`` attribute when it has one, and its ``class_terms()`` when it has them.
        every: record the steps that are multiples of ``every``.
        max_records: the most snapshots the history keeps (even, >= 4). An existing file
            keeps the value it was created with.

    Example:
        >>> import tempfile
        >>> from eqlosses import SoftmaxEQLLoss
        >>> crit = SoftmaxEQLLoss(num_classes=2)
        >>> path = Path(tempfile.mkdtemp()) / "stats.bin"
        >>> rec = StatsRecorder(path, crit, every=10)
        >>> rec.record(step=3, epoch=0) is None  # not a multiple of 10
        True
        >>> rec.record(step=10, epoch=0)["ratio"]
        [1.0, 1.0]
        >>> history = read_stats(path)
        >>> history.steps.tolist(), history.ratio.tolist()
        ([10], [[1.0, 1.0]])
    """

    def __init__(self, path: PathLike, loss: nn.Module, every: int = 1,
                 max_records: int = 256) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if (not isinstance(max_records, int) or isinstance(max_records, bool)
                or max_records < 4 or max_records % 2):
            raise ValueError(f"max_records must be an even int >= 4, got {max_records!r}")
        self.path = Path(path)
        if self.path.suffix == ".jsonl":
            raise ValueError(f"{self.path}: StatsRecorder writes the binary {STATS_FILE} "
                             f"format, not JSON lines; name the file {STATS_FILE} (read old "
                             f".jsonl files with read_stats)")
        self.loss = loss
        self.every = every
        self.max_records = max_records
        # what the file holds, loaded on the first record: the header, every record's step
        # and flags (the data stay on disk)
        self._header: Optional[Dict[str, Any]] = None
        self._offset = 0
        self._steps: List[int] = []
        self._flags: List[int] = []

    @property
    def stats(self) -> Optional[GradientStatistics]:
        """The loss's gradient statistics, or None for a loss that keeps none."""
        stats = getattr(self.loss, "stats", None)
        return stats if isinstance(stats, GradientStatistics) else None

    def _arrays(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """(statistics arrays, class terms) as float64 CPU tensors."""
        stats = self.stats
        class_terms = getattr(self.loss, "class_terms", None)
        raw = class_terms() if callable(class_terms) else {}
        terms = {str(k): torch.as_tensor(v).detach().to("cpu", torch.float64)
                 for k, v in raw.items()}
        arrays: Dict[str, torch.Tensor] = {}
        if stats is not None:
            arrays["pos_grad"] = stats.pos_grad.detach().to("cpu", torch.float64)
            arrays["neg_grad"] = stats.neg_grad.detach().to("cpu", torch.float64)
            # the loss's own ratio where it has one (its initial value and clamping), else P/N
            arrays["ratio"] = (terms["ratio"] if "ratio" in terms
                               else stats.ratio(init=1.0).detach().to("cpu", torch.float64))
        return arrays, terms

    def snapshot(self, step: int, epoch: int) -> Dict[str, Any]:
        """The record for ``step`` and ``epoch`` as a dict of lists (nothing is written).

        Keys: ``step``, ``epoch``, ``num_updates``, ``pos_grad``, ``neg_grad``, ``ratio``
        (None for a loss without statistics) and ``terms`` (name -> list).
        """
        return self._as_dict(step, epoch, *self._arrays())

    def _as_dict(self, step: int, epoch: int, arrays: Dict[str, torch.Tensor],
                 terms: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        stats = self.stats
        return {
            "step": int(step),
            "epoch": int(epoch),
            "num_updates": None if stats is None else int(stats.num_updates),
            "pos_grad": arrays["pos_grad"].tolist() if "pos_grad" in arrays else None,
            "neg_grad": arrays["neg_grad"].tolist() if "neg_grad" in arrays else None,
            "ratio": arrays["ratio"].tolist() if "ratio" in arrays else None,
            "terms": {name: value.tolist() for name, value in terms.items()},
        }

    def _layout(self, arrays: Dict[str, torch.Tensor], terms: Dict[str, torch.Tensor]
                ) -> Tuple[Dict[str, Any], List[torch.Tensor]]:
        """The header for these arrays, and the tensors in header order."""
        specs, tensors = [], []
        for name, value in arrays.items():
            specs.append({"name": name, "shape": list(value.shape)})
            tensors.append(value)
        aliases = {}
        for name, value in terms.items():
            if name == "ratio" and "ratio" in arrays:
                aliases["terms/ratio"] = "ratio"
                continue
            specs.append({"name": f"terms/{name}", "shape": list(value.shape)})
            tensors.append(value)
        stats = self.stats
        header = {"format": _FORMAT, "version": _VERSION,
                  "num_classes": None if stats is None else int(stats.num_classes),
                  "has_stats": stats is not None, "arrays": specs, "aliases": aliases,
                  "record_bytes": 0, "max_records": self.max_records, "stride": 1}
        header["record_bytes"] = record_dtype(header).itemsize
        return header, tensors

    def _open(self, header: Dict[str, Any]) -> None:
        """Load (or create) the file's header and the steps and flags of its records."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            old, offset, records = _scan(self.path, repair=True, stacklevel=4)
            mine = {k: header[k] for k in ("arrays", "aliases", "has_stats", "num_classes")}
            theirs = {k: old.get(k) for k in mine}
            if mine != theirs:
                raise ValueError(f"{self.path} holds statistics of another layout "
                                 f"({json.dumps(theirs)}) than this loss records "
                                 f"({json.dumps(mine)}); remove it or record to another file")
            self._header, self._offset = old, offset
            self._steps = records["step"].tolist()
            self._flags = records["flags"].tolist()
        else:  # a new file: the header appears whole or not at all
            raw = _header_bytes(header)
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(raw)
            os.replace(tmp, self.path)
            self._header, self._offset = header, len(raw)
            self._steps, self._flags = [], []

    @torch.no_grad()
    def record(self, step: int, epoch: int, force: bool = False) -> Optional[Dict[str, Any]]:
        """Write one snapshot when ``step % every == 0`` (or ``force``) on rank 0.

        Returns the record written (as :meth:`snapshot`: float64 values as lists; the file
        keeps them as float32), or None when nothing was written (another step, or a rank
        other than 0).
        """
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"step must be an int, got {step!r}")
        if not (force or step % self.every == 0) or distributed.rank() != 0:
            return None
        arrays, terms = self._arrays()
        header, tensors = self._layout(arrays, terms)
        if self._header is None:
            self._open(header)
        elif header["arrays"] != self._header["arrays"]:
            raise ValueError(f"{self.path}: the loss's arrays changed during the run "
                             f"(expected {self._header['arrays']}, got {header['arrays']})")
        if self._steps and step <= self._steps[-1]:
            n = sum(s < step for s in self._steps)
            warnings.warn(f"{self.path}: step {step} is not after the last recorded step "
                          f"{self._steps[-1]}; replacing the records of steps >= {step}",
                          RuntimeWarning, stacklevel=2)
            self._truncate_to(n)
        stride = int(self._header["stride"])
        flags = _KEPT if step % stride == 0 else 0
        stats = self.stats
        values = (torch.cat([t.reshape(-1) for t in tensors]).numpy() if tensors
                  else np.zeros(0))
        raw = _pack(int(step), int(epoch), -1 if stats is None else int(stats.num_updates),
                    flags, values)
        # the latest-only snapshot at the end (if any) is replaced, a kept one is appended to
        pos = len(self._steps) - 1 if self._flags and not self._flags[-1] & _KEPT \
            else len(self._steps)
        with open(self.path, "rb+") as f:
            f.seek(self._offset + pos * len(raw))
            f.write(raw)
            f.truncate()
            f.flush()
        del self._steps[pos:], self._flags[pos:]
        self._steps.append(int(step))
        self._flags.append(flags)
        if sum(fl & _KEPT for fl in self._flags) >= int(self._header["max_records"]):
            self._thin()
        return self._as_dict(step, epoch, arrays, terms)

    def _truncate_to(self, n: int) -> None:
        with open(self.path, "rb+") as f:
            f.truncate(self._offset + n * int(self._header["record_bytes"]))
        del self._steps[n:], self._flags[n:]

    def _thin(self) -> None:
        """Double the stride until at most max_records // 2 kept records remain; rewrite."""
        header = dict(self._header)
        stride = int(header["stride"])
        limit = int(header["max_records"]) // 2
        kept = [s for s, fl in zip(self._steps, self._flags) if fl & _KEPT]
        while len(kept) > limit:
            stride *= 2
            kept = [s for s in kept if s % stride == 0]
        keep = set(kept)
        header["stride"] = stride
        _, _, records = _scan(self.path)
        steps = records["step"].tolist()
        rows = [i for i, s in enumerate(steps) if s in keep or i == len(steps) - 1]
        out = records[rows].copy()
        out["flags"] = [(_KEPT if s in keep else 0) for s in out["step"].tolist()]
        raw = bytearray(out.tobytes())
        size = out.dtype.itemsize
        for i in range(len(out)):  # the flags changed: new checksums
            rec = bytes(raw[i * size:(i + 1) * size])
            raw[i * size + 28:i * size + 32] = struct.pack("<I", _crc(rec))
        head = _header_bytes(header)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(bytes(raw))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._header, self._offset = header, len(head)
        self._steps = out["step"].tolist()
        self._flags = out["flags"].tolist()


def truncate_stats(path: PathLike, max_step: int) -> int:
    """Forget the records of steps after ``max_step`` (a resumed run's checkpoint step).

    A last record cut short by the killed run is removed too (with a warning). A missing
    file is left alone. Returns the number of complete records removed. The stride of the
    history is kept, so that a resumed run keeps the same steps as an uninterrupted one.

    >>> import tempfile
    >>> from eqlosses import SoftmaxEQLLoss
    >>> path = Path(tempfile.mkdtemp()) / "stats.bin"
    >>> rec = StatsRecorder(path, SoftmaxEQLLoss(num_classes=2))
    >>> for step in (10, 20, 30):
    ...     _ = rec.record(step, epoch=0)
    >>> truncate_stats(path, 20)
    1
    >>> read_stats(path).steps.tolist()
    [10, 20]
    """
    path = Path(path)
    if not path.is_file():
        return 0
    if path.suffix == ".jsonl":
        raise ValueError(f"{path}: truncate_stats reads the binary {STATS_FILE} format; a "
                         f"JSON-lines file is truncated by eqlosses.tasks.common.truncate_jsonl")
    header, offset, records = _scan(path, repair=True)
    # records are in step order: keep the prefix
    n = next((i for i, s in enumerate(records["step"].tolist()) if s > max_step), len(records))
    if n < len(records):
        with open(path, "rb+") as f:
            f.truncate(offset + n * int(header["record_bytes"]))
    return len(records) - n


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

@dataclass
class StatsHistory:
    """The recorded snapshots of a run: steps and per-class arrays, oldest first.

    The last row is the latest snapshot. ``arrays`` maps ``pos_grad``, ``neg_grad``,
    ``ratio`` and ``terms/<name>`` to ``[T, *shape]`` float32 arrays (only those asked for,
    and the statistics only for a loss that keeps them).
    """

    path: Path
    steps: np.ndarray  # [T] int64
    epochs: np.ndarray  # [T] int64
    num_updates: np.ndarray  # [T] int64, -1 where the loss keeps no statistics
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)
    num_classes: Optional[int] = None
    has_stats: bool = True
    stride: int = 1
    legacy: bool = False  # read from a stats.jsonl

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    @property
    def ratio(self) -> Optional[np.ndarray]:
        """``[T, C]`` gradient ratios, or None (not read, or a loss without statistics)."""
        return self.arrays.get("ratio")

    @property
    def pos_grad(self) -> Optional[np.ndarray]:
        """``[T, C]`` accumulated positive gradient magnitudes, or None."""
        return self.arrays.get("pos_grad")

    @property
    def neg_grad(self) -> Optional[np.ndarray]:
        """``[T, C]`` accumulated negative gradient magnitudes, or None."""
        return self.arrays.get("neg_grad")

    @property
    def terms(self) -> Dict[str, np.ndarray]:
        """The class terms read, name -> ``[T, ...]``."""
        return {k[len("terms/"):]: v for k, v in self.arrays.items() if k.startswith("terms/")}

    def record(self, index: int = -1) -> Dict[str, Any]:
        """Snapshot ``index`` (default: the latest) as a dict like :meth:`StatsRecorder.snapshot`
        (numpy arrays instead of lists; None for what was not recorded or not read)."""
        if not len(self):
            raise ValueError(f"{self.path} holds no record yet")
        nu = int(self.num_updates[index])
        return {"step": int(self.steps[index]), "epoch": int(self.epochs[index]),
                "num_updates": None if nu < 0 else nu,
                "pos_grad": None if self.pos_grad is None else self.pos_grad[index],
                "neg_grad": None if self.neg_grad is None else self.neg_grad[index],
                "ratio": None if self.ratio is None else self.ratio[index],
                "terms": {k: v[index] for k, v in self.terms.items()}}


def _stats_path(source: PathLike) -> Path:
    """The statistics file of a run directory or file path (FileNotFoundError if none)."""
    path = Path(source)
    if path.is_dir():
        for name in (STATS_FILE, LEGACY_STATS_FILE):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} has no {STATS_FILE} (nor a {LEGACY_STATS_FILE} of an "
                                f"older run): was a loss statistics recorder running?")
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {path} does not exist")
    return path


def _wanted(names: Iterable[str], aliases: Dict[str, str],
            fields: Optional[Sequence[str]]) -> List[str]:
    names = list(names) + [a for a in aliases]
    if fields is None:
        return names
    return [n for n in names if n in fields or (n.startswith("terms/") and "terms" in fields)]


def read_stats(source: PathLike, fields: Optional[Sequence[str]] = None,
               max_records: int = 256) -> StatsHistory:
    """Read the statistics history of a run directory or a statistics file.

    ``source`` is a run directory (its ``stats.bin``; else the ``stats.jsonl`` of a run
    recorded before that format; a run resumed across the change has both, and its history
    is their concatenation), a ``stats.bin`` file or an old ``stats.jsonl``. ``fields``
    restricts the arrays read (``"pos_grad"``, ``"neg_grad"``, ``"ratio"``, ``"terms"`` for
    all class terms or ``"terms/<name>"``); None reads all. A last record cut short by a
    killed run is dropped with a warning.

    A ``stats.jsonl`` (about 144 KB a line at C = 1203) is streamed: only its step numbers
    are parsed for most lines, and it is thinned as the recorder does, keeping at most
    ``max_records`` evenly spaced snapshots plus the last one in memory.

    Raises FileNotFoundError naming the path when there is no statistics file, ValueError
    when the file is damaged elsewhere than at its end.

    >>> import tempfile
    >>> from eqlosses import SigmoidEQLLoss
    >>> path = Path(tempfile.mkdtemp()) / "stats.bin"
    >>> rec = StatsRecorder(path, SigmoidEQLLoss(num_classes=3))
    >>> _ = rec.record(5, epoch=0)
    >>> h = read_stats(path, fields=["ratio"])
    >>> h.steps.tolist(), h.ratio.shape, h.pos_grad is None
    ([5], (1, 3), True)
    """
    path = _stats_path(source)
    if path.suffix == ".jsonl":
        return _read_legacy(path, fields, max_records)
    header, _, records = _scan(path)
    history = _history(path, header, records, fields)
    legacy = path.with_name(LEGACY_STATS_FILE)
    if Path(source).is_dir() and legacy.is_file():
        old = _read_legacy(legacy, fields, max_records)
        first = int(history.steps[0]) if len(history) else None
        history = _concat(old, history, first)
    return history


def _history(path: Path, header: Dict[str, Any], records: np.ndarray,
             fields: Optional[Sequence[str]]) -> StatsHistory:
    offsets, start = {}, 0
    for spec in header["arrays"]:
        size = int(np.prod(spec["shape"], dtype=np.int64))
        offsets[spec["name"]] = (start, size, tuple(spec["shape"]))
        start += size
    aliases = header.get("aliases") or {}
    arrays = {}
    for name in _wanted(offsets, aliases, fields):
        lo, size, shape = offsets[aliases.get(name, name)]
        arrays[name] = records["values"][:, lo:lo + size].reshape((len(records),) + shape).copy()
    return StatsHistory(path=path, steps=records["step"].astype(np.int64),
                        epochs=records["epoch"].astype(np.int64),
                        num_updates=records["num_updates"].astype(np.int64), arrays=arrays,
                        num_classes=header.get("num_classes"),
                        has_stats=bool(header.get("has_stats")),
                        stride=int(header.get("stride", 1)))


def _concat(old: StatsHistory, new: StatsHistory, first: Optional[int]) -> StatsHistory:
    """``old``'s records before step ``first``, then ``new``'s."""
    keep = old.steps < first if first is not None else np.ones(len(old), bool)
    names = [n for n in new.arrays if n in old.arrays] if len(new) else list(old.arrays)
    arrays = {n: np.concatenate([old.arrays[n][keep], new.arrays[n]]) if len(new)
              else old.arrays[n][keep] for n in names}
    return StatsHistory(path=new.path, steps=np.concatenate([old.steps[keep], new.steps]),
                        epochs=np.concatenate([old.epochs[keep], new.epochs]),
                        num_updates=np.concatenate([old.num_updates[keep], new.num_updates]),
                        arrays=arrays, num_classes=new.num_classes or old.num_classes,
                        has_stats=new.has_stats, stride=new.stride)


def latest_stats(source: PathLike) -> Optional[Dict[str, Any]]:
    """The last snapshot of a run directory or statistics file, or None when it has none.

    Reads only the header and the last record (or, for an old ``stats.jsonl``, the last
    line). The dict has the keys of :meth:`StatsRecorder.snapshot`, with numpy arrays.

    >>> import tempfile
    >>> from eqlosses import SoftmaxEQLLoss
    >>> path = Path(tempfile.mkdtemp()) / "stats.bin"
    >>> rec = StatsRecorder(path, SoftmaxEQLLoss(num_classes=2))
    >>> _ = rec.record(7, epoch=1)
    >>> latest = latest_stats(path)
    >>> latest["step"], latest["ratio"].tolist(), sorted(latest["terms"])
    (7, [1.0, 1.0], ['indicator', 'margin'])
    """
    path = _stats_path(source)
    if path.suffix == ".jsonl":
        return _latest_legacy(path)
    with open(path, "rb") as f:
        header, offset = _read_header(f, path)
        dtype = record_dtype(header)
        size = f.seek(0, os.SEEK_END)
        n, extra = divmod(max(size - offset, 0), dtype.itemsize)
        for i in range(n - 1, max(n - 3, -1), -1):
            f.seek(offset + i * dtype.itemsize)
            raw = f.read(dtype.itemsize)
            if _valid(raw, dtype):
                if extra or i < n - 1:
                    warnings.warn(f"{path}: ignored a last record cut short (an interrupted "
                                  f"run?)", RuntimeWarning, stacklevel=2)
                records = np.frombuffer(raw, dtype=dtype, count=1).copy()
                return _history(path, header, records, None).record(-1)
        if n:
            raise ValueError(f"{path}: the last records fail their checksums; the file is "
                             f"damaged")
    return None


# --------------------------------------------------------------------------------------------
# The JSON-lines format of older runs
# --------------------------------------------------------------------------------------------

_STEP = re.compile(rb'^\s*\{\s*"step"\s*:\s*(-?\d+)')


def _legacy_arrays(rec: Dict[str, Any], fields: Optional[Sequence[str]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in ("pos_grad", "neg_grad", "ratio"):
        if rec.get(name) is not None:
            out[name] = rec[name]
    for name, value in (rec.get("terms") or {}).items():
        out[f"terms/{name}"] = value
    keep = _wanted(out, {}, fields)
    return {k: np.asarray(out[k], dtype=np.float32) for k in keep}


def _read_legacy(path: Path, fields: Optional[Sequence[str]], max_records: int
                 ) -> StatsHistory:
    """Stream a stats.jsonl, thinning as the recorder does (at most max_records + 1 kept)."""
    kept: List[Dict[str, Any]] = []  # the history, thinned to the stride
    stride = 1
    pending: Optional[Tuple[int, bytes]] = None  # the line read last, handled at the end
    before: Optional[Tuple[int, bytes]] = None  # the line before it
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if pending is not None:
                _legacy_keep(path, *pending, kept, stride, fields)
                if len(kept) >= max_records:
                    while len(kept) > max_records // 2:
                        stride *= 2
                        kept = [r for r in kept if r["step"] % stride == 0]
                before = pending
            pending = (number, line)
    latest = None if pending is None else _legacy_parse(path, *pending, last=True)
    if latest is None and before is not None:  # a truncated last line: the one before it
        latest = _legacy_parse(path, *before, last=False)
    if latest is not None:
        if kept and kept[-1]["step"] == latest["step"]:
            kept.pop()
        kept.append(_legacy_record(latest, fields))
    names = [k for k in (kept[-1] if kept else {}) if k not in ("step", "epoch", "num_updates")]
    arrays = {}
    for name in names:
        rows = [r[name] for r in kept if name in r]
        if len(rows) != len(kept):
            continue  # not in every record
        if any(r.shape != rows[-1].shape for r in rows):
            raise ValueError(f"{path}: the records' {name!r} arrays differ in shape "
                             f"({sorted({r.shape for r in rows})})")
        arrays[name] = np.stack(rows)
    num_classes = None
    for key in ("pos_grad", "ratio"):
        if key in arrays:
            num_classes = int(arrays[key].shape[1])
    return StatsHistory(
        path=path, steps=np.asarray([r["step"] for r in kept], dtype=np.int64),
        epochs=np.asarray([int(r["epoch"] or 0) for r in kept], dtype=np.int64),
        num_updates=np.asarray([-1 if r["num_updates"] is None else int(r["num_updates"])
                                for r in kept], dtype=np.int64),
        arrays=arrays, num_classes=num_classes,
        has_stats=bool(kept) and kept[-1]["num_updates"] is not None, stride=stride,
        legacy=True)


def _legacy_record(obj: Dict[str, Any], fields: Optional[Sequence[str]]) -> Dict[str, Any]:
    return {"step": int(obj["step"]), "epoch": obj.get("epoch", 0),
            "num_updates": obj.get("num_updates"), **_legacy_arrays(obj, fields)}


def _legacy_parse(path: Path, number: int, line: bytes, last: bool
                  ) -> Optional[Dict[str, Any]]:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        if last and not line.endswith(b"\n"):
            warnings.warn(f"{path}: ignored a truncated last line {number} (an interrupted "
                          f"run?): {err}", RuntimeWarning, stacklevel=4)
            return None
        raise ValueError(f"{path}, line {number}: not valid JSON ({err})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("step"), int):
        raise ValueError(f"{path}, line {number}: expected a JSON object with an int 'step', "
                         f"found {line[:80]!r}")
    return obj


def _legacy_keep(path: Path, number: int, line: bytes, kept: list, stride: int,
                 fields: Optional[Sequence[str]]) -> None:
    """Parse and keep a line that is not the last when its step is on the stride."""
    match = _STEP.match(line)
    if match is not None and int(match.group(1)) % stride:
        return  # off the stride: not even parsed
    obj = _legacy_parse(path, number, line, last=False)
    if obj["step"] % stride == 0:
        kept.append(_legacy_record(obj, fields))


def _latest_legacy(path: Path) -> Optional[Dict[str, Any]]:
    """The last complete line of a stats.jsonl, read backwards from the end."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        buf = b""
        pos = end
        lines: List[bytes] = []
        while pos > 0 and len(lines) < 3:
            size = min(1 << 20, pos)
            pos -= size
            f.seek(pos)
            buf = f.read(size) + buf
            lines = [ln for ln in buf.split(b"\n") if ln.strip()]
            if pos > 0:
                lines = lines[1:]  # the first may be incomplete
        cut = not buf.endswith(b"\n")
        for i in range(len(lines) - 1, -1, -1):
            obj = None
            try:
                obj = json.loads(lines[i])
            except (json.JSONDecodeError, UnicodeDecodeError):
                if not (cut and i == len(lines) - 1):
                    raise ValueError(f"{path}: a line near the end is not valid JSON") from None
                warnings.warn(f"{path}: ignored a truncated last line (an interrupted run?)",
                              RuntimeWarning, stacklevel=3)
                continue
            arrays = _legacy_arrays(obj, None)
            return {"step": int(obj["step"]), "epoch": int(obj.get("epoch") or 0),
                    "num_updates": obj.get("num_updates"),
                    "pos_grad": arrays.get("pos_grad"), "neg_grad": arrays.get("neg_grad"),
                    "ratio": arrays.get("ratio"),
                    "terms": {k[6:]: v for k, v in arrays.items() if k.startswith("terms/")}}
    return None


def read_jsonl(path: PathLike) -> List[Dict[str, Any]]:
    """Read a JSON-lines file of objects, e.g. a run's ``log.jsonl``.

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
