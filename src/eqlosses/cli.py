"""The ``eqlosses`` command: demo, data, train, eval, compare, plot.

    eqlosses demo                                  # the main job, a few minutes on a CPU
    eqlosses train cls --config cfg.yaml --set loss.tau=1.5
    eqlosses data make-detection --out data/canvas-det
    eqlosses train det --config configs/det_faster_rcnn_sigmoid_eql.yaml
    eqlosses data make-segmentation --out data/canvas-seg
    eqlosses train seg --config configs/seg_canvas_softmax_eql.yaml
    eqlosses eval --checkpoint runs/NAME/checkpoint.pt
    eqlosses compare runs/A runs/B --out runs/compare
    eqlosses plot runs/NAME
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["main"]

DEMO_LOSSES = ("ce", "balanced_softmax", "softmax_eql", "sigmoid_eql")
TASK_MODULES = {"cls": "classification", "det": "detection", "seg": "segmentation"}


def _task_module(task: str):
    from importlib import import_module

    return import_module(f".tasks.{TASK_MODULES[task]}", __package__)


def _train(args) -> int:
    from .config import load_config
    from .tasks.reporting import format_table, report_run

    cfg = load_config(args.config, args.set, task=args.task)
    module = _task_module(args.task)
    result = module.train(cfg, resume=args.resume, overwrite=args.overwrite)
    run_dir = module.run_dir_for(cfg)
    print(format_table([result]))
    _report(lambda: report_run(run_dir))
    print(f"outputs in {run_dir}")
    return 0


def _report(make) -> None:
    from . import distributed

    if distributed.rank() != 0:
        return
    try:
        path = make()
        print(f"report: {path}")
    except ImportError as err:
        print(f"(no plots or report: {err})", file=sys.stderr)


def _demo(args) -> int:
    from .config import load_config
    from .tasks.classification import run_dir_for, train
    from .tasks.reporting import compare_runs

    out = Path(args.out)
    run_dirs = []
    for loss in args.losses:
        overrides = [f"output_dir={out}", f"name={loss}", f"loss.name={loss}",
                     f"optim.epochs={args.epochs}", f"eval.every_epochs={args.epochs}",
                     f"seed={args.seed}"] + list(args.set)
        cfg = load_config(None, overrides)
        print(f"== training with {loss} ({args.epochs} epochs) ==", flush=True)
        train(cfg, resume=False, overwrite=True)
        run_dirs.append(run_dir_for(cfg))
    result = compare_runs(run_dirs, out / "compare",
                          title="eqlosses demo: Fashion-MNIST-LT (imbalance 100)")
    print(result["table"])
    print(f"report: {result['report']}")
    return 0


def _eval(args) -> int:
    import json

    from .tasks.common import load_checkpoint
    from .tasks.reporting import format_table

    fmt = load_checkpoint(Path(args.checkpoint)).get("format", "")
    task = {f"eqlosses-{t}-1": t for t in TASK_MODULES}.get(fmt)
    if task is None:
        raise ValueError(f"{args.checkpoint} is not an eqlosses checkpoint (format {fmt!r})")
    metrics, cfg = _task_module(task).evaluate_checkpoint(Path(args.checkpoint), args.device,
                                                          args.set)
    print(format_table([{"name": Path(args.checkpoint).parent.name, "loss": cfg.loss.name,
                         "metrics": metrics}]))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))
        print(f"metrics written to {args.json}")
    return 0


def _data(args) -> int:
    from .data import canvas

    spec = {"n_max": args.n_max, "imbalance": args.imbalance, "val_per_class":
            args.val_per_class, "size": args.size, "seed": args.seed}
    if args.kind == "make-detection":
        summary = canvas.make_detection(args.out, overwrite=args.overwrite,
                                        check_groups=not args.allow_empty_groups, **spec)
        print(f"wrote {summary['train_images']} training and {summary['val_images']} "
              f"validation images with {summary['num_classes']} classes to {args.out} "
              f"(LVIS groups by training images: {summary['groups']})")
    else:
        summary = canvas.make_segmentation(args.out, overwrite=args.overwrite, **spec)
        print(f"wrote {summary['train_images']} training and {summary['val_images']} "
              f"validation images with {summary['num_classes']} classes (background "
              f"included) to {args.out}")
    return 0


def _compare(args) -> int:
    from .tasks.reporting import compare_runs

    result = compare_runs([Path(r) for r in args.runs], Path(args.out))
    print(result["table"])
    print(f"report: {result['report']}")
    return 0


def _plot(args) -> int:
    from .tasks.reporting import report_run

    print(f"report: {report_run(Path(args.run))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqlosses", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train CE, balanced softmax, Softmax-EQL and Sigmoid-EQL "
                                       "on the embedded Fashion-MNIST-LT and compare them")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--losses", nargs="+", default=list(DEMO_LOSSES))
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="configuration override applied to every run")
    demo.set_defaults(func=_demo)

    data = sub.add_parser("data", help="generate the canvas detection / segmentation benchmark "
                                       "from the embedded Fashion-MNIST items")
    data.add_argument("kind", choices=["make-detection", "make-segmentation"])
    data.add_argument("--out", required=True, help="output directory (must be new or empty)")
    data.add_argument("--n-max", type=int, default=200,
                      help="training instances of the most frequent class (default 200)")
    data.add_argument("--imbalance", type=float, default=200.0,
                      help="n_max / instances of the rarest class (default 200)")
    data.add_argument("--val-per-class", type=int, default=6,
                      help="validation instances per class (default 6)")
    data.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    data.add_argument("--allow-empty-groups", action="store_true",
                      help="detection: do not require every LVIS group to have classes")
    data.set_defaults(func=_data)

    train = sub.add_parser("train", help="train a model from a configuration")
    train.add_argument("task", choices=list(TASK_MODULES),
                       help="cls: image classification, det: object detection, seg: semantic "
                            "segmentation")
    train.add_argument("--config", help="YAML configuration file (defaults otherwise)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override, e.g. --set loss.tau=1.5 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue the run's checkpoint")
    train.add_argument("--overwrite", action="store_true", help="start the run again")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--json", help="also write the metrics to this JSON file")
    ev.set_defaults(func=_eval)

    cmp_ = sub.add_parser("compare", help="table, plots and report across runs")
    cmp_.add_argument("runs", nargs="+", help="run directories")
    cmp_.add_argument("--out", default="runs/compare")
    cmp_.set_defaults(func=_compare)

    plot = sub.add_parser("plot", help="plots and report for one run")
    plot.add_argument("run", help="run directory")
    plot.set_defaults(func=_plot)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status. Errors print one line and return 2
    (130 after Ctrl-C, once the checkpoint is saved)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        hint = ("; training saves a checkpoint at the step it stops at: continue with --resume"
                if args.command in ("train", "demo") else "")
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"eqlosses: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
