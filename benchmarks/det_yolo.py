"""YOLO11n from scratch on the canvas benchmark: stock BCE vs EQFL vs EFL (CPU, image size 128).

Each (loss, seed) run trains ``yolo11n.yaml`` (random init, nothing downloaded) with
``eqlosses.integrations.ultralytics`` in a fresh offline process (``unshare -n`` when
``--unshare`` and available), then scores the last weights on the validation split with the
package's LVIS evaluator (conf >= 0.001, <= 300 detections per image) and reads the gradient
statistics saved in ``last.pt`` (every loss, ``bce`` included, keeps them). Results go to
``benchmarks/results/det_yolo/``: one ``<loss>_seed<k>.json`` per run and ``table.md``.

    nice -n 10 python benchmarks/det_yolo.py --epochs 3 --jobs 2

``--smoke`` runs a tiny version (a few images, one epoch) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tables import cell, write_table  # noqa: E402

LOSSES = ("bce", "eqfl", "efl")
OUT = Path(__file__).resolve().parent / "results" / "det_yolo"


def run_one(args: argparse.Namespace) -> Dict[str, Any]:
    """One training run, in this (fresh) process."""
    root = Path(args.workdir)
    from eqlosses.integrations.ultralytics import offline_environment

    offline_environment(root / "yolo_config", runs_dir=root / "runs")
    import torch

    torch.set_num_threads(1)
    from ultralytics import YOLO

    import eqlosses.integrations.ultralytics as U
    from eqlosses.data.yolo import evaluate_yolo

    data_yaml = Path(args.data) / "yolo" / "data.yaml"
    name = f"{args.loss}_seed{args.seed}"
    start = time.time()
    model = YOLO("yolo11n.yaml")
    model.train(data=str(data_yaml), trainer=U.detection_trainer(args.loss), epochs=args.epochs,
                imgsz=args.imgsz, batch=args.batch, workers=0, device="cpu", seed=args.seed,
                deterministic=True, plots=False, val=False, amp=False, verbose=False,
                project=str(root / "runs"), name=name, exist_ok=True,
                optimizer=args.optimizer, lr0=args.lr0, warmup_epochs=args.warmup_epochs)
    train_s = time.time() - start
    last = root / "runs" / name / "weights" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    stats = ckpt["model"].eqlosses_stats
    metrics = evaluate_yolo(YOLO(str(last)), data_yaml, imgsz=args.imgsz)
    cats = json.loads((Path(args.data) / "annotations" / "lvis_v1_train.json").read_text())
    freq = [c["frequency"] for c in sorted(cats["categories"], key=lambda c: c["id"])]
    pos, neg = stats.pos_grad.numpy(), stats.neg_grad.numpy()
    groups = {}
    for g in ("r", "c", "f"):
        idx = [k for k, f in enumerate(freq) if f == g]
        groups[g] = float(pos[idx].sum() / max(neg[idx].sum(), 1e-300)) if idx else float("nan")
    return {"loss": args.loss, "seed": args.seed, "epochs": args.epochs, "imgsz": args.imgsz,
            "batch": args.batch, "optimizer": args.optimizer, "lr0": args.lr0,
            "warmup_epochs": args.warmup_epochs, "train_seconds": round(train_s, 1),
            "cpu_seconds": round(time.process_time(), 1),
            "total_seconds": round(time.time() - start, 1),
            "metrics": {k: metrics[k] for k in ("AP", "AP50", "APr", "APc", "APf")},
            "num_detections": metrics["num_detections"],
            "statistics_updates": int(stats.num_updates),
            "mean_ratio": groups}


def max_scores(work: Path, results: List[Dict[str, Any]]) -> None:
    """Add each run's highest class score on the validation images (any score, before the
    0.001 threshold) to its result, from the ``last.pt`` kept in the work folder ``work``."""
    from eqlosses.integrations.ultralytics import offline_environment

    offline_environment(work / "yolo_config_rescore")
    import torch

    torch.set_num_threads(1)
    from ultralytics import YOLO

    images = sorted(str(p) for p in (work / "data" / "yolo" / "images" / "val").glob("*.png"))
    for r in results:
        name = f"{r['loss']}_seed{r['seed']}"
        last = work / f"{r['loss']}_{r['seed']}" / "runs" / name / "weights" / "last.pt"
        preds = YOLO(str(last)).predict(images, imgsz=r["imgsz"], conf=1e-12, max_det=300,
                                        verbose=False)
        r["max_score"] = float(max(float(p.boxes.conf.max()) for p in preds if len(p.boxes)))


def table(results: List[Dict[str, Any]], header: str) -> str:
    lines = [header, "",
             "| loss | seed | AP | AP50 | AP_r | AP_c | AP_f | detections | max score | "
             "ratio r / c / f | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (LOSSES.index(r["loss"]), r["seed"])):
        m, g = r["metrics"], r["mean_ratio"]
        lines.append(f"| {r['loss']} | {r['seed']} | {cell(m['AP'])} | {cell(m['AP50'])} | "
                     f"{cell(m['APr'])} | {cell(m['APc'])} | {cell(m['APf'])} | "
                     f"{r['num_detections']} | {r.get('max_score', float('nan')):.2g} | "
                     f"{g['r']:.3g} / {g['c']:.3g} / {g['f']:.3g} | {r['train_seconds']:.0f} |")
    for loss in LOSSES:
        rs = [r for r in results if r["loss"] == loss]
        if len(rs) > 1:
            mean = {k: sum(r["metrics"][k] for r in rs) / len(rs)
                    for k in ("AP", "AP50", "APr", "APc", "APf")}
            lines.append(f"| **{loss}** | mean | {cell(mean['AP'])} | {cell(mean['AP50'])} | "
                         f"{cell(mean['APr'])} | {cell(mean['APc'])} | {cell(mean['APf'])} | "
                         f"| | | |")
    return "\n".join(lines)


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    parser.add_argument("--optimizer", default="auto", help="ultralytics optimizer (auto: its "
                        "choice, AdamW at lr 0.000156 for 60 classes and a short run)")
    parser.add_argument("--lr0", type=float, default=0.01, help="initial lr (not with auto)")
    parser.add_argument("--warmup-epochs", type=float, default=3.0)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--smoke", action="store_true", help="a tiny dataset, one epoch")
    parser.add_argument("--unshare", action="store_true", help="run each job with unshare -n")
    parser.add_argument("--rescore", metavar="WORKDIR",
                        help="add the max scores of a finished benchmark's runs (its work "
                             "folder, printed at the start) and rewrite the table")
    # internal: one run
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = run_one(args)
        Path(args.result).write_text(json.dumps(result, indent=1))
        return 0

    os.environ["OMP_NUM_THREADS"] = "1"
    out = Path(args.out)
    if args.rescore:
        results = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*.json"))]
        max_scores(Path(args.rescore), results)
        for r in results:
            (out / f"{r['loss']}_seed{r['seed']}.json").write_text(json.dumps(r, indent=1))
        previous = (out / "table.md").read_text().split("\n| loss |")[0].rstrip("\n")
        header = previous.split("\n\n'max score'")[0]
        header += ("\n\n'max score' = the highest class score of any prediction on the "
                   "validation images (added by `--rescore WORKDIR`), 'detections' = "
                   "predictions at conf >= 0.001.")
        write_table(out, table(results, header).splitlines())
        return 0
    work = Path(tempfile.mkdtemp(prefix="det_yolo_"))
    print(f"work folder: {work}", flush=True)
    from eqlosses.data.yolo import make_detection_yolo

    spec = dict(n_max=8, imbalance=4, val_per_class=1, check_groups=False) if args.smoke else {}
    if args.smoke:
        args.epochs, args.seeds, args.imgsz = 1, args.seeds[:1], 64
    summary = make_detection_yolo(work / "data", **spec)
    jobs = [(loss, seed) for seed in args.seeds for loss in args.losses]
    running: List[Any] = []
    results: List[Dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    prefix = ["unshare", "-n"] if args.unshare and shutil.which("unshare") else []
    start = time.time()
    while jobs or running:
        while jobs and len(running) < args.jobs:
            loss, seed = jobs.pop(0)
            result = out / f"{loss}_seed{seed}.json"
            cmd = prefix + [sys.executable, __file__, "--one", "--loss", loss, "--seed",
                            str(seed), "--epochs", str(args.epochs), "--imgsz", str(args.imgsz),
                            "--batch", str(args.batch), "--data", str(work / "data"),
                            "--optimizer", args.optimizer, "--lr0", str(args.lr0),
                            "--warmup-epochs", str(args.warmup_epochs),
                            "--workdir", str(work / f"{loss}_{seed}"), "--result", str(result)]
            log = open(work / f"{loss}_{seed}.log", "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                            result, log, loss, seed))
        time.sleep(2)
        for item in list(running):
            proc, result, log, loss, seed = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                print((work / f"{loss}_{seed}.log").read_text()[-3000:])
                raise SystemExit(f"run {loss} seed {seed} failed ({proc.returncode})")
            results.append(json.loads(result.read_text()))
            print(f"done {loss} seed {seed} after {time.time() - start:.0f} s", flush=True)
    header = (f"YOLO11n from scratch (random init) on the canvas benchmark "
              f"({summary['train_images']} training / {summary['val_images']} validation "
              f"images, {summary['num_classes']} classes, groups {summary['groups']}), image "
              f"size {args.imgsz}, {args.epochs} epochs, batch {args.batch}, optimizer "
              f"{args.optimizer}{'' if args.optimizer == 'auto' else f' lr0 {args.lr0}'}, "
              f"warmup {args.warmup_epochs:g} epochs, CPU, one torch thread per run, "
              f"workers=0, ultralytics defaults otherwise (mosaic, box/cls/dfl gains). "
              f"Box AP by eqlosses' LVIS evaluator (conf >= 0.001, <= 300 per image). "
              f"'ratio' = accumulated positive / negative gradient of the classification term, "
              f"pooled over the classes of each LVIS group (rare / common / frequent), from "
              f"the statistics saved in last.pt. Wall time "
              f"{time.time() - start:.0f} s, {args.jobs} runs in parallel.\n\n"
              f"Command: `nice -n 10 python benchmarks/det_yolo.py --epochs {args.epochs} "
              f"--jobs {args.jobs} --optimizer {args.optimizer} --lr0 {args.lr0:g} "
              f"--warmup-epochs {args.warmup_epochs:g} --unshare --out {args.out}"
              f"{' --smoke' if args.smoke else ''}`")
    if not args.smoke:
        write_table(out, table(results, header).splitlines())
    else:
        print(table(results, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
