"""Lightning: Softmax-EQL on the embedded long-tailed Fashion-MNIST, with the gradient ratios
logged by a callback and accuracy by frequency group from a torchmetrics metric.

The data ship inside the package (2,478 training images, 1,000 for the head class down to 10
for the tail; 3,000 balanced test images), nothing is downloaded. On a CPU:

    pip install "eqlosses[lightning]"
    python examples/lightning_fmnist_lt.py                      # Softmax-EQL, 6 epochs
    python examples/lightning_fmnist_lt.py --loss ce            # the cross-entropy baseline
    python examples/lightning_fmnist_lt.py --tiny               # a few seconds (the tests)

It writes Lightning's CSV log (``metrics.csv``: ``grad_ratio/many``, ``grad_ratio/medium``,
``grad_ratio/few``, ``val/many`` ...) and the package's statistics file (``stats.bin``) to
``<out>/lightning_logs/version_<n>/``.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from eqlosses import BalancedSoftmaxLoss, CrossEntropyLoss, SoftmaxEQLLoss
from eqlosses.data.embedded import load_embedded
from eqlosses.integrations.lightning import FrequencyGroupAccuracy, GradientStatisticsCallback
from eqlosses.monitor.diagnosis import group_ratios
from eqlosses.tasks.models import SmallCNN

NUM_CLASSES = 10


def make_loss(name: str, counts: torch.Tensor) -> torch.nn.Module:
    """The loss by name; the baselines record gradient statistics too when they can."""
    if name == "softmax_eql":
        return SoftmaxEQLLoss(NUM_CLASSES)
    cls = {"ce": CrossEntropyLoss, "balanced_softmax": BalancedSoftmaxLoss}[name]
    kwargs = {"class_counts": counts} if cls is BalancedSoftmaxLoss else {}
    try:
        return cls(NUM_CLASSES, track_statistics=True, **kwargs)
    except TypeError:  # an eqlosses without statistics for the baselines
        return cls(NUM_CLASSES, **kwargs)


class LongTailClassifier(L.LightningModule):
    """A small CNN trained by any loss of the package; the loss is a submodule, so its
    statistics are in every checkpoint and restored on resume."""

    def __init__(self, criterion: torch.nn.Module, class_counts: torch.Tensor,
                 lr: float = 0.05, width: int = 32):
        super().__init__()
        self.model = SmallCNN(criterion.num_channels, in_channels=1, width=width)
        self.criterion = criterion
        self.val_acc = FrequencyGroupAccuracy(class_counts)
        self.lr = lr

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.criterion(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.val_acc.update(self.criterion.scores(self(images)), labels)

    def on_validation_epoch_end(self):
        self.log_dict({f"val/{k}": v for k, v in self.val_acc.compute().items()})
        self.val_acc.reset()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return [opt], [sched]


def tensors(split: str, every: int = 1):
    """The embedded split as float images ``[N, 1, 28, 28]`` and int64 labels; every
    ``every``-th image only (the long tail is kept: 125 head images down to 2 for ``8``)."""
    images, labels = load_embedded(split)
    x = torch.from_numpy(images[::every]).float().div_(255).sub_(0.2860).div_(0.3530)
    return x.unsqueeze(1), torch.from_numpy(labels[::every])


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss", default="softmax_eql",
                        choices=["softmax_eql", "ce", "balanced_softmax"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="runs/lightning_fmnist_lt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="a few seconds: every 8th training image, every 10th test "
                             "image, 2 epochs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs = min(args.epochs, 2)

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    L.seed_everything(args.seed, verbose=False)
    x_train, y_train = tensors("train", 8 if args.tiny else 1)
    x_test, y_test = tensors("test", 10 if args.tiny else 1)
    counts = torch.bincount(y_train, minlength=NUM_CLASSES)
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size,
                              shuffle=True)
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=500)

    module = LongTailClassifier(make_loss(args.loss, counts), counts,
                                width=8 if args.tiny else 32)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1,
                        logger=CSVLogger(args.out), log_every_n_steps=5,
                        callbacks=[GradientStatisticsCallback(counts, every_n_steps=5)],
                        enable_progress_bar=False, enable_model_summary=False,
                        deterministic=True)
    trainer.fit(module, train_loader, test_loader)

    results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if hasattr(module.criterion, "stats"):
        ratios = group_ratios(module.criterion.stats, counts)
        results.update({f"grad_ratio/{k}": v for k, v in ratios.items()})
    print(f"training images per class: {counts.tolist()}")
    print(f"{args.loss}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in results.items()
                                      if k.startswith("val/")))
    print("gradient ratio P/N by group: " + ", ".join(
        f"{k[len('grad_ratio/'):]} {v:.3f}" for k, v in results.items()
        if k.startswith("grad_ratio/")))
    print(f"log and statistics: {trainer.log_dir}")
    return results


if __name__ == "__main__":
    main()
