"""Hugging Face Transformers: ``Trainer(compute_loss_func=...)`` with Softmax-EQL for image
classification, on a tiny ViT (random init from a config) and the embedded long-tailed
Fashion-MNIST. Offline: nothing is downloaded (``HF_HUB_OFFLINE=1``).

    pip install "eqlosses[hf]"
    python examples/hf_trainer_softmax_eql.py            # 150 steps
    python examples/hf_trainer_softmax_eql.py --tiny     # a few steps (the tests)

The loss is registered as a submodule of the model (``model.eqlosses_loss``), so the Trainer
moves it to the model's device and its statistics are saved in the Trainer's checkpoints and
restored by ``trainer.train(resume_from_checkpoint=...)``. It is built with
``reduction="sum"`` and divided by ``num_items_in_batch`` (the labelled samples of the whole
accumulated batch, summed over processes), which is what the Trainer expects of a
``compute_loss_func``: the gradient is then right with gradient accumulation and several
processes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import (Trainer, TrainingArguments, ViTConfig,  # noqa: E402
                          ViTForImageClassification)

from eqlosses import SoftmaxEQLLoss  # noqa: E402
from eqlosses.data.embedded import load_embedded  # noqa: E402
from eqlosses.data.frequency import head_to_tail, many_medium_few_groups  # noqa: E402
from eqlosses.metrics import ClassificationMetrics  # noqa: E402

NUM_CLASSES = 10


class EmbeddedFashionMNIST(Dataset):
    """The embedded split as ``{"pixel_values": [1, 28, 28], "labels": int}`` items (every
    ``every``-th image; the long tail is kept)."""

    def __init__(self, split: str, every: int = 1):
        images, labels = load_embedded(split)
        x = torch.from_numpy(images[::every]).float().div_(255).sub_(0.2860).div_(0.3530)
        self.images, self.labels = x.unsqueeze(1), torch.from_numpy(labels[::every])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def tiny_vit(num_classes: int = NUM_CLASSES) -> ViTForImageClassification:
    """A 2-layer ViT for 28x28 grey images (72 k parameters), randomly initialised."""
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       num_labels=num_classes)
    return ViTForImageClassification(config)


def softmax_eql_loss_func(model: torch.nn.Module, num_classes: int = NUM_CLASSES):
    """Attach Softmax-EQL to ``model`` and return the ``compute_loss_func`` that uses it."""
    model.eqlosses_loss = SoftmaxEQLLoss(num_classes, reduction="sum")
    criterion = model.eqlosses_loss

    def compute_loss(outputs, labels, num_items_in_batch=None):
        loss = criterion(outputs.logits, labels)                 # summed over the batch
        if num_items_in_batch is None:
            num_items_in_batch = (labels != criterion.ignore_index).sum()
        return loss / num_items_in_batch

    return compute_loss


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="output directory (default: a temporary "
                                                    "one, removed at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="4 steps on a subset")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps = min(args.steps, 4)

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    train_set = EmbeddedFashionMNIST("train", 8 if args.tiny else 1)
    test_set = EmbeddedFashionMNIST("test", 10 if args.tiny else 1)
    counts = torch.bincount(train_set.labels, minlength=NUM_CLASSES)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        # --- the recipe -----------------------------------------------------------------
        model = tiny_vit()
        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir=args.out or tmp, max_steps=args.steps,
                                   per_device_train_batch_size=args.batch_size,
                                   learning_rate=1e-3, lr_scheduler_type="cosine",
                                   warmup_steps=0 if args.tiny else 20,
                                   logging_steps=max(1, args.steps // 10), save_strategy="no",
                                   report_to=[], use_cpu=True, seed=args.seed,
                                   disable_tqdm=True),
            train_dataset=train_set,
            compute_loss_func=softmax_eql_loss_func(model),
        )
        trainer.train()
        # ---------------------------------------------------------------------------------
        logits = trainer.predict(test_set).predictions

    criterion = model.eqlosses_loss
    metrics = ClassificationMetrics(NUM_CLASSES, topk=(1,))
    metrics.update(criterion.scores(torch.as_tensor(logits)), test_set.labels)
    result = metrics.compute(many_medium_few_groups(counts))
    group_acc = {k: result["groups"][k] for k in head_to_tail(result["groups"])}
    ratio = criterion.stats.ratio(init=1.0)
    out = {"top1": result["top1"], **group_acc, "head_ratio": float(ratio[0]),
           "tail_ratio": float(ratio[-1]), "updates": int(criterion.stats.num_updates)}
    groups = ", ".join(f"{k} {100 * v:.1f}%" for k, v in group_acc.items())
    print(f"tiny ViT + Softmax-EQL, {args.steps} steps: top-1 {100 * result['top1']:.1f}%, "
          f"{groups}")
    print(f"gradient ratio P/N: head class {out['head_ratio']:.3f}, tail class "
          f"{out['tail_ratio']:.3f} after {out['updates']} updates")
    return out


if __name__ == "__main__":
    main()
