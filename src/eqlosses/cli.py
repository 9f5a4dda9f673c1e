"""The ``eqlosses`` command: demo, train, eval, compare, plot.

    eqlosses demo                                  # the main job, a few minutes on a CPU
    eqlosses train cls --config cfg.yaml --set loss.tau=1.5
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


def _train(args) -> int:
    from .config import load_config
    from .tasks.classification import run_dir_for, train
    from .tasks.reporting import format_table, report_run

    if args.task != "cls":
        print(f"eqlosses: task '{args.task}' is not available yet; only 'cls' is",
              file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.set)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    run_dir = run_dir_for(cfg)
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

    from .tasks.classification import evaluate_checkpoint
    from .tasks.reporting import format_table

    metrics, cfg = evaluate_checkpoint(Path(args.checkpoint), args.device, args.set)
    print(format_table([{"name": Path(args.checkpoint).parent.name, "loss": cfg.loss.name,
                         "metrics": metrics}]))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))
        print(f"metrics written to {args.json}")
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

    train = sub.add_parser("train", help="train a model from a configuration")
    train.add_argument("task", choices=["cls"], help="cls: image classification")
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
