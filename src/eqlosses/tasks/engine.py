"""The training loop shared by classification, detection and segmentation.

A task (``tasks/classification.py``, ``tasks/detection.py``, ``tasks/segmentation.py``)
builds its data, loss and model and hands them over as a :class:`Job`: the modules, the
training set and the labels its sampler draws from, a ``step`` function (batch -> loss) and an
``evaluate`` function. :func:`fit` then reads top to bottom: resume if asked, and for each
epoch :func:`train_one_epoch`, a checkpoint and ``evaluate``. :func:`train`,
:func:`evaluate_checkpoint` and :func:`run_dir_for` serve every task (each task module
re-exports them), and :func:`evaluation_loader` is the evaluation prologue they share.

Checkpoints hold everything needed to continue exactly: model (with the loss inside it for
detection), the loss's statistics, optimiser, schedule, loss scaler, the sampler's epoch and
position, every rank's RNG states and the step counters; they are written atomically. Ctrl-C
(SIGINT) is honoured at the next step boundary, after which a checkpoint is saved; a resume
with another batch size, world size, sampler, seed or data layout is refused.
"""

from __future__ import annotations

import json
import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import distributed
from ..config import save_config, to_dict
from ..data.seeding import item_seed
from ..losses import LongTailLoss
from .common import (JsonlLog, Progress, collective_errors, init_distributed, load_checkpoint,
                     maybe_tensorboard, resolve_device, rng_state, save_checkpoint,
                     seed_everything, set_rng_state, truncate_jsonl)

__all__ = ["Job", "TrainState", "StopRequest", "build_optimizer", "build_schedule",
           "amp_dtype", "train_one_epoch", "prepare_run", "fit", "check_checkpoint",
           "TASK_MODULES", "task_module", "run_dir_for", "train", "evaluate_checkpoint",
           "evaluate_checkpoint_of", "evaluation_loader"]

#: a training step: (model, batch) -> (loss, samples in the batch, extra values to log)
StepFn = Callable[[nn.Module, Any], Tuple[torch.Tensor, int, Dict[str, torch.Tensor]]]


@dataclass
class Job:
    """What a task hands to :func:`fit`."""

    kind: str  # "cls", "det" or "seg": names the checkpoint format
    model: nn.Module  # the module that is optimised, checkpointed and evaluated
    criterion: LongTailLoss  # the loss whose statistics are recorded (may live in ``model``)
    train_set: Dataset
    sampler_labels: Any  # one class per sample, or per-image class lists (detection)
    num_classes: int
    step: StepFn
    evaluate: Callable[[], Dict[str, Any]]
    summary_keys: Tuple[str, ...]  # metrics written to the log after each evaluation
    layout: Dict[str, Any] = field(default_factory=dict)  # fixes the sample order (resume)
    collate_fn: Optional[Callable] = None
    start_info: Dict[str, Any] = field(default_factory=dict)  # logged once at the start
    result_info: Dict[str, Any] = field(default_factory=dict)  # written into metrics.json
    loss_generator: Optional[torch.Generator] = None  # stochastic losses' own RNG
    find_unused_parameters: bool = False


# --------------------------------------------------------------------------------------------
# Optimiser, schedule, precision
# --------------------------------------------------------------------------------------------

