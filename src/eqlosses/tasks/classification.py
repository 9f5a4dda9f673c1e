"""Long-tailed image classification: data, model, loss, a flat training loop and evaluation.

``train(cfg)`` reads top to bottom: build the data, the loss (which says how many logit
channels it needs), the model, the optimiser and schedule; resume if asked; then for each
epoch ``train_one_epoch`` and ``evaluate``. Checkpoints hold everything needed to continue
exactly: model, optimiser, schedule, loss scaler, the loss's statistics, the sampler's epoch
and position, the RNG states and the step counters. Ctrl-C saves a checkpoint first.
"""

from __future__ import annotations

import json
import math
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import distributed
from ..config import ClassificationConfig, LossConfig, save_config, to_dict
from ..data.frequency import FrequencyGroups, class_counts, many_medium_few_groups
from ..losses import LongTailLoss, build_loss
from .common import (JsonlLog, Progress, init_distributed, load_checkpoint, maybe_tensorboard,
                     resolve_device, rng_state, save_checkpoint, seed_everything, set_rng_state,
                     truncate_jsonl)
from .models import build_classifier

__all__ = ["ClassificationData", "build_data", "build_criterion", "train", "train_one_epoch",
           "evaluate", "evaluate_checkpoint", "run_dir_for"]

#: losses that need detection conventions (objectness columns, quality targets)
DETECTION_ONLY = {"seesaw": "an objectness branch (C + 2 columns)", "eqfl": "IoU quality targets"}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

class SeededAugment(Dataset):
    """Random crop (zero padding) and horizontal flip, seeded by (seed, epoch, index).

    The augmentation of a sample depends only on those three numbers, so a run resumed
    mid-epoch (or run with any number of loader workers) sees exactly the same images.
    """

    def __init__(self, base: Dataset, seed: int, pad: int = 2, flip: bool = True):
        self.base, self.seed, self.pad, self.flip = base, seed, pad, flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, label = self.base[index]
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, int(index))) % 2**63)
        if self.pad:
            h, w = image.shape[-2:]
            padded = torch.nn.functional.pad(image, (self.pad,) * 4)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,), generator=g).tolist()
            image = padded[..., dy:dy + h, dx:dx + w]
        if self.flip and bool(torch.rand((), generator=g) < 0.5):
            image = image.flip(-1)
        return image, label


@dataclass
class ClassificationData:
    train: Dataset
    val: Dataset
    train_labels: np.ndarray
    num_classes: int
    in_channels: int
    image_size: int
    class_names: list


def build_data(cfg: ClassificationConfig) -> ClassificationData:
    """The training and evaluation sets named by ``cfg.data``."""
    from ..data import datasets  # noqa: PLC0415 - keeps the core import light

    d = cfg.data
    if d.name in ("embedded", "fashion_mnist"):
        from ..data.idx import FASHION_MNIST_CLASSES
        if d.name == "embedded":
            from ..data.embedded import load_embedded
            (x_tr, y_tr), (x_te, y_te) = load_embedded("train"), load_embedded("test")
        else:
            from ..data.idx import load_fashion_mnist
            from ..data.longtail import longtail_indices
            x_tr, y_tr = load_fashion_mnist(d.root, "train")
            x_te, y_te = load_fashion_mnist(d.root, "test")
            keep = longtail_indices(y_tr, 10, d.imbalance, n_max=d.n_max, seed=d.subset_seed)
            x_tr, y_tr = x_tr[keep], y_tr[keep]
        norm = dict(mean=(0.286,), std=(0.353,))
        train = datasets.ArrayImageDataset(x_tr, y_tr, **norm)
        val = datasets.ArrayImageDataset(x_te, y_te, **norm)
        if d.augment:
            train = SeededAugment(train, cfg.seed)
        return ClassificationData(train, val, np.asarray(y_tr), 10, 1, 28,
                                  list(FASHION_MNIST_CLASSES))
    if d.name in ("list", "folder"):
        tf_train, tf_val = _image_transforms(d.image_size, d.augment)
        if d.name == "list":
            if not (d.root and d.train_list and d.val_list):
                raise ValueError("data.name=list needs data.root, data.train_list and "
                                 "data.val_list (ImageNet-LT style 'path label' files)")
            train = datasets.ImageListDataset(d.root, d.train_list, transform=tf_train)
            val = datasets.ImageListDataset(d.root, d.val_list, transform=tf_val,
                                            num_classes=train.num_classes)
        else:
            if not d.root:
                raise ValueError("data.name=folder needs data.root with train/ and val/ "
                                 "image folders")
            train = datasets.image_folder(str(Path(d.root) / "train"), transform=tf_train)
            val = datasets.image_folder(str(Path(d.root) / "val"), transform=tf_val)
        names = [str(i) for i in range(train.num_classes)]
        return ClassificationData(train, val, np.asarray(train.labels), train.num_classes, 3,
                                  d.image_size, names)
    raise ValueError(f"unknown data.name '{d.name}'; choose embedded, fashion_mnist, list or "
                     f"folder")


