"""Speed and peak memory of the equalization losses against their plain baselines.

Each case times forward + backward (statistics update included) of an eqlosses loss and of the
plain PyTorch baseline it replaces, interleaved in one run on the same inputs, and prints the
median of the per-pair time ratios (pairs run back to back, in alternating order) and the
best-of ratio (fastest call over fastest call: the cost without interference, in which a
baseline's page faults or a busy neighbour count for nothing). Peak memory is measured per function in a fresh subprocess (CPU: the growth
of the process's peak resident set over the call, Linux only; CUDA: ``torch.cuda.max_memory_allocated``) and reported as
the extra peak over the baseline in units of one logits-sized tensor.

    python benchmarks/bench_losses.py                  # CPU, all cases, writes a markdown table
    python benchmarks/bench_losses.py --device cuda    # the same on a GPU
    python benchmarks/bench_losses.py --quick          # small sizes, under a minute (smoke test)
    python benchmarks/bench_losses.py --breakdown      # where Softmax-EQL's time goes

``--breakdown`` times, round-robin in one run on the same inputs, ``cross_entropy`` and
Softmax-EQL built up in stages (the kernel alone, with its per-class sums, the whole loss with
and without validation), each with its forward + backward, and prints for each stage the
fastest and the median call and the number of aten operations it dispatches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

import eqlosses


def plain_focal(logits, onehot, normalizer, gamma=2.0, alpha=0.25):
    """torchvision.ops.sigmoid_focal_loss's formula, written out (torchvision is optional)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    loss = ce * ((1 - p_t) ** gamma)
    alpha_t = alpha * onehot + (1 - alpha) * (1 - onehot)
    return (alpha_t * loss).sum() / normalizer


# name -> (description, builder(device, quick) -> (ours, baseline, logits))
CASES: Dict[str, Tuple[str, Callable]] = {}
#: cases that run on the CPU only (left out of the default selection on other devices)
CPU_ONLY: set = set()


def case(name, description):
    def register(builder):
        CASES[name] = (description, builder)
        return builder
    return register


def _long_tail_targets(n, c, device, background=0.0):
    """Targets with a long-tailed class profile (class k with probability ~ (k+1)^-1.5)."""
    g = torch.Generator().manual_seed(0)
    w = torch.arange(1, c + 1, dtype=torch.float64) ** -1.5
    t = torch.multinomial(w, n, replacement=True, generator=g)
    if background:
        t[torch.rand(n, generator=g) < background] = c
    return t.to(device)


@case("sigmoid_eql", "SigmoidEQLLoss vs BCE-with-logits (one-hot built from indices), N=8192 RoIs, C=1203")
def _sigmoid_eql(device, quick):
    n, c = (1024, 203) if quick else (8192, 1203)
    logits = torch.randn(n, c + 1, device=device, requires_grad=True)
    t = _long_tail_targets(n, c, device, background=0.25)
    crit = eqlosses.SigmoidEQLLoss(c).to(device)
    ours = lambda: crit(logits, t).backward()  # noqa: E731
    base = lambda: F.binary_cross_entropy_with_logits(  # noqa: E731
        logits, F.one_hot(t, c + 1).to(logits.dtype)).backward()
    return ours, base, logits


@case("efl", "EqualizedFocalLoss vs a plain sigmoid focal loss, N=20000 anchors, C=1203")
def _efl(device, quick):
    n, c = (2000, 203) if quick else (20000, 1203)
    logits = torch.randn(n, c, device=device, requires_grad=True)
    t = _long_tail_targets(n, c, device, background=0.9)
    crit = eqlosses.EqualizedFocalLoss(c).to(device)

    def base():
        onehot = F.one_hot(t, c + 1)[:, :c].to(logits.dtype)
        plain_focal(logits, onehot, (t < c).sum().clamp(min=1)).backward()

    return (lambda: crit(logits, t).backward()), base, logits


@case("softmax_eql_cls", "SoftmaxEQLLoss vs cross_entropy, N=512, C=1000")
def _softmax_cls(device, quick):
    n, c = (128, 200) if quick else (512, 1000)
    logits = torch.randn(n, c, device=device, requires_grad=True)
    t = _long_tail_targets(n, c, device)
    crit = eqlosses.SoftmaxEQLLoss(c).to(device)
    return (lambda: crit(logits, t).backward()), (lambda: F.cross_entropy(logits, t).backward()), logits


@case("softmax_eql_cls_compiled", "SoftmaxEQLLoss compiled (validate=False, torch.compile "
      "fullgraph) vs cross_entropy, N=512, C=1000")
