"""Long-tailed Fashion-MNIST: CE vs balanced softmax vs Softmax-EQL vs Sigmoid-EQL, several
seeds and imbalance ratios, mean +- std of overall / many / medium / few accuracy.

Needs the full Fashion-MNIST IDX files (Debian: apt-get install dataset-fashion-mnist, or
--root DIR). Each run trains the small CNN with the package's defaults on a long-tailed subset
(n_k = n_max * r^(-k/9)) and evaluates on the full balanced test set (10,000 images) once
training ends. Finished runs are reused when the script is run again.

    python benchmarks/cls_fashion_mnist_lt.py --out benchmarks/results/cls_fmnist_lt
    python benchmarks/cls_fashion_mnist_lt.py --out benchmarks/results/cls_fmnist_lt_tau2 \
        --imbalance 100 --losses softmax_eql --set loss.tau=2.0
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from eqlosses.config import load_config
from eqlosses.tasks.classification import run_dir_for, train

LOSSES = ("ce", "balanced_softmax", "softmax_eql", "sigmoid_eql")
COLUMNS = (("overall", "top1"), ("many", "many"), ("medium", "medium"), ("few", "few"))


def _value(metrics, key):
    return metrics["top1"] if key == "top1" else metrics["groups"][key]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cls_fmnist_lt"))
    parser.add_argument("--root", default=None, help="Fashion-MNIST IDX directory")
    parser.add_argument("--imbalance", type=float, nargs="+", default=[100.0, 10.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--n-max", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    results = {}
    for imbalance in args.imbalance:
        for loss in args.losses:
            for seed in args.seeds:
                name = f"r{imbalance:g}-{loss}-s{seed}"
                overrides = [f"output_dir={args.out / 'runs'}", f"name={name}",
                             "data.name=fashion_mnist", f"data.imbalance={imbalance}",
                             f"data.n_max={args.n_max}", f"loss.name={loss}", f"seed={seed}",
                             f"optim.epochs={args.epochs}", f"eval.every_epochs={args.epochs}",
                             "progress=false"] + args.set
                if args.root:
                    overrides.append(f"data.root={args.root}")
                cfg = load_config(None, overrides)
                done = run_dir_for(cfg) / "metrics.json"
                start = time.time()
                if done.is_file():  # finished earlier: reuse (the script can be re-run)
                    metrics = json.loads(done.read_text())["metrics"]
                else:
                    metrics = train(cfg, overwrite=True)["metrics"]
                results.setdefault((imbalance, loss), []).append(metrics)
                print(f"{name}: top1 {100 * metrics['top1']:.2f} "
                      f"({time.time() - start:.0f} s)", flush=True)

    lines = [f"Fashion-MNIST-LT, small CNN, {args.epochs} epochs, n_max={args.n_max}, seeds "
             f"{args.seeds}; accuracy (%) on the balanced test set, mean +- std over seeds; "
             f"many > 100, medium 20-100, few < 20 training images.", "",
             "| imbalance | loss | overall | many | medium | few |", "|---|---|---|---|---|---|"]
    for (imbalance, loss), runs in results.items():
        cells = []
        for _, key in COLUMNS:
            values = [100 * _value(m, key) for m in runs]
            if any(math.isnan(v) for v in values):  # no class of this group at this ratio
                cells.append("-")
                continue
            if len(values) == 1:
                cells.append(f"{values[0]:.1f}")
                continue
            cells.append(f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}")
        lines.append(f"| {imbalance:g} | {loss} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