def build_optimizer(optim_cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on norms and biases (parameters with ndim <= 1)."""
    o = optim_cfg
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    raise ValueError(f"unknown optim.name '{o.name}'; choose sgd or adamw")


def build_schedule(optim_cfg, optimizer, steps_per_epoch: int):
    """Per-step multiplier: linear warm-up, then cosine decay, steps or a constant."""
    o = optim_cfg
    total = max(1, o.epochs * steps_per_epoch)
    warmup = int(o.warmup_epochs * steps_per_epoch)
    if o.schedule not in ("cosine", "step", "constant"):
        raise ValueError(f"unknown optim.schedule '{o.schedule}'; choose cosine, step or "
                         f"constant")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if o.schedule == "step":
            epoch = step // max(1, steps_per_epoch)
            return o.step_gamma ** sum(epoch >= m for m in o.milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """``optim.amp`` -> autocast dtype (None = full precision)."""
    if mode == "auto":
        return torch.float16 if device.type == "cuda" else None
    if mode == "off":
        return None
    if mode == "fp16":
        if device.type != "cuda":
            raise ValueError("optim.amp=fp16 needs a CUDA device; use bf16 or off on the CPU")
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    raise ValueError(f"unknown optim.amp '{mode}'; choose auto, off, fp16 or bf16")


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    batches_done: int = 0  # in the current epoch, on this rank
    in_step: bool = False  # True between a batch's forward and its counters' update


class StopRequest:
    """Turns Ctrl-C (SIGINT) into a request honoured at the next step boundary, so that the
    checkpoint saved on the way out never holds half a step. With several processes the
    request is all-reduced each step, so every rank stops after the same step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def should_stop(self, device: torch.device) -> bool:
        if distributed.world_size() == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)  # NCCL needs the GPU
        distributed.all_reduce_sum_(flag)
        return bool(flag.item() > 0)


def train_one_epoch(model, step_fn: StepFn, loader, optimizer, scheduler, scaler, device,
                    state: TrainState, cfg, log: JsonlLog, recorder, writer=None, on_step=None,
                    stop: Optional[StopRequest] = None) -> None:
    """One pass over ``loader`` (which starts where ``state.batches_done`` says). Raises
    ``KeyboardInterrupt`` at a step boundary when ``stop`` was requested."""
    model.train()
    progress = Progress(len(loader), f"epoch {state.epoch + 1}", cfg.progress, cfg.log_every)
    seen = 0
    for batch in loader:
        state.in_step = True
        loss, n, extras = step_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.optim.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state.step += 1
        state.batches_done += 1
        state.in_step = False
        seen += n
        loss = float(loss.detach())
        if state.step % cfg.log_every == 0 or state.batches_done == 1:
            lr = optimizer.param_groups[0]["lr"]
            parts = {k: float(v) for k, v in extras.items()}
            log.write(kind="step", epoch=state.epoch, step=state.step, loss=loss, lr=lr,
                      **parts)
            if writer is not None:
                writer.add_scalar("train/loss", loss, state.step)
                writer.add_scalar("train/lr", lr, state.step)
                for key, value in parts.items():
                    writer.add_scalar(f"train/{key}", value, state.step)
        if recorder is not None and state.step % cfg.stats_every == 0:
            recorder.record(state.step, state.epoch)
        progress.update(state.batches_done, seen, loss=loss)
        if on_step is not None:
            on_step()
        if stop is not None and stop.should_stop(device):
            raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------
# Run directory, checkpoints
# --------------------------------------------------------------------------------------------

def prepare_run(cfg, run_dir: Path, resume: bool, overwrite: bool) -> torch.device:
    """Device, process group and seeds; refuses to clobber a run unless asked."""
    device = resolve_device(cfg.device)
    init_distributed(device, getattr(cfg, "dist_timeout", None))
    seed_everything(cfg.seed, cfg.deterministic)
    if (run_dir / "checkpoint.pt").exists() and not (resume or overwrite):
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, "
                              f"--overwrite to start again, or choose another name")
    if overwrite and not resume and distributed.rank() == 0:
        for stale in ("checkpoint.pt", "checkpoint.pt.tmp", "log.jsonl", "stats.bin",
                      "stats.jsonl", "metrics.json"):
            (run_dir / stale).unlink(missing_ok=True)
    return device


def _layout(cfg, job: Job) -> Dict[str, Any]:
    """What fixes the order of the samples: resuming needs all of it unchanged (``seeding``
    names how loaders and augmentation are seeded: runs saved before ``item_seed`` replaced
    ``hash`` would continue with other samples, so they are refused)."""
    d = cfg.data
    return {"batch_size": d.batch_size, "world_size": distributed.world_size(),
            "sampler": d.sampler, "rfs_threshold": d.rfs_threshold, "seed": cfg.seed,
            "epochs": cfg.optim.epochs, "seeding": "item_seed", **job.layout}


