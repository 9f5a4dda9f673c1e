"""Long-tailed semantic segmentation on the canvas benchmark: cross-entropy vs balanced
softmax vs Softmax-EQL; mIoU overall and of the head / body / tail classes.

The benchmark (61 classes: background + Fashion-MNIST item type x colour tint, a long tail
by pixel and image frequency) is generated into ``<out>/canvas`` with the default
specification when absent. Every run trains the same model from random init with the same
schedule and is evaluated once, at the end, on the whole validation canvases (dataset-level
mIoU from one confusion matrix). Finished runs are reused when the script is run again.

    python benchmarks/seg_canvas.py --out benchmarks/results/seg_canvas
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _tables import cell, get, write_table

from eqlosses.config import load_config
from eqlosses.tasks.segmentation import run_dir_for, train

LOSSES = ("ce", "balanced_softmax", "softmax_eql")
COLUMNS = (("miou", "mIoU"), ("pixel_accuracy", "pixel acc."), ("groups.head", "head mIoU"),
           ("groups.body", "body mIoU"), ("groups.tail", "tail mIoU"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/seg_canvas"))
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--arch", default="tiny_deeplab")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for loss in args.losses:
        overrides = [f"output_dir={args.out / 'runs'}", f"name={loss}",
                     f"data.root={args.out / 'canvas'}", f"model.arch={args.arch}",
                     f"model.backbone={args.backbone if args.backbone else 'null'}",
                     f"loss.name={loss}", f"seed={args.seed}", f"optim.epochs={args.epochs}",
                     f"eval.every_epochs={args.epochs}", "progress=false",
                     "tensorboard=false"] + args.set
        cfg = load_config(None, overrides, task="seg")
        done = run_dir_for(cfg) / "metrics.json"
        start = time.time()
        if done.is_file():  # finished earlier: reuse (the script can be re-run)
            result = json.loads(done.read_text())
        else:
            result = train(cfg, overwrite=True)
        m = result["metrics"]
        rows.append((loss, m))
        print(f"{loss}: mIoU {cell(m['miou'])} head {cell(get(m, 'groups.head'))} body "
              f"{cell(get(m, 'groups.body'))} tail {cell(get(m, 'groups.tail'))} "
              f"({time.time() - start:.0f} s)", flush=True)

    bounds = rows[0][1].get("group_bounds", {}) if rows else {}
    sizes = {g: sum(1 for x in rows[0][1].get("group_of", []) if x == g) for g in bounds}
    lines = [f"Canvas segmentation benchmark (61 classes incl. background), {args.arch}"
             f"{'/' + args.backbone if args.backbone else ''} from random init, {args.epochs} "
             f"epochs, seed {args.seed}; dataset-level IoU (%) on the validation canvases. "
             f"Groups by training pixel share: head > {bounds.get('head', [None])[0]} "
             f"({sizes.get('head')} classes), tail < {bounds.get('tail', [None, None])[1]} "
             f"({sizes.get('tail')} classes), body in between ({sizes.get('body')} classes).",
             "", "| loss | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for loss, m in rows:
        lines.append(f"| {loss} | " + " | ".join(cell(get(m, k)) for k, _ in COLUMNS) + " |")
    lines += ["", "Command: `python benchmarks/seg_canvas.py "
              + " ".join(argv if argv is not None else sys.argv[1:]) + "`"]
    write_table(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
