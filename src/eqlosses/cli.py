"""The ``eqlosses`` command: demo, data, train, eval, compare, plot.

    eqlosses demo                                  # the main job, a few minutes on a CPU
    eqlosses train cls --config cfg.yaml --set loss.tau=1.5
    eqlosses train cls --resume --run runs/NAME    # continue a stopped run as it was
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
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, List, Optional

__all__ = ["main", "build_parser"]

DEMO_LOSSES = ("ce", "balanced_softmax", "softmax_eql", "sigmoid_eql")
TASK_NAMES = {"cls": "image classification", "det": "object detection",
              "seg": "semantic segmentation"}

def _run_files() -> str:
    """The files of a run directory, as ``train --help`` describes them."""
    from .monitor.recorder import STATS_FILE as stats

    return ("config.yaml (the resolved configuration), checkpoint.pt (model, optimiser, loss "
            "statistics, sampler position, RNG states; every epoch and on Ctrl-C), log.jsonl "
            f"(training log), {stats} (per-class gradient statistics), metrics.json (final "
            "evaluation), report.html and plots/ (with matplotlib), tensorboard/ (with "
            "tensorboard)")


def _task_module(task: str):
    from .tasks.engine import task_module

    return task_module(task)


def _resume_command(task: str, run_dir: Path) -> str:
    return f"eqlosses train {task} --resume --run {shlex.quote(str(run_dir))}"


def _run_option(args, cfg, module) -> Optional[Path]:
    """``--run DIR``, if given; refuses a ``--set output_dir=`` / ``--set name=`` that names
    another directory."""
    if not args.run:
        return None
    run = Path(args.run)
    given = module.run_dir_for(cfg)
    named = [item.split("=", 1)[0].strip() for item in args.set]
    if any(key in ("output_dir", "name") for key in named) and \
            given.resolve() != run.resolve():
        from .config import ConfigError

        raise ConfigError(f"--run {run} and the --set output_dir / name ({given}) name "
                          f"different run directories; give one of them")
    return run


def _place_run(cfg, args, module) -> Path:
    """The run directory of a new run: ``--run DIR`` (output_dir = its parent, name = its
    last part) or output_dir/name."""
    run = _run_option(args, cfg, module)
    if run is not None:
        cfg.output_dir, cfg.name = str(run.parent), run.name
    return module.run_dir_for(cfg)


def _resume(args, module):
    """The saved configuration of the run to resume and its directory."""
    from .config import ConfigError, load_config, resume_config

    # what the user gives now: it locates the run and is compared with the run's own settings
    # (the resumed configuration is validated, not this one: a loss argument given for the
    # run's loss must not be checked against the default loss)
    given = load_config(args.config, args.set, task=args.task, check=False)
    run_dir = _run_option(args, given, module) or module.run_dir_for(given)
    if not (run_dir / "config.yaml").is_file():
        where = "--run" if args.run else "output_dir/name"
        others = sorted(p.parent.name for p in run_dir.parent.glob("*/config.yaml"))[:12]
        listing = (f" (runs in {run_dir.parent}: {', '.join(others)})" if others else "")
        raise ConfigError(f"no run to resume in {run_dir} (from {where}): it has no "
                          f"config.yaml. Name the run directory with --run DIR{listing}, or "
                          f"start a new run without --resume")
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"no checkpoint to resume in {run_dir}: the run stopped before its "
                          f"first checkpoint ({run_dir / 'checkpoint.pt'}). Start it again "
                          f"with: eqlosses train {args.task} --config "
                          f"{shlex.quote(str(run_dir / 'config.yaml'))} --run "
                          f"{shlex.quote(str(run_dir))} --overwrite")
    cfg = resume_config(run_dir, given, args.config, args.set)
    if module.run_dir_for(cfg).resolve() != run_dir.resolve():  # the run was moved
        cfg.output_dir, cfg.name = str(run_dir.parent), run_dir.name
    return cfg, run_dir


def _train(args) -> int:
    from . import distributed
    from .config import load_config
    from .tasks.reporting import format_table, report_run

    module = _task_module(args.task)
    if args.resume:
        cfg, run_dir = _resume(args, module)
    else:
        cfg = load_config(args.config, args.set, task=args.task)
        run_dir = _place_run(cfg, args, module)
    args.run_dir = run_dir  # for the Ctrl-C message
    result = module.train(cfg, resume=args.resume, overwrite=args.overwrite)
    if distributed.rank() == 0:  # under torchrun, one table, not one per process
        print(format_table([result]))
    _report(lambda: report_run(run_dir))
    if distributed.rank() == 0:
        print(f"outputs in {run_dir}")
    return 0


#: optional packages -> how to install them
_EXTRAS = {"matplotlib": "pip install 'eqlosses[cli]'", "torchvision": "pip install "
           "'eqlosses[vision]'", "PIL": "pip install 'eqlosses[vision]'", "faster_coco_eval":
           "pip install 'eqlosses[eval]'", "yaml": "pip install pyyaml"}


def _import_message(err: ImportError) -> str:
    """The error's text, with how to install the missing package when it does not say."""
    text = str(err)
    if "pip install" in text:
        return text
    name = (getattr(err, "name", None) or "").split(".")[0]
    for package, install in _EXTRAS.items():
        if name == package or f"'{package}" in text:
            return f"{text} ({install})"
    return text


