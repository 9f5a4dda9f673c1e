"""Machinery shared by the training tasks: devices, processes, seeding, checkpoints, logs."""

from __future__ import annotations

import json
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import distributed

__all__ = ["resolve_device", "init_distributed", "seed_everything", "rng_state",
           "set_rng_state", "save_checkpoint", "load_checkpoint", "JsonlLog", "Progress",
           "maybe_tensorboard", "truncate_jsonl", "ensure_canvas", "load_weights_file"]


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


def init_distributed(device: torch.device) -> None:
    """Start the default process group when launched by torchrun (WORLD_SIZE > 1): NCCL on
    GPUs, gloo on the CPU. A single process needs nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: Dict[str, Any]) -> Optional[Path]:
    """Write ``state`` atomically (temporary file, then rename) on rank 0 only, so that a
    run killed while saving never leaves a truncated checkpoint behind."""
    if distributed.rank() != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing
        raise ValueError(f"checkpoint {path} cannot be read ({err}); it may be truncated or "
                         f"not an eqlosses checkpoint") from None


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
    resumes from), so that a resumed run's logs have each step once."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if step is None or step <= max_step:
            kept.append(line)
    path.write_text("".join(f"{line}\n" for line in kept))


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