def _image_transforms(size: int, augment: bool):
    try:
        from torchvision import transforms as T
    except ImportError:
        raise ImportError("image files need torchvision: pip install 'eqlosses[vision]'") from None
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment else [
        T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    val = [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose(train + [T.ToTensor(), norm]), T.Compose(val + [T.ToTensor(), norm])


# --------------------------------------------------------------------------------------------
# Loss, optimiser, schedule
# --------------------------------------------------------------------------------------------

def build_criterion(loss_cfg: LossConfig, num_classes: int, train_counts: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> LongTailLoss:
    """The loss by name; data-dependent arguments (class counts, frequencies) are filled in
    from the training set unless the configuration gives them."""
    if loss_cfg.name in DETECTION_ONLY:
        raise ValueError(f"loss '{loss_cfg.name}' needs {DETECTION_ONLY[loss_cfg.name]}: it is "
                         f"a detection loss; for classification choose ce, bce, focal, "
                         f"balanced_softmax, softmax_eql, sigmoid_eql, efl, eql, eql_softmax or "
                         f"federated")
    kwargs = dict(loss_cfg.kwargs)
    counts = train_counts.to(torch.float64)
    injected = {
        "balanced_softmax": {"class_counts": counts},
        "eql": {"class_frequency": counts / counts.sum()},
        "eql_softmax": {"class_frequency": counts / counts.sum(), "generator": generator},
        "federated": {"class_image_counts": counts, "generator": generator},
        "sigmoid_eql": {"objectness": False},
    }.get(loss_cfg.name, {})
    for key, value in injected.items():
        kwargs.setdefault(key, value)
    return build_loss(loss_cfg.name, num_classes, **kwargs)


def build_optimizer(cfg: ClassificationConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on norms and biases
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    raise ValueError(f"unknown optim.name '{o.name}'; choose sgd or adamw")


def build_schedule(cfg: ClassificationConfig, optimizer, steps_per_epoch: int):
    """Per-step multiplier: linear warm-up, then cosine decay, steps or a constant."""
    o = cfg.optim
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


def _amp(cfg: ClassificationConfig, device: torch.device) -> Optional[torch.dtype]:
    mode = cfg.optim.amp
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
# The loops
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


def train_one_epoch(model, criterion, loader, optimizer, scheduler, scaler, device, amp_dtype,
                    state: TrainState, cfg: ClassificationConfig, log: JsonlLog, recorder,
                    writer=None, on_step=None, stop: Optional[StopRequest] = None) -> None:
    """One pass over ``loader`` (which starts where ``state.batches_done`` says). Raises
    ``KeyboardInterrupt`` at a step boundary when ``stop`` was requested."""
    model.train()
    criterion.train()
    progress = Progress(len(loader), f"epoch {state.epoch + 1}", cfg.progress, cfg.log_every)
    seen = 0
    for images, labels in loader:
        state.in_step = True
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = model(images)
        loss = criterion(logits, labels)  # the loss computes in float32 from any logits
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
        seen += len(labels)
        loss = loss.detach()
        if state.step % cfg.log_every == 0 or state.batches_done == 1:
            lr = optimizer.param_groups[0]["lr"]
            log.write(kind="step", epoch=state.epoch, step=state.step, loss=float(loss), lr=lr)
            if writer is not None:
                writer.add_scalar("train/loss", float(loss), state.step)
                writer.add_scalar("train/lr", lr, state.step)
        if recorder is not None and state.step % cfg.stats_every == 0:
            recorder.record(state.step, state.epoch)
        progress.update(state.batches_done, seen, loss=float(loss))
        if on_step is not None:
            on_step()
        if stop is not None and stop.should_stop(device):
            raise KeyboardInterrupt


@torch.no_grad()
def evaluate(model: nn.Module, criterion: LongTailLoss, dataset: Dataset, num_classes: int,
             groups: Optional[FrequencyGroups], device: torch.device, batch_size: int = 512,
             num_workers: int = 0, amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """Accuracy overall, by frequency group, per class, top-5 and the confusion matrix.

    With several processes each rank evaluates a disjoint shard (no padding, so no sample
    counts twice) and the sums are all-reduced once.
    """
    from ..metrics.classification import ClassificationMetrics

    model.eval()
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1:  # BatchNorm running statistics drift apart under DDP: evaluate rank 0's
        for buf in model.buffers():
            torch.distributed.broadcast(buf, 0)
    shard = Subset(dataset, list(range(rank, len(dataset), world))) if world > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator())  # leaves the global RNG untouched
    metrics = ClassificationMetrics(num_classes, device=device)
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = model(images.to(device))
        metrics.update(criterion.scores(logits.float()), labels.to(device))
    metrics.sync()
    return metrics.compute(groups)


def run_dir_for(cfg: ClassificationConfig) -> Path:
    name = cfg.name or f"cls-{cfg.data.name}-{cfg.loss.name}-seed{cfg.seed}"
    return Path(cfg.output_dir) / name


def _run_layout(cfg: ClassificationConfig) -> Dict[str, Any]:
    """What fixes the order of the samples: resuming needs all of it unchanged."""
    d = cfg.data
    return {"batch_size": d.batch_size, "world_size": distributed.world_size(),
            "sampler": d.sampler, "rfs_threshold": d.rfs_threshold, "seed": cfg.seed,
            "data": d.name, "imbalance": d.imbalance, "n_max": d.n_max,
            "subset_seed": d.subset_seed, "augment": d.augment, "epochs": cfg.optim.epochs}


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


def _checkpoint(model, criterion, optimizer, scheduler, scaler, sampler_state, state, cfg,
                num_classes, loss_generator=None) -> Dict[str, Any]:
    rngs = _per_rank(_rng_states(loss_generator))
    return {
        "format": "eqlosses-cls-1",
        "config": to_dict(cfg),
        "num_classes": num_classes,
        "model": model.state_dict(),
        "criterion": criterion.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "sampler": sampler_state,
        "epoch": state.epoch,
        "step": state.step,
        "batches_done": state.batches_done,
        "layout": _run_layout(cfg),
        "rng": rngs,  # one entry per rank
    }


def _check_compatible(ckpt: Dict[str, Any], cfg: ClassificationConfig, num_classes: int,
                      path: Path, check_layout: bool = True) -> None:
    if ckpt.get("format") != "eqlosses-cls-1":
        raise ValueError(f"{path} is not an eqlosses classification checkpoint")
    old = ckpt["config"]
    problems = []
    if ckpt["num_classes"] != num_classes:
        problems.append(f"{ckpt['num_classes']} classes in the checkpoint, {num_classes} in "
                        f"the data")
    if old["model"]["name"] != cfg.model.name:
        problems.append(f"model '{old['model']['name']}' in the checkpoint, "
                        f"'{cfg.model.name}' configured")
    if old["loss"]["name"] != cfg.loss.name:
        problems.append(f"loss '{old['loss']['name']}' in the checkpoint, '{cfg.loss.name}' "
                        f"configured")
    if check_layout and "layout" in ckpt:
        now = _run_layout(cfg)
        problems += [f"{key} {ckpt['layout'][key]!r} in the checkpoint, {now[key]!r} now"
                     for key in now if ckpt["layout"].get(key) != now[key]]
    if problems:
        raise ValueError(f"cannot resume from {path}: " + "; ".join(problems))


def train(cfg: ClassificationConfig, resume: bool = False, overwrite: bool = False
          ) -> Dict[str, Any]:
    """Train and evaluate as configured; returns the final metrics. Outputs go to the run
    directory: config.yaml, log.jsonl, stats.jsonl, checkpoint.pt, metrics.json (and
    TensorBoard events when installed)."""
    from ..data.samplers import LongTailSampler
    from ..monitor.recorder import StatsRecorder

    device = resolve_device(cfg.device)
    init_distributed(device)
    seed_everything(cfg.seed, cfg.deterministic)
    run_dir = run_dir_for(cfg)
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists() and not (resume or overwrite):
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, "
                              f"--overwrite to start again, or choose another name")
    if overwrite and not resume and distributed.rank() == 0:
        for stale in ("checkpoint.pt", "log.jsonl", "stats.jsonl", "metrics.json"):
            (run_dir / stale).unlink(missing_ok=True)

    # Data, loss (which sets the number of logit channels), model, optimisation.
    data = build_data(cfg)
    counts = class_counts(torch.as_tensor(data.train_labels), data.num_classes)
    groups = many_medium_few_groups(counts, cfg.eval.few_below, cfg.eval.many_above)
    # Stochastic losses draw from their own generator (per rank), saved in checkpoints.
    loss_generator = torch.Generator(device).manual_seed(cfg.seed * 7919 + distributed.rank())
    criterion = build_criterion(cfg.loss, data.num_classes, counts, loss_generator).to(device)
    model = build_classifier(cfg.model.name, criterion.num_channels, data.in_channels,
                             data.image_size, cfg.model.width, cfg.model.cosine,
                             cfg.model.cosine_scale, cfg.model.pretrained).to(device)
    train_model = model
    if distributed.world_size() > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = LongTailSampler(data.train_labels, data.num_classes, mode=cfg.data.sampler,
                              rfs_threshold=cfg.data.rfs_threshold, seed=cfg.seed)
    steps_per_epoch = math.ceil(len(sampler) / cfg.data.batch_size)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_schedule(cfg, optimizer, steps_per_epoch)
    amp_dtype = _amp(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = TrainState()

    if resume:
        ckpt = load_checkpoint(ckpt_path)
        _check_compatible(ckpt, cfg, data.num_classes, ckpt_path)
        model.load_state_dict(ckpt["model"])
        criterion.load_state_dict(ckpt["criterion"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(ckpt["epoch"], ckpt["step"], ckpt["batches_done"])
        rngs = ckpt["rng"][distributed.rank()]
        set_rng_state(rngs)
        if "loss" in rngs:
            loss_generator.set_state(rngs["loss"])
        if distributed.rank() == 0:  # forget what was logged after the checkpoint
            for name in ("log.jsonl", "stats.jsonl"):
                truncate_jsonl(run_dir / name, state.step)
    if distributed.rank() == 0:
        save_config(cfg, run_dir / "config.yaml")
    log = JsonlLog(run_dir / "log.jsonl")
    writer = maybe_tensorboard(cfg.tensorboard, run_dir / "tensorboard")
    recorder = StatsRecorder(run_dir / "stats.jsonl", criterion)
    log.write(kind="start", resume=resume, world_size=distributed.world_size(),
              device=str(device), num_classes=data.num_classes, train_size=len(data.train),
              train_counts=counts.tolist(), groups=groups.group_of())

    def checkpoint() -> None:
        sampler_state = {"epoch": state.epoch,
                         "position": state.batches_done * cfg.data.batch_size}
        save_checkpoint(ckpt_path, _checkpoint(model, criterion, optimizer, scheduler, scaler,
                                               sampler_state, state, cfg, data.num_classes,
                                               loss_generator))

    def every_k_steps() -> None:
        k = cfg.checkpoint_every_steps
        if k and state.step % k == 0:
            checkpoint()

    metrics: Dict[str, Any] = {}
    while state.epoch < cfg.optim.epochs:
        sampler.set_epoch(state.epoch)
        sampler.load_state_dict({"epoch": state.epoch,
                                 "position": state.batches_done * cfg.data.batch_size})
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(state.epoch)
        loader_seed = hash((cfg.seed, state.epoch, distributed.rank())) % 2**63
        loader = DataLoader(data.train, batch_size=cfg.data.batch_size, sampler=sampler,
                            num_workers=cfg.data.num_workers,
                            pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(loader_seed))
        try:
            with StopRequest() as stop:
                train_one_epoch(train_model, criterion, loader, optimizer, scheduler, scaler,
                                device, amp_dtype, state, cfg, log, recorder, writer,
                                every_k_steps, stop)
        except KeyboardInterrupt:
            if not state.in_step:  # a step boundary: the state is consistent
                checkpoint()
            log.write(kind="interrupted", epoch=state.epoch, step=state.step,
                      saved=not state.in_step)
            raise
        state.epoch += 1
        state.batches_done = 0
        checkpoint()
        last = state.epoch == cfg.optim.epochs
        if last or state.epoch % cfg.eval.every_epochs == 0:
            metrics = evaluate(model, criterion, data.val, data.num_classes, groups, device,
                               cfg.data.eval_batch_size, cfg.data.num_workers, amp_dtype)
            summary = {k: metrics[k] for k in ("top1", "balanced_accuracy") if k in metrics}
            log.write(kind="eval", epoch=state.epoch, step=state.step, **summary,
                      groups=metrics.get("groups", {}))
            if writer is not None:
                for key, value in summary.items():
                    writer.add_scalar(f"val/{key}", value, state.step)
    if not metrics:  # resumed a finished run
        metrics = evaluate(model, criterion, data.val, data.num_classes, groups, device,
                           cfg.data.eval_batch_size, cfg.data.num_workers, amp_dtype)
    if state.step % cfg.stats_every:  # the final state, unless the last step recorded it
        recorder.record(state.step, state.epoch, force=True)
    result = {"name": run_dir.name, "loss": cfg.loss.name, "metrics": metrics,
              "train_counts": counts.tolist(), "class_names": data.class_names}
    if distributed.rank() == 0:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    if writer is not None:
        writer.close()
    return result


def evaluate_checkpoint(path: Path, device: str = "auto", overrides: Optional[list] = None
                        ) -> Tuple[Dict[str, Any], ClassificationConfig]:
    """Evaluate a checkpoint on its configured evaluation set (optionally overridden)."""
    from ..config import apply_overrides, from_dict

    ckpt = load_checkpoint(Path(path))
    if ckpt.get("format") != "eqlosses-cls-1":
        raise ValueError(f"{path} is not an eqlosses classification checkpoint")
    cfg = apply_overrides(from_dict(ckpt["config"]), overrides or [])
    dev = resolve_device(device)
    data = build_data(cfg)
    _check_compatible(ckpt, cfg, data.num_classes, Path(path), check_layout=False)
    counts = class_counts(torch.as_tensor(data.train_labels), data.num_classes)
    groups = many_medium_few_groups(counts, cfg.eval.few_below, cfg.eval.many_above)
    criterion = build_criterion(cfg.loss, data.num_classes, counts).to(dev)
    criterion.load_state_dict(ckpt["criterion"])
    model = build_classifier(cfg.model.name, criterion.num_channels, data.in_channels,
                             data.image_size, cfg.model.width, cfg.model.cosine,
                             cfg.model.cosine_scale).to(dev)
    model.load_state_dict(ckpt["model"])
    metrics = evaluate(model, criterion, data.val, data.num_classes, groups, dev,
                       cfg.data.eval_batch_size, cfg.data.num_workers)
    return metrics, cfg
