"""Machinery shared by the training tasks: devices, processes, seeding, checkpoints, logs."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import distributed

__all__ = ["resolve_device", "init_distributed", "seed_everything", "rng_state",
           "set_rng_state", "save_checkpoint", "load_checkpoint", "JsonlLog", "Progress",
           "maybe_tensorboard", "truncate_jsonl"]


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
