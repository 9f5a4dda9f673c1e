"""The benchmark script runs end to end (tiny sizes); timings are not asserted here."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_losses.py"


@pytest.mark.slow
def test_benchmark_quick_run(tmp_path):
    out = tmp_path / "table.md"
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeats", "2",
                          "--no-memory", "--out", str(out)],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 5  # every case, the compiled one included
    for row in rows:
        ratios = [float(r) for r in re.findall(r"\| ([0-9.]+)x (?=\|)", row)]
        assert len(ratios) == 2 and min(ratios) > 0  # median of pairs, best-of


@pytest.mark.slow
def test_benchmark_memory_measurement_runs():
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeats", "1",
                          "--cases", "softmax_eql_cls"], capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr
    extra = float(res.stdout.strip().splitlines()[-1].split("|")[-2])
    assert -50 < extra < 50  # in logits-sized units


@pytest.mark.slow
def test_gpu_check_runs_its_code_paths_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py is for a GPU; with --device cpu the same checks run (bf16
    autocast, counted host syncs, gloo instead of NCCL) and every one of them must pass."""
    script = SCRIPT.parent / "gpu_check.py"
    res = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick",
                          "--repeats", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and " | " in line[2:]]
    checks = {row.split(" | ")[0][2:]: row.split(" | ")[1] for row in rows[1:]}
    assert {"amp sigmoid_eql", "amp efl", "amp softmax_eql", "no-sync softmax_eql",
            "ddp classification (gloo)", "ddp detection (gloo)"} <= set(checks)
    assert set(checks.values()) == {"ok"}
