"""Long-tailed image classification: data, model, loss and evaluation.

``build_job(cfg)`` builds the data, the loss (which says how many logit channels it needs)
and the model; ``train(cfg)`` hands them to the shared loop :func:`eqlosses.tasks.engine.fit`
(resume, ``train_one_epoch``, checkpoints, ``evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed
from ..config import ClassificationConfig, LossConfig
from ..data.seeding import SeededDataset
from ..data.frequency import FrequencyGroups, class_counts, many_medium_few_groups
from ..losses import ClassStatistics, LongTailLoss, build_loss_for
from .engine import (Job, amp_dtype, evaluate_checkpoint_of, evaluation_loader, run_dir_for,
                     train)
from .models import build_classifier

__all__ = ["ClassificationData", "SeededAugment", "build_data", "build_criterion",
           "build_job", "evaluate", "train", "evaluate_checkpoint", "run_dir_for", "RUN_NAME"]

#: the default run name (``output_dir/<name>``), formatted with the configuration
RUN_NAME = "cls-{cfg.data.name}-{cfg.loss.name}-seed{cfg.seed}"

#: evaluate a checkpoint of this task (refuses those of another task)
evaluate_checkpoint = evaluate_checkpoint_of("cls")

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

class SeededAugment(SeededDataset):
    """Random crop (zero padding) and horizontal flip, seeded by ``item_seed(seed, epoch,
    index)`` (:mod:`eqlosses.data.seeding`).

    The augmentation of a sample depends only on those three numbers, so a run resumed
    mid-epoch (or run with any number of loader workers) sees exactly the same images.
    """

    def __init__(self, base: Dataset, seed: int, pad: int = 2, flip: bool = True):
        super().__init__(base, seed)
        self.pad, self.flip = pad, flip

    def __getitem__(self, index: int):
        image, label = self.base[index]
        g = self.generator(index)
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
        if d.val_per_class and d.name != "fashion_mnist":
            raise ValueError("data.val_per_class draws from the training images a long-tailed "
                             "subset leaves out: data.name=fashion_mnist only (use "
                             "data.val_fraction for the other data sets)")
        if d.name == "embedded":
            from ..data.embedded import load_embedded
            (x_tr, y_tr), (x_te, y_te) = load_embedded("train"), load_embedded("test")
        else:
            from ..data.idx import load_fashion_mnist
            from ..data.longtail import longtail_indices
            x_tr, y_tr = load_fashion_mnist(d.root, "train")
            x_te, y_te = load_fashion_mnist(d.root, "test")
            keep = longtail_indices(y_tr, 10, d.imbalance, n_max=d.n_max, seed=d.subset_seed)
            if d.val_per_class:  # balanced, from the training images the subset left out
                from ..data.split import balanced_holdout
                held = balanced_holdout(y_tr, keep, d.val_per_class, 10, d.val_seed)
                x_te, y_te = x_tr[held], y_tr[held]
            x_tr, y_tr = x_tr[keep], y_tr[keep]
        if d.val_fraction:  # stratified hold-out of the (long-tailed) training set
            from ..data.split import stratified_holdout
            fit, held = stratified_holdout(y_tr, d.val_fraction, d.val_min_per_class,
                                           d.val_seed)
            x_te, y_te, x_tr, y_tr = x_tr[held], y_tr[held], x_tr[fit], y_tr[fit]
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
        labels = np.asarray(train.labels)
        if d.val_fraction:  # stratified hold-out of the training files, with val transforms
            from torch.utils.data import Subset

            from ..data.split import stratified_holdout
            fit, held = stratified_holdout(labels, d.val_fraction, d.val_min_per_class,
                                           d.val_seed)
            if d.name == "list":
                plain = datasets.ImageListDataset(d.root, d.train_list, transform=tf_val,
                                                  num_classes=train.num_classes)
            else:
                plain = datasets.image_folder(str(Path(d.root) / "train"), transform=tf_val)
            val, train, labels = Subset(plain, held.tolist()), Subset(train, fit.tolist()), \
                labels[fit]
        return ClassificationData(train, val, labels, len(names), 3, d.image_size, names)
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
    """The loss for an image classifier (head ``cls``), built by
    :func:`eqlosses.losses.build_loss_for`: the training statistics it declares (class
    counts, frequencies) are filled in from the training labels unless the configuration
    gives them."""
    counts = train_counts.to(torch.float64)
    statistics = ClassStatistics(counts, total=max(float(counts.sum()), 1.0))
    return build_loss_for("cls", loss_cfg.name, num_classes, statistics, generator=generator,
                          **loss_cfg.kwargs)


# --------------------------------------------------------------------------------------------
# The loops
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, criterion: LongTailLoss, dataset: Dataset, num_classes: int,
             groups: Optional[FrequencyGroups], device: torch.device, batch_size: int = 512,
             num_workers: int = 0, amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """Accuracy overall, by frequency group, per class, top-5 and the confusion matrix.

    With several processes each rank evaluates a disjoint shard (no padding, so no sample
    counts twice) and the sums are all-reduced once.
    """
    from ..metrics.classification import ClassificationMetrics

    loader = evaluation_loader(model, dataset, batch_size, num_workers)
    metrics = ClassificationMetrics(num_classes, device=device)
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = model(images.to(device))
        metrics.update(criterion.scores(logits.float()), labels.to(device))
    metrics.sync()
    return metrics.compute(groups)


def build_job(cfg: ClassificationConfig, device: torch.device) -> Job:
    """Data, loss (which sets the number of logit channels) and model, as a :class:`Job`."""
    data = build_data(cfg)
    counts = class_counts(torch.as_tensor(data.train_labels), data.num_classes)
    groups = many_medium_few_groups(counts, cfg.eval.few_below, cfg.eval.many_above)
    # Stochastic losses draw from their own generator (per rank), saved in checkpoints.
    loss_generator = torch.Generator(device).manual_seed(cfg.seed * 7919 + distributed.rank())
    criterion = build_criterion(cfg.loss, data.num_classes, counts, loss_generator).to(device)
    model = build_classifier(cfg.model.name, criterion.num_channels, data.in_channels,
                             data.image_size, cfg.model.width, cfg.model.cosine,
                             cfg.model.cosine_scale, cfg.model.pretrained).to(device)
    amp = amp_dtype(cfg.optim.amp, device)

    def step(train_model: nn.Module, batch) -> Tuple[torch.Tensor, int, Dict[str, Any]]:
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = train_model(images)
        return criterion(logits, labels), len(labels), {}  # the loss computes in float32

    def run_evaluation() -> Dict[str, Any]:
        return evaluate(model, criterion, data.val, data.num_classes, groups, device,
                        cfg.data.eval_batch_size, cfg.data.num_workers, amp)

    d = cfg.data
    return Job(kind="cls", model=model, criterion=criterion, train_set=data.train,
               sampler_labels=data.train_labels, num_classes=data.num_classes, step=step,
               evaluate=run_evaluation, summary_keys=("top1", "balanced_accuracy"),
               layout={"data": d.name, "imbalance": d.imbalance, "n_max": d.n_max,
                       "subset_seed": d.subset_seed, "augment": d.augment,
                       **({"val_fraction": d.val_fraction, "val_min_per_class":
                           d.val_min_per_class, "val_seed": d.val_seed}
                          if d.val_fraction else {})},
               start_info={"train_counts": counts.tolist(), "groups": groups.group_of()},
               result_info={"train_counts": counts.tolist(), "class_names": data.class_names},
               loss_generator=loss_generator)