def _softmax_cls_compiled(device, quick):
    """The remedy for the per-call cost of ~50 eager operations (launch-bound on a GPU):
    the loss compiled into a few fused kernels; the baseline stays eager ``cross_entropy``.
    The compilation happens in the warm-up calls, outside the timing."""
    n, c = (128, 200) if quick else (512, 1000)
    logits = torch.randn(n, c, device=device, requires_grad=True)
    t = _long_tail_targets(n, c, device)
    crit = torch.compile(eqlosses.SoftmaxEQLLoss(c, validate=False).to(device), fullgraph=True)
    return (lambda: crit(logits, t).backward()), (lambda: F.cross_entropy(logits, t).backward()), logits


@case("softmax_eql_seg", "SoftmaxEQLLoss vs cross_entropy, segmentation B=2, C=150, 128x128")
def _softmax_seg(device, quick):
    b, c, h = (2, 150, 32) if quick else (2, 150, 128)
    logits = torch.randn(b, c, h, h, device=device, requires_grad=True)
    t = _long_tail_targets(b * h * h, c, device).view(b, h, h)
    t[:, :4] = 255  # a few ignored pixels, as in real masks
    crit = eqlosses.SoftmaxEQLLoss(c, ignore_index=255).to(device)
    return ((lambda: crit(logits, t).backward()),
            (lambda: F.cross_entropy(logits, t, ignore_index=255).backward()), logits)


def _cpu_only(name, device):
    if not device.startswith("cpu"):
        raise ValueError(f"the {name} case is CPU-only, not for {device}")


def _with_fused_kernel(ours):
    """``ours`` with the fused CPU kernel (built or loaded here, outside the timing; about 30 s
    the first time on a machine), enabled only inside the timed call so that the other cases
    keep the eager kernel."""
    from eqlosses.functional import fused

    fused.enable_fused_cpu_kernel()
    fused.disable_fused_cpu_kernel()

    def call():
        fused.enable_fused_cpu_kernel()
        try:
            ours()
        finally:
            fused.disable_fused_cpu_kernel()

    return call


def _fused_case(name, what, builder):
    """Register ``builder``'s case again, with the fused CPU kernel (CPU only)."""
    @case(name, "SoftmaxEQLLoss with the fused CPU kernel "
          f"(eqlosses.functional.enable_fused_cpu_kernel) vs cross_entropy, {what}")
    def build(device, quick):
        _cpu_only(name, device)
        ours, base, logits = builder(device, quick)
        return _with_fused_kernel(ours), base, logits

    CPU_ONLY.add(name)


_fused_case("softmax_eql_cls_fused", "N=512, C=1000", _softmax_cls)
_fused_case("softmax_eql_seg_fused", "segmentation B=2, C=150, 128x128", _softmax_seg)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_case(name, device, quick, repeats, clock=time.perf_counter):
    _, builder = CASES[name]
    ours, base, logits = builder(device, quick)
    times = {"ours": [], "base": []}
    ratios = []
    for fn in (ours, base, ours, base):  # warm-up
        fn()
        logits.grad = None
    for i in range(repeats):
        # Alternate the order within each pair, and take the median of the per-pair ratios:
        # shared machines drift, and a ratio of adjacent runs cancels most of the drift.
        pair = (("ours", ours), ("base", base)) if i % 2 == 0 else (("base", base), ("ours", ours))
        for key, fn in pair:
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            times[key].append(clock() - start)
            logits.grad = None
        ratios.append(times["ours"][-1] / times["base"][-1])
    best = min(times["ours"]) / min(times["base"])
    return (statistics.median(times["ours"]), statistics.median(times["base"]),
            statistics.median(ratios), best)


def _breakdown_stages(device, quick):
    """name -> forward + backward of one stage of Softmax-EQL (and the baseline), and the
    logits whose gradient each call fills."""
    from eqlosses.functional.softmax import _adjusted_cross_entropy

    n, c = (128, 200) if quick else (512, 1000)
    logits = torch.randn(n, c, device=device, requires_grad=True)
    t = _long_tail_targets(n, c, device)
    crit = eqlosses.SoftmaxEQLLoss(c).to(device)
    lax = eqlosses.SoftmaxEQLLoss(c, validate=False).to(device)
    for _ in range(3):  # statistics as in training: classes not yet seen sit at the eps clamp
        crit(logits, t)
        lax(logits, t)
    a = crit.class_terms()["margin"].to(logits.dtype)

    def kernel(want_stats):
        return lambda: _adjusted_cross_entropy(logits, t, a, -100, "mean", want_stats,
                                               all_valid=True).loss.backward()

    stages = {
        "cross_entropy (baseline)": lambda: F.cross_entropy(logits, t).backward(),
        "kernel: adjusted CE, closed-form gradient": kernel(False),
        "+ per-class gradient sums": kernel(True),
        "whole loss (+ checks, adjustment, statistics update)": lambda: crit(logits, t).backward(),
        "whole loss, validate=False": lambda: lax(logits, t).backward(),
    }
    return stages, logits