def _per_rank(value: Any) -> list:
    """``value`` from every rank, in rank order (one collective with several processes)."""
    if distributed.world_size() == 1:
        return [value]
    out: list = [None] * distributed.world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def _rng_states(loss_generator: Optional[torch.Generator]) -> Dict[str, Any]:
    state = rng_state()
    if loss_generator is not None:
        state["loss"] = loss_generator.get_state()
    return state


def _format(kind: str) -> str:
    return f"eqlosses-{kind}-1"


def _format_found(ckpt: Dict[str, Any]) -> str:
    """What a checkpoint dict says of its format, for an error message."""
    if "format" not in ckpt:
        keys = ", ".join(map(repr, sorted(map(str, ckpt))[:5])) or "none"
        return f"it has no 'format' entry (top-level keys: {keys})"
    return f"its format is {ckpt['format']!r}"


def check_checkpoint(ckpt: Dict[str, Any], cfg, kind: str, num_classes: int, path: Path,
                     layout: Optional[Dict[str, Any]] = None) -> None:
    """Refuse a checkpoint of another task, class count, model or loss (and, when ``layout``
    is given, of another sample order)."""
    if ckpt.get("format") != _format(kind):
        raise ValueError(f"{path} is not an eqlosses '{kind}' checkpoint: "
                         f"{_format_found(ckpt)}, expected {_format(kind)!r}")
    old = ckpt["config"]
    problems = []
    if ckpt["num_classes"] != num_classes:
        problems.append(f"{ckpt['num_classes']} classes in the checkpoint, {num_classes} in "
                        f"the data")
    for section, key in (("model", "name"), ("model", "arch"), ("model", "backbone"),
                         ("loss", "name")):
        before = old.get(section, {}).get(key)
        now = getattr(getattr(cfg, section), key, None)
        if before != now:
            problems.append(f"{section}.{key} '{before}' in the checkpoint, '{now}' configured")
    if layout is not None and "layout" in ckpt:
        problems += [f"{key} {ckpt['layout'].get(key)!r} in the checkpoint, {layout[key]!r} "
                     f"now" for key in layout if ckpt["layout"].get(key) != layout[key]]
    if problems:
        raise ValueError(f"cannot resume from {path}: " + "; ".join(problems))


