"""Machinery shared by the training tasks: devices, processes, seeding, checkpoints, logs."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shlex
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import distributed

__all__ = ["resolve_device", "init_distributed", "collective_errors", "CollectiveError",
           "seed_everything", "rng_state", "set_rng_state", "save_checkpoint",
           "load_checkpoint", "CheckpointWriteError", "JsonlLog", "Progress",
           "maybe_tensorboard", "truncate_jsonl", "ensure_canvas", "load_weights_file"]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous
    checkpoint is intact. ``errno`` is the underlying error's."""


class CollectiveError(RuntimeError):
    """A collective operation of a multi-process run failed or timed out: another process
    stopped or is stuck."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; under torchrun each process takes
    the GPU of its ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device, timeout_s: Optional[float] = None) -> None:
    """Start the default process group when launched by torchrun (WORLD_SIZE > 1): NCCL on
    GPUs, gloo on the CPU. A single process needs nothing.

    ``timeout_s`` (the configuration's ``dist_timeout``; None: torch's default, 30 min) bounds
    how long the rendezvous and every collective wait for the other processes. When one
    process dies or hangs, the others do not wait forever: with gloo the blocked collective
    raises after at most ``timeout_s`` (at once when the peer's connection closes), and
    :func:`collective_errors` turns that into a :class:`CollectiveError` saying so; with NCCL
    torch's watchdog aborts the process after ``timeout_s``. The timeout must exceed the
    longest time one process works alone while the others wait (rank 0 generating data or
    writing a checkpoint, an uneven evaluation).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed.is_initialized():
        kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)


#: what a failed or timed-out collective looks like (gloo and NCCL raise RuntimeError)
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|timed out|timeout|connection (reset|closed|refused)"
                                 r"|broken pipe|socket|peer", re.IGNORECASE)


def _multi_process() -> bool:
    return distributed.world_size() > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def collective_errors(timeout_s: Optional[float] = None):
    """Re-raise a failed or timed-out collective of a multi-process run as a
    :class:`CollectiveError` that names the likely cause (another process stopped or is
    stuck) and how to proceed; the backend's error is chained as ``__cause__``. Other errors,
    and every error of a single process, pass unchanged."""
    try:
        yield
    except RuntimeError as err:
        dist_error = getattr(dist, "DistError", ())
        if (isinstance(err, CollectiveError) or not _multi_process()
                or not (isinstance(err, dist_error) or _COLLECTIVE_FAILURE.search(str(err)))):
            raise
        rank = distributed.rank() if distributed.is_initialized() else \
            int(os.environ.get("RANK", "0"))
        waited = (f"{timeout_s:g} s" if timeout_s is not None else "torch's default timeout "
                  "(30 min)")
        said = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CollectiveError(
            f"rank {rank}: a collective operation failed: another process stopped or is stuck; "
            f"no collective completed within {waited} (dist_timeout), or a peer closed its "
            f"connection. Look for the first error in the other processes' output, then "
            f"resume the run from its last checkpoint (--resume); if one process "
            f"legitimately works alone for longer, raise dist_timeout. The backend said: "
            f"{said}") from err


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> Dict[str, Any]:
    """This process's random states (Python, numpy, torch, CUDA) in a checkpoint-friendly
    form: lists, numbers, strings and tensors only, so that :func:`load_checkpoint` reads them
    with ``weights_only=True`` and nothing allow-listed."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"bit_generator": str(name), "keys": [int(k) for k in keys],
                       "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states; also reads the form that earlier versions wrote
    (``random.getstate()`` and ``np.random.get_state()`` tuples as they are)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["bit_generator"],
                       np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: Dict[str, Any]) -> Optional[Path]:
    """Write ``state`` atomically on rank 0 only (other ranks return None at once).

    The state goes to ``<path>.tmp``, which is flushed and fsynced; only a complete file
    replaces ``path`` (``os.replace``, then the folder is fsynced). So a run killed while
    saving (even SIGKILL or a power cut) leaves the previous checkpoint in place: resuming
    continues from it, and the stale ``.tmp`` is simply overwritten by the next save. When
    the write fails (disk full, quota, I/O error) the partial temporary file is removed and a
    :class:`CheckpointWriteError` (an ``OSError`` with the cause's ``errno``) says which
    file, why, and that the previous checkpoint is intact and the run can be resumed once the
    problem is fixed. Returns ``path`` on rank 0.
    """
    if distributed.rank() != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not isinstance(err, OSError) or isinstance(err, CheckpointWriteError):
            raise
        full = err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        why = "the disk is full" if full else "the write failed"
        previous = (f"the previous checkpoint {path} is intact" if path.is_file() else
                    "no checkpoint of this run was saved before")
        fix = "free some space" if full else "fix the cause"
        task = re.fullmatch(r"eqlosses-(\w+)-\d+", str(state.get("format", "")))
        resume = (f"eqlosses train {task.group(1) if task else 'TASK'} --resume --run "
                  f"{shlex.quote(str(path.parent))}")
        failure = CheckpointWriteError(
            f"cannot write the checkpoint {path}: {why} ({err.strerror or err} while writing "
            f"{tmp}; the partial file was removed). {previous[0].upper()}{previous[1:]}: "
            f"{fix}, then resume the run ({resume}), which continues from it.")
        failure.errno = err.errno
        raise failure from err
    _fsync_dir(path.parent)
    return path


def _legacy_numpy_globals() -> List[Any]:
    """What the numpy RNG state of checkpoints written before :func:`rng_state` stored plain
    lists needs: an ``np.random.get_state()`` tuple holds a uint32 array (numpy 1 and 2 name
    the array constructor differently)."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct")]