def _report(make) -> None:
    from . import distributed

    if distributed.rank() != 0:
        return
    try:
        path = make()
        print(f"report: {path}")
    except ImportError as err:
        print(f"(no plots or report: {_import_message(err)})", file=sys.stderr)


def _demo(args) -> int:
    from .config import load_config
    from .tasks.classification import run_dir_for, train
    from .tasks.reporting import compare_runs, format_table

    out = Path(args.out)
    run_dirs, results = [], []
    for loss in args.losses:
        overrides = [f"output_dir={out}", f"name={loss}", f"loss.name={loss}",
                     f"optim.epochs={args.epochs}", f"eval.every_epochs={args.epochs}",
                     f"seed={args.seed}"] + list(args.set)
        cfg = load_config(None, overrides)
        args.run_dir = run_dir_for(cfg)  # for the Ctrl-C message
        print(f"== training with {loss} ({args.epochs} epochs) ==", flush=True)
        results.append(train(cfg, resume=False, overwrite=True))
        run_dirs.append(run_dir_for(cfg))
    args.run_dir = None
    try:
        result = compare_runs(run_dirs, out / "compare",
                              title="eqlosses demo: Fashion-MNIST-LT (imbalance 100)")
    except ImportError as err:  # matplotlib is optional: the table without plots
        print(format_table(results))
        print(f"(no plots or report: {_import_message(err)})", file=sys.stderr)
        return 0
    print(result["table"])
    print(f"report: {result['report']}")
    return 0


def _eval(args) -> int:
    import json

    from .tasks.engine import evaluate_checkpoint
    from .tasks.reporting import format_table

    metrics, cfg = evaluate_checkpoint(Path(args.checkpoint), args.device, args.set)
    print(format_table([{"name": Path(args.checkpoint).parent.name, "loss": cfg.loss.name,
                         "metrics": metrics}]))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))
        print(f"metrics written to {args.json}")
    return 0


def _data(args) -> int:
    from .data import canvas

    spec = {"n_max": args.n_max, "imbalance": args.imbalance, "val_per_class":
            args.val_per_class, "dev_per_class": args.dev_per_class, "size": args.size,
            "seed": args.seed}
    if args.kind == "make-detection":
        make = canvas.make_detection
        if getattr(args, "format", "lvis") == "yolo":
            from .data.yolo import make_detection_yolo as make
        summary = make(args.out, overwrite=args.overwrite,
                       check_groups=not args.allow_empty_groups, **spec)
        dev = (f", {summary['dev_images']} development" if "dev_images" in summary else "")
        print(f"wrote {summary['train_images']} training{dev} and {summary['val_images']} "
              f"validation images with {summary['num_classes']} classes to {args.out} "
              f"(LVIS groups by training images: {summary['groups']})")
        if "data_yaml" in summary:
            print(f"YOLO dataset: {summary['data_yaml']}")
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


