"""GPU check in one run (under 5 minutes on one GPU): speed, mixed precision, host syncs, NCCL.

1. ``speed``: the loss/baseline time ratios of ``bench_losses.py`` (every case that runs on
   the device) on the device.
2. ``amp``: the gradient statistics after a few steps of a small model trained with fp16
   autocast and a ``GradScaler`` equal those of the same steps in fp32 within 1e-3 (relative
   to the largest statistic); on the CPU bf16 autocast is used (tolerance 1e-2).
3. ``no-sync``: with ``validate=False`` a training forward + backward + statistics update
   makes no host synchronisation (CUDA: ``torch.cuda.set_sync_debug_mode("error")``; CPU:
   counted on the tensor-to-Python conversions).
4. ``ddp``: one classification step (small CNN, Softmax-EQL) and one detection step (tiny
   Faster R-CNN, Sigmoid-EQL) under DistributedDataParallel in one process with NCCL (gloo on
   the CPU); the statistics are updated once and finite.

A table ends the output; ``--out DIR`` also writes ``table.md`` and ``results.json``.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu      # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --quick             # the same paths, CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_losses  # noqa: E402  (the speed cases, shared with the CPU benchmark)

import eqlosses  # noqa: E402

Row = Dict[str, Any]


def check_speed(device: str, quick: bool, repeats: int) -> List[Row]:
    rows = []
    for name, (description, _) in bench_losses.CASES.items():
        if name in bench_losses.CPU_ONLY and not device.startswith("cpu"):
            continue
        ours, base, ratio, best = bench_losses.time_case(name, device, quick, repeats)
        rows.append({"check": f"speed {name}", "ok": True,
                     "value": f"{ratio:.2f}x, best-of {best:.2f}x ({ours * 1e3:.2f} / "
                              f"{base * 1e3:.2f} ms)",
                     "detail": description})
    return rows


def _train_statistics(name: str, device: str, amp: bool, steps: int, c: int = 40) -> torch.Tensor:
    """pos/neg statistics after ``steps`` steps of a linear model, fp32 or autocast."""
    torch.manual_seed(0)
    model = nn.Linear(64, c + (1 if name == "sigmoid_eql" else 0)).to(device)
    loss = eqlosses.build_loss(name, c).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    half = torch.float16 if device.startswith("cuda") else torch.bfloat16
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp and half == torch.float16)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(256, 64, generator=g).to(device)
        w = torch.arange(1, c + 1, dtype=torch.float64) ** -1.2
        t = torch.multinomial(w, 256, replacement=True, generator=g).to(device)
        with torch.autocast(device.split(":")[0], dtype=half, enabled=amp):
            logits = model(x)
        value = loss(logits.float(), t)
        opt.zero_grad(set_to_none=True)
        scaler.scale(value).backward()
        scaler.step(opt)
        scaler.update()
    return torch.stack([loss.stats.pos_grad, loss.stats.neg_grad]).cpu()


def check_amp(device: str, quick: bool) -> List[Row]:
    rows = []
    tolerance = 1e-3 if device.startswith("cuda") else 1e-2
    for name in ("sigmoid_eql", "efl", "softmax_eql"):
        steps = 5 if quick else 20
        full = _train_statistics(name, device, False, steps)
        mixed = _train_statistics(name, device, True, steps)
        rel = float((mixed - full).abs().max() / full.abs().max())
        mode = "fp16 + GradScaler" if device.startswith("cuda") else "bf16"
        rows.append({"check": f"amp {name}", "ok": bool(rel <= tolerance),
                     "value": f"{rel:.1e}", "detail": f"{mode} vs fp32 statistics after "
                                                      f"{steps} steps, max relative difference "
                                                      f"(bound {tolerance:g})"})
    return rows


def _count_cpu_syncs(fn: Callable[[], None]) -> int:
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    count = [0]

    def counting(original):
        def wrapper(self, *args, **kwargs):
            count[0] += 1
            return original(self, *args, **kwargs)
        return wrapper

    try:
        for n, original in saved.items():
            setattr(torch.Tensor, n, counting(original))
        fn()
    finally:
        for n, original in saved.items():
            setattr(torch.Tensor, n, original)
    return count[0]


def check_no_sync(device: str) -> List[Row]:
    rows = []
    c = 30
    for name in sorted(eqlosses.LOSSES):
        cls = eqlosses.LOSSES[name]
        head = "dense" if "dense" in cls.traits.heads else cls.traits.heads[0]
        stats = eqlosses.ClassStatistics(torch.arange(c, 0, -1) * 10.0, total=c * 100)
        try:
            loss = eqlosses.build_loss_for(head, name, c, stats, validate=False).to(device)
        except ValueError as err:
            rows.append({"check": f"no-sync {name}", "ok": False, "value": "-",
                         "detail": f"no validate switch: {err}"})
            continue
        n = 512
        logits = torch.randn(n, loss.num_channels, device=device, requires_grad=True)
        high = c if head in ("roi", "dense") else c - 1
        targets = torch.randint(0, high + 1, (n,), device=device)
        kwargs: Dict[str, Any] = {}
        if loss.traits.normalizer:
            kwargs["normalizer"] = torch.tensor(50.0, device=device)
        if loss.traits.quality:
            kwargs["quality"] = torch.rand(n, device=device)
        loss(logits, targets, **kwargs).backward()  # warm-up (lazy initialisation)

        def step():
            loss(logits, targets, **kwargs).backward()

        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
                syncs, detail = 0, "set_sync_debug_mode('error') raised nothing"
            except RuntimeError as err:
                syncs, detail = 1, f"synchronised: {str(err).splitlines()[0]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            syncs = _count_cpu_syncs(step)
            detail = "tensor-to-Python conversions counted"
        rows.append({"check": f"no-sync {name}", "ok": syncs == 0, "value": str(syncs),
                     "detail": detail})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ddp(device: str) -> List[Row]:
    import torch.distributed as dist

    from eqlosses.tasks.models import build_classifier

    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)
    rows = []
    try:
        dev = torch.device(device)
        ids = [dev.index or 0] if dev.type == "cuda" else None
        loss = eqlosses.build_loss("softmax_eql", 10).to(dev)
        model = build_classifier("small_cnn", 10, 1, 28, 8).to(dev)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        images = torch.randn(32, 1, 28, 28, device=dev)
        labels = torch.randint(0, 10, (32,), device=dev)
        loss(ddp(images), labels).backward()
        ok = int(loss.stats.num_updates) == 1 and bool(torch.isfinite(loss.stats.pos_grad).all())
        rows.append({"check": f"ddp classification ({backend})", "ok": ok,
                     "value": f"updates={int(loss.stats.num_updates)}",
                     "detail": "small CNN + Softmax-EQL, one step under DDP"})

        from eqlosses.tasks.detection_models import build_detector, detection_loss

        box_loss = eqlosses.build_loss_for("roi", "sigmoid_eql", 5)
        det = build_detector("faster_rcnn", 5, box_loss, backbone="tiny", min_size=64,
                             rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                             box_batch_size_per_image=64).to(dev).train()
        ddp_det = nn.parallel.DistributedDataParallel(det, device_ids=ids,
                                                      find_unused_parameters=True)
        targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 12.0, 60.0, 58.0]],
                                          device=dev),
                    "labels": torch.tensor([1, 3], device=dev)} for _ in range(2)]
        losses = ddp_det([torch.rand(3, 64, 64, device=dev) for _ in range(2)], targets)
        sum(losses.values()).backward()
        stats = detection_loss(det).stats
        ok = int(stats.num_updates) == 1 and bool(torch.isfinite(stats.neg_grad).all())
        rows.append({"check": f"ddp detection ({backend})", "ok": ok,
                     "value": f"updates={int(stats.num_updates)}",
                     "detail": "tiny Faster R-CNN + Sigmoid-EQL, one step under DDP"})
    finally:
        dist.destroy_process_group()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, help="write table.md and results.json here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or with --device cpu "
              "for the CPU smoke run", file=sys.stderr)
        return 2
    header = (f"device={args.device} "
              f"({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}) "
              f"torch={torch.__version__} eqlosses={eqlosses.__version__}"
              f"{' quick' if args.quick else ''}")
    print(header, flush=True)
    rows: List[Row] = []
    start = time.perf_counter()
    for name, check in (("speed", lambda: check_speed(args.device, args.quick, args.repeats)),
                        ("amp", lambda: check_amp(args.device, args.quick)),
                        ("no-sync", lambda: check_no_sync(args.device)),
                        ("ddp", lambda: check_ddp(args.device))):
        t0 = time.perf_counter()
        try:
            new = check()
        except Exception as err:  # noqa: BLE001 - one failed check must not hide the others
            traceback.print_exc()
            new = [{"check": name, "ok": False, "value": "error", "detail": repr(err)}]
        for row in new:
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['check']}: {row['value']}", flush=True)
        print(f"   ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
        rows += new
    lines = [header, "", "| check | result | value | what |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {'ok' if r['ok'] else 'FAIL'} | {r['value']} | {r['detail']} |"
              for r in rows]
    lines.append(f"\n{sum(r['ok'] for r in rows)}/{len(rows)} checks ok in "
                 f"{time.perf_counter() - start:.0f} s")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(table + "\n")
        (args.out / "results.json").write_text(json.dumps({"header": header, "rows": rows},
                                                          indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