def _legacy_numpy_names() -> set:
    names = set()
    for item in _legacy_numpy_globals():
        if isinstance(item, tuple):
            names.add(item[1])
        else:
            names.add(f"{item.__module__}.{item.__qualname__}")
    return names


def _allowing(extra: List[Any]):
    """torch's ``safe_globals`` context (torch >= 2.5); nothing extra on older versions."""
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow(extra) if allow is not None else contextlib.nullcontext()


def _unsupported_globals(path: Path, err: BaseException) -> List[str]:
    """The names of the objects outside the allow-list that ``path`` holds (read from the
    pickle's opcodes, never executed) or, failing that, from torch's error message."""
    names: List[str] = []
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is not None:
        with contextlib.suppress(Exception):  # a legacy (non-zip) file cannot be scanned
            legacy = _legacy_numpy_names()
            names = [n for n in scan(str(path)) if n not in legacy]
    text = str(err)
    names += re.findall(r"GLOBAL (\S+) was not an allowed global", text)
    names += re.findall(r"but got (<class '[^']+'>)", text)
    return list(dict.fromkeys(names))


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (onto the CPU) without running
    any code from the file.

    The file is unpickled with ``weights_only=True``: only tensors, numbers, strings, lists,
    tuples and dicts are built, which is all that an eqlosses checkpoint holds (state dicts,
    the configuration, counters, RNG states as :func:`rng_state` stores them). The numpy
    RNG-state arrays of checkpoints of earlier versions are allow-listed as well
    (``numpy.ndarray``, ``numpy.dtype``, the uint32 dtype class, numpy's ``_reconstruct``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds other objects (a pickle that would import or call
            something: loading it could run arbitrary code, so it was not loaded; the message
            names what was found), is not a dict, or cannot be read (truncated, not a torch
            file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with _allowing(_legacy_numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _unsupported_globals(path, err)
        if not found:
            text = str(err)
            reason = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
            reason = " ".join(reason.split()) or type(err).__name__
            raise ValueError(f"checkpoint {path} cannot be read ({reason}); it may be truncated "
                             f"or not an eqlosses checkpoint") from None
        raise ValueError(
            f"{path} was not loaded: it holds objects outside what eqlosses checkpoints "
            f"contain (tensors, numbers, strings, lists, dicts), and loading it could run "
            f"arbitrary code. Found: {', '.join(found)}. Use a checkpoint written by eqlosses "
            f"(RUN_DIR/checkpoint.pt); if you trust this file, load it yourself with "
            f"torch.load(..., weights_only=False) and save only its state dicts.") from None
    except Exception as err:  # noqa: BLE001 - any other failure means the same thing
        # torch's own messages can be bare (a KeyError of a byte value for a text file)
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise ValueError(f"checkpoint {path} cannot be read as a torch file ({detail}); it "
                         f"may be truncated or not an eqlosses checkpoint") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not an eqlosses checkpoint: it holds a "
                         f"{type(ckpt).__name__}, not the dict that eqlosses writes")
    return ckpt


class JsonlLog:
    """Appends one JSON object per line (rank 0 only), flushed at once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.active = distributed.rank() == 0
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if self.active:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop the records of steps after ``max_step`` (written after the checkpoint a run
    resumes from), so that a resumed run's logs have each step once. A line that is not a
    complete JSON object (the last line, cut short when the run was killed mid-write) is
    dropped too. The file is rewritten atomically, so a kill during the repair loses
    nothing."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if not isinstance(record, dict):
            continue
        step = record.get("step")
        if step is None or step <= max_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


class Progress:
    """A one-line progress bar on a terminal (loss, throughput, ETA); plain lines otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool = True, every: int = 20):
        self.total, self.desc, self.every = total, desc, max(every, 1)
        self.enabled = enabled and distributed.rank() == 0
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, done: int, samples: int, **values: float) -> None:
        if not self.enabled or (not self.tty and done % self.every and done != self.total):
            return
        elapsed = time.perf_counter() - self.start
        rate = samples / elapsed if elapsed > 0 else 0.0
        eta = elapsed / max(done, 1) * (self.total - done)
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        line = (f"{self.desc} {done}/{self.total} {shown} {rate:.0f} img/s "
                f"eta {int(eta // 60)}:{int(eta % 60):02d}")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100))
            if done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def maybe_tensorboard(enabled: bool, log_dir: Path):
    """A TensorBoard SummaryWriter on rank 0 when asked for and installed, else ``None``."""
    if not enabled or distributed.rank() != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