def _count_ops(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def breakdown(device, quick, repeats, clock=time.perf_counter):
    stages, logits = _breakdown_stages(device, quick)
    ops = {}
    for name, fn in stages.items():  # warm-up, and the operation count
        fn()
        logits.grad = None
        ops[name] = _count_ops(fn)
        logits.grad = None
    times = {name: [] for name in stages}
    order = list(stages)
    for i in range(repeats):
        for name in order[i % len(order):] + order[:i % len(order)]:  # rotate the order
            _sync(device)
            start = clock()
            stages[name]()
            _sync(device)
            times[name].append(clock() - start)
            logits.grad = None
    base = order[0]
    rows = ["| stage | aten ops | fastest (ms) | median (ms) | fastest / baseline's |",
            "|---|---|---|---|---|"]
    for name in order:
        best = min(times[name])
        rows.append(f"| {name} | {ops[name]} | {best * 1e3:.3f} | "
                    f"{statistics.median(times[name]) * 1e3:.3f} | "
                    f"{best / min(times[base]):.2f}x |")
    return "\n".join(rows)


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(name, which, device, quick):
    """Runs in a subprocess: extra peak memory (bytes) of one call, and the logits' size."""
    _, builder = CASES[name]
    ours, base, logits = builder(device, quick)
    fn = ours if which == "ours" else base
    logits.grad = torch.zeros_like(logits)  # allocate the gradient up front for both
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        fn()  # warm up once (lazy initialisation), then measure a second call
        logits.grad = torch.zeros_like(logits)
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM)
        fn()
        extra = (_status_kib("VmHWM") - before) * 1024
    print(json.dumps({"extra": extra, "logits": logits.numel() * logits.element_size()}))


def peak_case(name, device, quick):
    out = {}
    for which in ("ours", "base"):
        cmd = [sys.executable, __file__, "--peak-child", name, which, "--device", device]
        if quick:
            cmd.append("--quick")
        # A fixed mmap threshold makes glibc map every large tensor freshly and unmap it on
        # free, so the peak resident set follows the live tensors (no reuse of the heap).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[which] = json.loads(res.stdout.strip().splitlines()[-1])
    logits_bytes = out["ours"]["logits"]
    return (out["ours"]["extra"] - out["base"]["extra"]) / logits_bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--cases", nargs="*", default=None, choices=list(CASES),
                        help="default: every case that runs on --device")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared VM)")
    parser.add_argument("--out", type=Path, default=None, help="write the table (markdown)")
    parser.add_argument("--breakdown", action="store_true",
                        help="where Softmax-EQL's time goes, stage by stage (N=512, C=1000)")
    parser.add_argument("--peak-child", nargs=2, metavar=("CASE", "WHICH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cases is None:
        args.cases = [name for name in CASES
                      if args.device.startswith("cpu") or name not in CPU_ONLY]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        _peak_child(*args.peak_child, args.device, args.quick)
        return 0
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} clock={args.clock}{' quick' if args.quick else ''}")
    if args.breakdown:
        table = breakdown(args.device, args.quick, args.repeats, clock)
        print(table)
        if args.out:
            args.out.write_text(table + "\n")
        return 0
    rows = []
    header = ("| case | eqlosses (ms) | baseline (ms) | time ratio | best-of ratio "
              "| extra peak memory (logits) |")
    for name in args.cases:
        ours, base, ratio, best = time_case(name, args.device, args.quick, args.repeats, clock)
        mem = "n/a" if args.no_memory else f"{peak_case(name, args.device, args.quick):+.2f}"
        label = CASES[name][0] + (" (--quick: smaller sizes than named)" if args.quick else "")
        row = (f"| {label} | {ours * 1e3:.2f} | {base * 1e3:.2f} | "
               f"{ratio:.2f}x | {best:.2f}x | {mem} |")
        rows.append(row)
        print(row, flush=True)
    table = "\n".join([header, "|---|---|---|---|---|---|"] + rows)
    if args.out:
        args.out.write_text(table + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