def fit(cfg, job: Job, device: torch.device, run_dir: Path, resume: bool = False
        ) -> Dict[str, Any]:
    """Train ``job`` as configured, evaluating every ``cfg.eval.every_epochs`` epochs and at
    the end; returns ``{"name", "loss", "metrics", **job.result_info}`` (also written to
    ``metrics.json``). Outputs: config.yaml, log.jsonl, stats.bin, checkpoint.pt,
    metrics.json (and TensorBoard events when installed)."""
    from ..data.samplers import LongTailSampler
    from ..monitor.recorder import StatsRecorder

    model, criterion = job.model, job.criterion
    ckpt_path = run_dir / "checkpoint.pt"
    train_model = model
    if distributed.world_size() > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=job.find_unused_parameters)
    sampler = LongTailSampler(job.sampler_labels, job.num_classes, mode=cfg.data.sampler,
                              rfs_threshold=cfg.data.rfs_threshold, seed=cfg.seed)
    steps_per_epoch = math.ceil(len(sampler) / cfg.data.batch_size)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_schedule(cfg.optim, optimizer, steps_per_epoch)
    use_scaler = amp_dtype(cfg.optim.amp, device) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    state = TrainState()
    layout = _layout(cfg, job)

    if resume:
        ckpt = load_checkpoint(ckpt_path)
        check_checkpoint(ckpt, cfg, job.kind, job.num_classes, ckpt_path, layout)
        model.load_state_dict(ckpt["model"])
        criterion.load_state_dict(ckpt["criterion"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(ckpt["epoch"], ckpt["step"], ckpt["batches_done"])
        rngs = ckpt["rng"][distributed.rank()]
        set_rng_state(rngs)
        if "loss" in rngs and job.loss_generator is not None:
            job.loss_generator.set_state(rngs["loss"])
        if distributed.rank() == 0:  # forget what was logged after the checkpoint
            from ..monitor.recorder import truncate_stats

            for name in ("log.jsonl", "stats.jsonl"):  # stats.jsonl: runs of older versions
                truncate_jsonl(run_dir / name, state.step)
            truncate_stats(run_dir / "stats.bin", state.step)
            # a save killed midway left its temporary file: never read, the next save
            # overwrites it; removed here so that it holds no disk space meanwhile
            (run_dir / "checkpoint.pt.tmp").unlink(missing_ok=True)
    if distributed.rank() == 0:
        save_config(cfg, run_dir / "config.yaml")
    log = JsonlLog(run_dir / "log.jsonl")
    writer = maybe_tensorboard(cfg.tensorboard, run_dir / "tensorboard")
    recorder = StatsRecorder(run_dir / "stats.bin", criterion)
    log.write(kind="start", resume=resume, world_size=distributed.world_size(),
              device=str(device), num_classes=job.num_classes, train_size=len(job.train_set),
              **job.start_info)

    def checkpoint() -> None:
        sampler_state = {"epoch": state.epoch,
                         "position": state.batches_done * cfg.data.batch_size}
        save_checkpoint(ckpt_path, {
            "format": _format(job.kind), "config": to_dict(cfg),
            "num_classes": job.num_classes, "model": model.state_dict(),
            "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "sampler": sampler_state, "epoch": state.epoch, "step": state.step,
            "batches_done": state.batches_done, "layout": layout,
            "rng": _per_rank(_rng_states(job.loss_generator)),  # one entry per rank
        })

    def every_k_steps() -> None:
        k = cfg.checkpoint_every_steps
        if k and state.step % k == 0:
            checkpoint()

    def evaluate() -> Dict[str, Any]:
        metrics = job.evaluate()
        summary = {k: metrics[k] for k in job.summary_keys if k in metrics}
        log.write(kind="eval", epoch=state.epoch, step=state.step, **summary,
                  groups=metrics.get("groups", {}))
        if writer is not None:
            for key, value in summary.items():
                writer.add_scalar(f"val/{key}", value, state.step)
        return metrics

    metrics: Optional[Dict[str, Any]] = None  # ({} on ranks > 0 for gathered metrics)
    while state.epoch < cfg.optim.epochs:
        sampler.set_epoch(state.epoch)
        sampler.load_state_dict({"epoch": state.epoch,
                                 "position": state.batches_done * cfg.data.batch_size})
        if hasattr(job.train_set, "set_epoch"):
            job.train_set.set_epoch(state.epoch)
        loader_seed = item_seed(cfg.seed, state.epoch, distributed.rank())
        loader = DataLoader(job.train_set, batch_size=cfg.data.batch_size, sampler=sampler,
                            num_workers=cfg.data.num_workers, collate_fn=job.collate_fn,
                            pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(loader_seed))
        criterion.train()
        try:
            with StopRequest() as stop:
                train_one_epoch(train_model, job.step, loader, optimizer, scheduler, scaler,
                                device, state, cfg, log, recorder, writer, every_k_steps, stop)
        except KeyboardInterrupt:
            if not state.in_step:  # a step boundary: the state is consistent
                checkpoint()
            log.write(kind="interrupted", epoch=state.epoch, step=state.step,
                      saved=not state.in_step)
            raise
        state.epoch += 1
        state.batches_done = 0
        checkpoint()
        if state.epoch == cfg.optim.epochs or state.epoch % cfg.eval.every_epochs == 0:
            metrics = evaluate()
    if metrics is None:  # resumed a finished run
        metrics = job.evaluate()
    if state.step % cfg.stats_every:  # the final state, unless the last step recorded it
        recorder.record(state.step, state.epoch, force=True)
    result = {"name": run_dir.name, "loss": cfg.loss.name, "metrics": metrics,
              **job.result_info}
    if distributed.rank() == 0:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    if writer is not None:
        writer.close()
    return result


# --------------------------------------------------------------------------------------------
# The tasks: one train / evaluate-checkpoint / run-directory path for all of them
# --------------------------------------------------------------------------------------------

#: task -> the module of :mod:`eqlosses.tasks` that builds its :class:`Job` (``build_job``)
#: and names its runs (``RUN_NAME``, formatted with ``cfg``)
TASK_MODULES = {"cls": "classification", "det": "detection", "seg": "segmentation"}


def task_module(task: str):
    """The module of a task (``cls``, ``det``, ``seg``)."""
    from importlib import import_module

    if task not in TASK_MODULES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_MODULES)}")
    return import_module(f"{__package__}.{TASK_MODULES[task]}")