def ensure_canvas(root: Path, kind: str) -> None:
    """Generate the canvas benchmark at ``root`` with the default specification when the
    folder does not exist yet (rank 0 writes, the other ranks wait)."""
    from ..data import canvas

    if not root.exists() and distributed.rank() == 0:
        print(f"generating the canvas {kind} benchmark in {root} (default specification)",
              flush=True)
        (canvas.make_segmentation if kind == "segmentation" else canvas.make_detection)(root)
    if distributed.world_size() > 1:
        torch.distributed.barrier()


def _strip_prefixes(state: Dict[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                    prefixes: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Remove a key prefix (``module.``, ``backbone.body.``, ...) while that makes more keys
    match ``own``."""
    while True:
        hits = sum(k in own for k in state)
        best = None
        for p in prefixes:
            cand = {(k[len(p):] if k.startswith(p) else k): v for k, v in state.items()}
            n = sum(k in own for k in cand)
            if n > hits and (best is None or n > best[0]):
                best = (n, cand)
        if best is None:
            return state
        state = best[1]


def load_weights_file(module: nn.Module, path: str, prefixes: Sequence[str] = ("module.",),
                      atomic: Sequence[str] = ()) -> Dict[str, List[str]]:
    """Load a local state-dict file into ``module`` (never downloads).

    The file holds a state dict or ``{"model": state_dict}``. Key prefixes in ``prefixes``
    are removed when that makes more keys match. Entries whose shape differs from the
    module's (the class-specific layers of a checkpoint with another class count) are skipped
    with a warning listing every one of them with both shapes; the module's entries that the
    file lacks, and file entries the module lacks, are reported in the same warning. For each
    key prefix in ``atomic`` (a loss's state: statistics and their update counter), one
    skipped entry skips all entries under it, so that no half-loaded state results.

    Returns ``{"loaded", "skipped", "missing", "unexpected"}`` key lists.

    Raises:
        FileNotFoundError: the file does not exist (named in the message).
        ValueError: the file is not a state dict, or none of its entries fits the module.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"pretrained weights file {file} does not exist")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state dict, found {type(state).__name__}")
    own = module.state_dict()
    state = _strip_prefixes(dict(state), own, prefixes)
    loaded = sorted(k for k, v in state.items() if k in own and own[k].shape == v.shape)
    if not loaded:
        raise ValueError(f"{file}: no parameter matches {type(module).__name__} (is it for "
                         f"another architecture?); first keys: {list(state)[:3]}")
    skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    for prefix in atomic:
        if any(k.startswith(prefix) for k in skipped):
            whole = [k for k in loaded if k.startswith(prefix)]
            loaded = [k for k in loaded if not k.startswith(prefix)]
            skipped = sorted(set(skipped) | set(whole))
    # BatchNorm's counter is absent from FrozenBatchNorm2d: not worth a warning
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own
                        and not k.endswith("num_batches_tracked"))
    if skipped or missing or unexpected:
        parts = []
        if skipped:
            parts.append(f"skipped {len(skipped)} entries of another shape (or of a loss state "
                         f"with such an entry): " + ", ".join(
                             f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})"
                             for k in skipped))
        if missing:
            parts.append(f"{len(missing)} model entries not in the file keep their "
                         f"initialisation ({', '.join(missing[:6])}"
                         f"{', ...' if len(missing) > 6 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} file entries unused ({', '.join(unexpected[:6])}"
                         f"{', ...' if len(unexpected) > 6 else ''})")
        warnings.warn(f"{file}: " + "; ".join(parts), stacklevel=3)
    module.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "skipped": skipped, "missing": missing, "unexpected": unexpected}
