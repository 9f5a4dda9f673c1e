"""timm: a timm model trained with Softmax-EQL in a plain PyTorch loop, on the embedded
long-tailed Fashion-MNIST (nothing is downloaded: the model is randomly initialised).

    pip install "eqlosses[timm]"
    python examples/timm_softmax_eql.py                 # test_resnet, 2 epochs, hard labels
    python examples/timm_softmax_eql.py --mixup         # timm's Mixup/CutMix: [N, C] targets
    python examples/timm_softmax_eql.py --tiny          # a few seconds (the tests)

The loss is built once, moved with the model and called on the logits; it keeps its gradient
statistics in ``criterion.stats`` (saved with ``criterion.state_dict()``). With ``--mixup``,
timm's ``Mixup`` turns the labels into ``[N, C]`` probability targets (mixed one-hot vectors
with label smoothing), which Softmax-EQL takes as the soft cross-entropy of its adjusted
logits.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List, Optional

import timm
import torch
from timm.data import Mixup

from eqlosses import SoftmaxEQLLoss
from eqlosses.data.frequency import head_to_tail, many_medium_few_groups
from eqlosses.data.embedded import load_embedded
from eqlosses.metrics import ClassificationMetrics

NUM_CLASSES = 10


def tensors(split: str, every: int = 1):
    """The embedded split as float images ``[N, 1, 28, 28]`` and int64 labels (every
    ``every``-th image; the long tail is kept)."""
    images, labels = load_embedded(split)
    x = torch.from_numpy(images[::every]).float().div_(255).sub_(0.2860).div_(0.3530)
    return x.unsqueeze(1), torch.from_numpy(labels[::every])


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="test_resnet", help="any timm model name")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--mixup", action="store_true",
                        help="timm Mixup/CutMix with label smoothing (probability targets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="a few seconds: every 8th training image, 1 epoch")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs = 1

    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    x_train, y_train = tensors("train", 8 if args.tiny else 1)
    x_test, y_test = tensors("test", 10 if args.tiny else 1)
    counts = torch.bincount(y_train, minlength=NUM_CLASSES)

    # --- the recipe ---------------------------------------------------------------------
    model = timm.create_model(args.model, pretrained=False, num_classes=NUM_CLASSES,
                              in_chans=1)
    criterion = SoftmaxEQLLoss(NUM_CLASSES)      # num_channels == NUM_CLASSES
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                  num_classes=NUM_CLASSES) if args.mixup else None
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                                weight_decay=5e-4)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    model.train()
    criterion.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):  # even batches
            images, targets = x_train[order[i:i + args.batch_size]], y_train[
                order[i:i + args.batch_size]]
            if mixup is not None:
                images, targets = mixup(images, targets)   # targets: [N, C] probabilities
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    # -----------------------------------------------------------------------------------
    seconds = time.perf_counter() - start

    model.eval()
    metrics = ClassificationMetrics(NUM_CLASSES, topk=(1,))
    with torch.no_grad():
        for i in range(0, len(y_test), 500):
            metrics.update(criterion.scores(model(x_test[i:i + 500])), y_test[i:i + 500])
    result = metrics.compute(many_medium_few_groups(counts))
    ratio = criterion.stats.ratio(init=1.0)
    group_acc = {k: result["groups"][k] for k in head_to_tail(result["groups"])}
    out = {"top1": result["top1"], **group_acc,
           "head_ratio": float(ratio[0]), "tail_ratio": float(ratio[-1]),
           "updates": int(criterion.stats.num_updates), "train_seconds": seconds}
    groups = ", ".join(f"{k} {100 * v:.1f}%" for k, v in group_acc.items())
    print(f"{args.model} + Softmax-EQL{' + mixup' if args.mixup else ''}, {args.epochs} "
          f"epochs in {seconds:.0f} s: top-1 {100 * result['top1']:.1f}%, {groups}")
    print(f"gradient ratio P/N: head class {out['head_ratio']:.3f}, tail class "
          f"{out['tail_ratio']:.3f} after {out['updates']} updates")
    return out


if __name__ == "__main__":
    main()