def run_dir_for(cfg) -> Path:
    """Where a run writes: ``output_dir/name``, the name defaulting to the task's
    ``RUN_NAME`` pattern (e.g. ``cls-embedded-softmax_eql-seed0``)."""
    name = cfg.name or task_module(cfg.task).RUN_NAME.format(cfg=cfg)
    return Path(cfg.output_dir) / name


def train(cfg, resume: bool = False, overwrite: bool = False) -> Dict[str, Any]:
    """Train and evaluate the task ``cfg.task`` as configured; returns the final metrics.
    Outputs go to :func:`run_dir_for` ``(cfg)`` (see :func:`fit`)."""
    build_job = task_module(cfg.task).build_job
    run_dir = run_dir_for(cfg)
    # a peer that died or hangs: a clear error within cfg.dist_timeout, not a hang
    with collective_errors(getattr(cfg, "dist_timeout", None)):
        device = prepare_run(cfg, run_dir, resume, overwrite)
        return fit(cfg, build_job(cfg, device), device, run_dir, resume)


def evaluate_checkpoint(path: Path, device: str = "auto", overrides: Optional[list] = None,
                        task: Optional[str] = None) -> Tuple[Dict[str, Any], Any]:
    """Evaluate a checkpoint on its configured evaluation set (the configuration saved in it,
    with ``overrides``); returns ``(metrics, config)``. The task is read from the checkpoint;
    ``task`` (``cls``, ``det``, ``seg``), when given, must match it."""
    from ..config import CONFIGS, apply_overrides, from_dict

    ckpt = load_checkpoint(Path(path))
    kind = next((t for t in TASK_MODULES if ckpt.get("format") == _format(t)), None)
    if kind is None or (task is not None and kind != task):
        wanted = f"'{task}' " if task else ""
        raise ValueError(f"{path} is not an eqlosses {wanted}checkpoint: "
                         f"{_format_found(ckpt)}")
    cfg = apply_overrides(from_dict(ckpt["config"], CONFIGS[kind]()), overrides or [])
    dev = resolve_device(device)
    job = task_module(kind).build_job(cfg, dev)
    check_checkpoint(ckpt, cfg, kind, job.num_classes, Path(path))
    job.model.load_state_dict(ckpt["model"])
    job.criterion.load_state_dict(ckpt["criterion"])
    return job.evaluate(), cfg


def evaluate_checkpoint_of(task: str) -> Callable[..., Tuple[Dict[str, Any], Any]]:
    """:func:`evaluate_checkpoint` bound to ``task``: what each task module exports as its
    ``evaluate_checkpoint(path, device="auto", overrides=None)``."""
    def evaluate_task_checkpoint(path: Path, device: str = "auto",
                                 overrides: Optional[list] = None) -> Tuple[Dict[str, Any], Any]:
        return evaluate_checkpoint(path, device, overrides, task=task)

    evaluate_task_checkpoint.__doc__ = (f"Evaluate a '{task}' checkpoint on its configured "
                                        f"evaluation set: :func:`eqlosses.tasks.engine."
                                        f"evaluate_checkpoint` with ``task='{task}'``.")
    return evaluate_task_checkpoint


def evaluation_loader(model: nn.Module, dataset: Dataset, batch_size: int, num_workers: int = 0,
                      collate_fn: Optional[Callable] = None) -> DataLoader:
    """Put ``model`` in eval mode and return a loader over this process's shard of
    ``dataset``: every ``world_size``-th sample from ``rank`` (no padding, so no sample counts
    twice). With several processes the model's buffers are first broadcast from rank 0
    (BatchNorm running statistics drift apart under DDP: every rank evaluates rank 0's)."""
    model.eval()
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1:
        for buf in model.buffers():
            torch.distributed.broadcast(buf, 0)
    shard = Subset(dataset, list(range(rank, len(dataset), world))) if world > 1 else dataset
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_fn, generator=torch.Generator())  # global RNG untouched
