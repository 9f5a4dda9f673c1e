"""An optional fused CPU kernel for the softmax losses, built on demand.

The softmax losses of the package are cross-entropy over additively adjusted logits,
``CE(z + a, y)``, computed by one eager kernel of about 23 torch operations and several
passes over the logits (the adjustment, the softmax, the per-class sums, the gradient's
scaling in backward). On a CPU, where a small batch costs little compute, those passes and
the dispatch of each operation decide the speed. The fused kernel does the same work in one
pass over the logits: per row, the maximum, the exponentials and their sum, the loss
``log s + (m - z~_t)``, the gradient ``scale * (softmax(z~) - y)`` (already divided by the
number of rows for a mean, so that the backward pass only hands it over) and the per-class
statistics ``sum (1 - p_t)`` (positives) and ``sum p`` (negatives), with torch's vectorised
``exp``. Pixels (``[N, C, H, W]``, NCHW) go by blocks of as many pixels as a vector holds,
the pixels in the lanes and the channels in the loop, so that every load is contiguous.
Results equal the eager kernel's to rounding (tests/functional/test_fused.py).

It is C++ compiled with ``torch.utils.cpp_extension`` the first time it is enabled on a
machine (about 30 s on a 2-core machine; then cached under ``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``, and loaded in a fraction of a second), so it needs a
C++ compiler with OpenMP (g++ or clang), the Python headers and ninja (``pip install
eqlosses[fused]``); without them enabling it raises, and the eager kernel stays in use. It is
off unless enabled::

    import eqlosses.functional as EF
    EF.enable_fused_cpu_kernel()          # builds or loads it; raises if it cannot
    EF.fused_cpu_kernel_enabled()         # True
    EF.disable_fused_cpu_kernel()

or ``EQLOSSES_FUSED_CPU=1`` in the environment of ``eqlosses train``/``eval``/``demo``. Once
enabled it serves calls on CPU logits ``[N, C]`` or ``[N, C, *]`` of dtype float32 or float64,
contiguous, with class-index targets and a ``[C]`` adjustment (or none): Softmax-EQL and its
variants, balanced softmax, cross-entropy, on rows and on pixels. Everything else (half
precision, channels-last or other strided logits, probability targets, EQL's softmax form and
Seesaw with their per-row adjustments, CUDA, code being traced by ``torch.compile``) takes the
eager kernel as before. Measured in ``benchmarks/bench_losses.py`` (cases
``softmax_eql_cls_fused`` and ``softmax_eql_seg_fused``) and docs/speed.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch

__all__ = ["enable_fused_cpu_kernel", "disable_fused_cpu_kernel", "fused_cpu_kernel_enabled"]

_SOURCE = Path(__file__).with_name("csrc") / "adjusted_cross_entropy.cpp"
_kernel = None  # the loaded extension module while enabled
_built = None   # the loaded extension module, once built in this process

#: compiler flags for the vector instructions torch itself dispatches to on this CPU (the
#: at::vec headers pick their implementation from these macros)
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}


def _capability() -> str:
    get = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return get() if get is not None else "DEFAULT"


def _build(verbose: bool):
    from torch.utils import cpp_extension  # imported here: it is slow to import

    cap = _capability()
    flags = ["-O3"] + _CAPABILITY_FLAGS.get(cap, [])
    openmp = [] if sys.platform == "win32" else ["-fopenmp"]
    return cpp_extension.load(
        name=f"eqlosses_fused_cpu_{cap.lower()}", sources=[str(_SOURCE)],
        extra_cflags=flags + openmp, extra_ldflags=openmp, verbose=verbose)


def enable_fused_cpu_kernel(verbose: bool = False) -> None:
    """Build (first time on a machine) or load the fused kernel and use it from now on.

    Raises ``RuntimeError`` saying why when it cannot be built (no C++ compiler, no Python
    headers, no ninja, ...); the eager kernel then stays in use. ``verbose`` shows the compiler's output.
    """
    global _kernel, _built
    if _built is None:
        try:
            _built = _build(verbose)
        except Exception as exc:  # a compiler or loader error of any kind
            raise RuntimeError(
                "eqlosses could not build its fused CPU kernel (it needs a C++ compiler with "
                "OpenMP, e.g. g++, the Python development headers and ninja: pip install "
                "'eqlosses[fused]'); the eager kernel stays in use. The build said: "
                f"{type(exc).__name__}: {exc}") from exc
    _kernel = _built


def disable_fused_cpu_kernel() -> None:
    """Go back to the eager kernel (the built kernel stays loaded for a later enable)."""
    global _kernel
    _kernel = None


def fused_cpu_kernel_enabled() -> bool:
    """Whether eligible calls use the fused kernel."""
    return _kernel is not None


def enable_from_environment() -> bool:
    """Enable the kernel when ``EQLOSSES_FUSED_CPU`` is set to 1 (the command line's switch);
    return whether it is enabled. Any other value than 0, 1 or unset is refused."""
    value = os.environ.get("EQLOSSES_FUSED_CPU", "0").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"EQLOSSES_FUSED_CPU must be 0 or 1, got {value!r}")
    if value == "1":
        enable_fused_cpu_kernel()
    return fused_cpu_kernel_enabled()


def kernel_for(logits: torch.Tensor, adjustment: Optional[torch.Tensor], return_grad: bool):
    """The fused kernel when it is enabled and serves this call, else None."""
    if _kernel is None or return_grad:
        return None
    if (logits.device.type != "cpu" or logits.dim() < 2
            or logits.dtype not in (torch.float32, torch.float64) or not logits.is_contiguous()
            or (adjustment is not None and adjustment.dim() != 1)
            or torch.compiler.is_compiling()):
        return None
    return _kernel