def _losses_by_task() -> dict:
    """Help lines: task (and detection architectures) -> the loss names that fit, from the
    losses' declared traits (:func:`eqlosses.losses.losses_for`)."""
    from .losses import TASK_HEADS, losses_for

    out = {}
    for task, heads in TASK_HEADS.items():
        out[task] = ", ".join(losses_for(task))
        if task == "det":
            for head in dict.fromkeys(heads.values()):
                archs = ", ".join(a for a, h in heads.items() if h == head)
                out[f"  {archs}"] = ", ".join(losses_for(head))
    return out


def _paragraph(text: str, indent: str = "  ") -> str:
    import textwrap

    return textwrap.fill(text, width=90, subsequent_indent=indent, break_on_hyphens=False)


def _train_epilog() -> str:
    from .config import RESUME_MAY_CHANGE

    lines = ["losses by task (--set loss.name=NAME, the loss's arguments as --set "
             "loss.ARG=VALUE):"]
    lines += [_paragraph(f"  {task}: {names}", " " * (len(task) + 4))
              for task, names in _losses_by_task().items()]
    lines += [
        "",
        _paragraph("where runs go: the run directory is output_dir/name (default runs/<auto "
                   "name>, the name built from the task, data, loss and seed, e.g. "
                   "runs/cls-embedded-softmax_eql-seed0), or --run DIR. It holds "
                   + _run_files() + "."),
        "",
        _paragraph("resuming: eqlosses train TASK --resume --run runs/NAME continues the run "
                   "with its own config.yaml; settings given again (--config, --set) must "
                   "agree with it, except " + ", ".join(RESUME_MAY_CHANGE) + "."),
        "",
        "examples:",
        "  eqlosses train cls --set loss.name=balanced_softmax --set optim.epochs=12",
        "  eqlosses train cls --config configs/cls_embedded.yaml --run runs/eql",
        "  eqlosses train cls --resume --run runs/eql",
    ]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog is built when the help is shown (it imports torch)."""

    def __init__(self, *args, epilog_factory: Optional[Callable[[], str]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epilog_factory = epilog_factory

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="eqlosses", formatter_class=raw,
                     description="The equalization losses for long-tailed recognition: train, "
                                 "evaluate and compare.",
                     epilog="examples:\n" + "\n".join(
                         line.replace("    eqlosses", "  eqlosses", 1)
                         for line in __doc__.splitlines() if "eqlosses " in line))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="train CE, balanced softmax, Softmax-EQL and Sigmoid-EQL "
                                       "on the embedded Fashion-MNIST-LT and compare them",
                          description="Train the small CNN with each loss on the embedded "
                                      "Fashion-MNIST-LT (imbalance 100), evaluate on the "
                                      "balanced test subset and compare them: a table, plots "
                                      "and an HTML report in OUT/compare. The runs are "
                                      "OUT/LOSS, started afresh each time.")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--epochs", type=int, default=12,
                      help="training epochs of each run (default 12)")
    demo.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    demo.add_argument("--losses", nargs="+", default=list(DEMO_LOSSES), metavar="LOSS",
                      help=f"the losses to compare (default {' '.join(DEMO_LOSSES)})")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="configuration override applied to every run (repeatable)")
    demo.set_defaults(func=_demo)

    data = sub.add_parser("data", help="generate the canvas detection / segmentation benchmark "
                                       "from the embedded Fashion-MNIST items")
    data.add_argument("kind", choices=["make-detection", "make-segmentation"],
                      help="make-detection: LVIS-format boxes and masks; make-segmentation: "
                           "class maps (0 = background)")
    data.add_argument("--out", required=True, help="output directory (must be new or empty)")
    data.add_argument("--n-max", type=int, default=200,
                      help="training instances of the most frequent class (default 200)")
    data.add_argument("--imbalance", type=float, default=200.0,
                      help="n_max / instances of the rarest class (default 200)")
    data.add_argument("--val-per-class", type=int, default=6,
                      help="validation instances per class (default 6)")
    data.add_argument("--dev-per-class", type=int, default=0,
                      help="make-detection: development instances per class, carved from the "
                           "training items (images/dev, lvis_v1_dev.json; choose settings "
                           "there with --set data.eval_split=dev); default 0: none")
    data.add_argument("--size", type=int, default=128,
                      help="canvas side in pixels (default 128)")
    data.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    data.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    data.add_argument("--allow-empty-groups", action="store_true",
                      help="detection: do not require every LVIS group to have classes")
    data.add_argument("--format", choices=["lvis", "yolo"], default="lvis",
                      help="make-detection: lvis (JSON + PNGs) or yolo (the same, plus an "
                           "Ultralytics dataset in OUT/yolo: images, label files, data.yaml)")
    data.set_defaults(func=_data)

    train = sub.add_parser("train", help="train a model from a configuration",
                           formatter_class=raw, epilog_factory=_train_epilog,
                           description="Train and evaluate a model: defaults, then the "
                                       "--config file, then the --set overrides.")
    train.add_argument("task", choices=list(TASK_NAMES),
                       help="; ".join(f"{t}: {n}" for t, n in TASK_NAMES.items()))
    train.add_argument("--config", help="YAML configuration file (defaults otherwise)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override, e.g. --set loss.tau=1.5 (repeatable)")
    train.add_argument("--run", metavar="DIR",
                       help="the run directory (instead of --set output_dir=... --set "
                            "name=...); with --resume, the run to continue")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run from its checkpoint, with its saved config.yaml")
    again.add_argument("--overwrite", action="store_true",
                       help="start the run again, deleting its checkpoint and logs")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint",
                        description="Evaluate a checkpoint on its run's evaluation set (the "
                                    "configuration saved in the checkpoint).")
    ev.add_argument("--checkpoint", required=True, metavar="PATH",
                    help="a run's checkpoint.pt, e.g. runs/NAME/checkpoint.pt")
    ev.add_argument("--device", default="auto",
                    help="cpu, cuda, cuda:1, ... (default auto: CUDA when available)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override of the saved configuration, e.g. --set "
                         "data.eval_batch_size=64 (repeatable)")
    ev.add_argument("--json", help="also write the metrics to this JSON file")
    ev.set_defaults(func=_eval)

    cmp_ = sub.add_parser("compare", help="table, plots and report across runs")
    cmp_.add_argument("runs", nargs="+", help="run directories")
    cmp_.add_argument("--out", default="runs/compare",
                      help="output directory of the table, plots and report.html (default "
                           "runs/compare)")
    cmp_.set_defaults(func=_compare)

    plot = sub.add_parser("plot", help="plots and report for one run")
    plot.add_argument("run", help="run directory")
    plot.set_defaults(func=_plot)
    return parser


def _interrupted(args) -> str:
    """What to tell the user after Ctrl-C: where the checkpoint is and how to continue."""
    run_dir = getattr(args, "run_dir", None)
    if args.command not in ("train", "demo") or run_dir is None:
        return "interrupted"
    ckpt = Path(run_dir) / "checkpoint.pt"
    task = getattr(args, "task", "cls")
    if not ckpt.is_file():
        return (f"interrupted before the run's first checkpoint; nothing to resume in "
                f"{run_dir}")
    text = (f"interrupted; the checkpoint is {ckpt}\ncontinue the run with: "
            f"{_resume_command(task, Path(run_dir))}")
    if args.command == "demo":
        text += "\n(eqlosses demo itself starts all its runs again)"
    return text


def _fused_kernel_from_environment() -> None:
    """``EQLOSSES_FUSED_CPU=1``: the softmax losses run on the fused CPU kernel
    (:mod:`eqlosses.functional.fused`); one that cannot be built is an error, not a silent
    fallback."""
    from .functional import fused

    try:
        if fused.enable_from_environment() and os.environ.get("RANK", "0") == "0":
            print("eqlosses: the softmax losses use the fused CPU kernel (EQLOSSES_FUSED_CPU=1)",
                  file=sys.stderr)  # (under torchrun, once)
    except RuntimeError as err:
        raise ValueError(f"EQLOSSES_FUSED_CPU=1: {err}") from err


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status. Errors print one line and return 2
    (130 after Ctrl-C, once the checkpoint is saved)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("train", "eval", "demo"):
            _fused_kernel_from_environment()
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\n{_interrupted(args)}", file=sys.stderr)
        return 130
    except ImportError as err:
        print(f"eqlosses: error: {_import_message(err)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"eqlosses: error: {err}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:  # a full disk, a peer process that died
        common = sys.modules.get("eqlosses.tasks.common")  # only it raises these two
        if common is None or not isinstance(err, (common.CheckpointWriteError,
                                                  common.CollectiveError)):
            raise
        print(f"eqlosses: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
