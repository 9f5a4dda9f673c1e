"""The benchmark script runs end to end (tiny sizes); timings are not asserted here."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_losses.py"


def benchmark_module(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module."""
    import importlib

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.mark.slow
def test_benchmark_quick_run(tmp_path):
    out = tmp_path / "table.md"
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeats", "2",
                          "--no-memory", "--out", str(out)],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 7  # every case, the compiled and the fused ones included
    for row in rows:
        ratios = [float(r) for r in re.findall(r"\| ([0-9.]+)x (?=\|)", row)]
        assert len(ratios) == 2 and min(ratios) > 0  # median of pairs, best-of


@pytest.mark.slow
def test_benchmark_breakdown_builds_softmax_eql_up_stage_by_stage(tmp_path):
    out = tmp_path / "breakdown.md"
    res = subprocess.run([sys.executable, str(SCRIPT), "--breakdown", "--quick", "--repeats", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    rows = [line.split(" | ") for line in out.read_text().splitlines()[2:]]
    assert [r[0][2:] for r in rows][0] == "cross_entropy (baseline)" and len(rows) == 5
    ops = [int(r[1]) for r in rows]
    # each stage adds operations to the one before; the unvalidated loss masks, so it has more
    assert ops[0] < ops[1] < ops[2] < ops[3] < ops[4]
    assert rows[0][4] == "1.00x |" and all(float(r[2]) > 0 for r in rows)


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


@pytest.mark.slow
def test_beyond_det_chooses_on_dev_and_reads_the_test_canvases_for_final_settings_only(tmp_path):
    """benchmarks/beyond_det.py on a tiny benchmark, 1 epoch: runs are evaluated on the
    development canvases; `report` evaluates the FINAL settings' checkpoints on the
    validation (test) canvases once and writes the three tables."""
    script = SCRIPT.parent / "beyond_det.py"
    small = ["--small", "--epochs", "1", "--set", "model.min_size=64", "--set",
             "model.max_size=64", "--set", "data.batch_size=8"]
    res = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "train",
                          "--tags", "bce", "eqlv2_a0", *small],
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "dev AP" in res.stdout
    assert "eval_split: dev" in (tmp_path / "runs" / "bce-s0" / "config.yaml").read_text()
    res = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "report"],
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    dev = (tmp_path / "dev_table.md").read_text()
    assert "| bce: BCE | 0 |" in dev and "| eqlv2_a0: Sigmoid-EQL, alpha 0" in dev
    test = (tmp_path / "table.md").read_text()
    assert "| bce: BCE | 0 |" in test and "eqlv2_a0" not in test  # not a FINAL setting
    assert (tmp_path / "runs" / "bce-s0" / "test_metrics.json").is_file()
    assert not (tmp_path / "runs" / "eqlv2_a0-s0" / "test_metrics.json").exists()
    assert "| eqlv2_a0 | 0 |" in (tmp_path / "ratios.md").read_text()


def test_gpu_check_leaves_the_cpu_only_cases_out_on_a_gpu(monkeypatch):
    """The fused CPU kernel's case would refuse CUDA: gpu_check's speed check skips it
    there (and keeps it on the CPU)."""
    bench_losses, gpu_check = benchmark_module("bench_losses"), benchmark_module("gpu_check")
    timed = []
    monkeypatch.setattr(bench_losses, "time_case",
                        lambda name, *args: timed.append(name) or (1.0, 1.0, 1.0, 1.0))
    gpu_check.check_speed("cuda", True, 1)
    assert timed and "softmax_eql_cls_fused" not in timed
    assert set(timed) | bench_losses.CPU_ONLY == set(bench_losses.CASES)
    timed.clear()
    gpu_check.check_speed("cpu", True, 1)
    assert set(timed) == set(bench_losses.CASES)
    with pytest.raises(ValueError, match="CPU-only"):
        bench_losses.CASES["softmax_eql_cls_fused"][1]("cuda", True)


@pytest.mark.slow
def test_beyond_cls_screening_reads_validation_only_and_lag_reads_the_margins(tmp_path,
                                                                              monkeypatch):
    """benchmarks/beyond_cls.py on 1-epoch runs of real Fashion-MNIST-LT: `paired --splits
    validation` (a setting being screened) leaves the test set unread; `paired` reads it once
    per run; `posthoc` reads the validation split only; `holdout` is refused until the test
    set has been read, then reports the pipeline's own test accuracies and, on 4,500 images
    per class outside training and validation, the McNemar standard error; `lag` finds
    balanced softmax's margins at exactly the log prior and the mass indicator's away from it."""
    import json

    import numpy as np
    import torch

    from eqlosses.data.idx import find_fashion_mnist
    from eqlosses.tasks.classification import build_data

    try:
        find_fashion_mnist(None)
    except FileNotFoundError:
        pytest.skip("the Fashion-MNIST IDX files are not installed")
    beyond_cls = benchmark_module("beyond_cls")
    monkeypatch.setattr(beyond_cls, "OUT", tmp_path)
    real = beyond_cls.config_for

    def small(tag, imbalance, seed, epochs=1):
        cfg = real(tag, imbalance, seed, epochs=1)
        cfg.data.n_max, cfg.data.val_per_class, cfg.model.width = 100, 20, 4
        return cfg

    monkeypatch.setattr(beyond_cls, "config_for", small)
    assert beyond_cls.main(["train", "--imbalance", "10", "--seeds", "0", "1",
                            "--tags", "bs", "mass"]) == 0
    runs = tmp_path / "runs"
    assert beyond_cls.main(["paired", "--tags", "mass", "bs", "--imbalance", "10",
                            "--splits", "validation"]) == 0
    assert not list(runs.glob("*/test_metrics.json"))
    # posthoc reads the validation split only; unshifted, it is the pipeline's own accuracy,
    # and a shift of 50 log n sends every image to the rarest class (a tenth of a balanced set)
    assert beyond_cls.main(["posthoc", "--imbalance", "10", "--tags", "bs", "--deltas",
                            "0", "50"]) == 0
    assert not list(runs.glob("*/test_metrics.json"))
    row = next(line for line in (tmp_path / "posthoc.md").read_text().splitlines()
               if line.startswith("| 10 | bs | 0,1 |")).split(" | ")
    val = [100 * beyond_cls.val_metrics(runs / f"r10-bs-s{s}")["top1"] for s in (0, 1)]
    assert float(row[4]) == pytest.approx(sum(val) / 2, abs=0.006)
    assert float(row[5].rstrip(" |")) == pytest.approx(10.0)
    # screen: validation only, each setting's paired difference from the first tag's
    assert beyond_cls.main(["screen", "--name", "t", "--imbalance", "10", "--seeds", "0", "1",
                            "--tags", "bs", "mass"]) == 0
    assert not list(runs.glob("*/test_metrics.json"))
    rows = [line.split(" | ") for line in (tmp_path / "screen_t.md").read_text().splitlines()
            if line.startswith("| 10 |")]
    assert [r[1].split(":")[0] for r in rows] == ["bs", "mass"] and rows[0][-1] == "- |"
    diff = [100 * (beyond_cls.val_metrics(runs / f"r10-mass-s{s}")["top1"]
                   - beyond_cls.val_metrics(runs / f"r10-bs-s{s}")["top1"]) for s in (0, 1)]
    assert float(rows[1][-1].split(" ± ")[0]) == pytest.approx(sum(diff) / 2, abs=0.006)
    table = (tmp_path / "paired_mass_bs.md").read_text()
    assert "--splits validation" in table and "| 10 | validation | 2 | overall |" in table
    assert "| test |" not in table
    # the extra held-out images are a second test set: refused while the test set is unread
    with pytest.raises(SystemExit, match="test set has not been read"):
        beyond_cls.main(["holdout", "--tags", "mass", "bs", "--imbalance", "10"])
    assert beyond_cls.main(["paired", "--tags", "mass", "bs", "--imbalance", "10"]) == 0
    assert len(list(runs.glob("*/test_metrics.json"))) == 4
    assert "| 10 | test | 2 | overall |" in (tmp_path / "paired_mass_bs.md").read_text()
    # holdout: on the test set the pipeline's own accuracies; on the held-out set 4,500
    # images per class, none of them a training or validation image
    assert beyond_cls.main(["holdout", "--tags", "mass", "bs", "--imbalance", "10"]) == 0
    rows = {(r[1], r[2], r[3]): r for r in (line.split(" | ") for line in
            (tmp_path / "holdout_mass_bs.md").read_text().splitlines()
            if line.startswith("| 10 |"))}
    for seed in (0, 1):
        row = rows[("test", str(seed), "overall")]
        for tag, col in (("mass", 4), ("bs", 5)):
            top1 = json.loads((runs / f"r10-{tag}-s{seed}" / "test_metrics.json").read_text())
            assert float(row[col]) == pytest.approx(100 * top1["top1"], abs=0.006)
        assert float(row[6]) == pytest.approx(float(row[4]) - float(row[5]), abs=0.011)
    held, keep, val, _, y = beyond_cls.holdout_indices(small("bs", 10, 0))
    # the evaluation se from the discordant pairs: b images only mass gets right, c only bs
    truth = torch.as_tensor(y[held])
    for seed in (0, 1):
        hit = {tag: torch.load(runs / f"r10-{tag}-s{seed}" / "holdout_pred.pt") == truth
               for tag in ("mass", "bs")}
        b = int((hit["mass"] & ~hit["bs"]).sum())
        c = int((hit["bs"] & ~hit["mass"]).sum())
        n = 45000
        se = 100 * ((b + c) / n ** 2 - (b - c) ** 2 / n ** 3) ** 0.5
        row = rows[("holdout", str(seed), "overall")]
        assert float(row[7].rstrip(" |")) == pytest.approx(se, abs=0.006)
        assert float(row[6]) == pytest.approx(100 * (b - c) / n, abs=0.006)
    assert np.bincount(y[held]).tolist() == [4500] * 10 and len(set(held)) == len(held)
    assert not set(held) & set(keep) and not set(held) & set(val)
    data = build_data(small("bs", 10, 0))  # the pipeline trains on keep, validates on val
    assert len(data.train) == len(keep) and len(data.val) == len(val)
    assert beyond_cls.main(["lag", "--imbalance", "10", "--tags", "bs", "mass",
                            "--steps", "1", "5"]) == 0
    rows = {line.split(" | ")[1]: line for line in (tmp_path / "lag.md").read_text()
            .splitlines() if line.startswith("| 10 |")}
    assert rows["bs"].count("0.000 (0.000-0.000)") == 2
    assert "0.000 (0.000-0.000)" not in rows["mass"]
    # --seeds restricts a diagnostic to the runs a committed table was made from
    assert beyond_cls.main(["lag", "--imbalance", "10", "--tags", "mass", "--steps", "1",
                            "--seeds", "1"]) == 0
    text = (tmp_path / "lag.md").read_text()
    assert "--seeds 1`" in text and "| 10 | mass | 1 |" in text


def test_beyond_cls_sampled_settings_train_on_the_square_root_stream():
    """The `_sqrt` settings switch the pipeline's sampler; the others keep instance sampling,
    and the label-free analogue re-weights rows instead (no sampler, no counts)."""
    beyond_cls = benchmark_module("beyond_cls")
    assert [beyond_cls.config_for(tag, 100, 0).data.sampler
            for tag in ("bs", "bs_sqrt", "bs_t05_sqrt", "mass_rec1_sqrt", "mass_rec1_bal05")
            ] == ["instance", "sqrt", "sqrt", "sqrt", "instance"]
    assert beyond_cls.config_for("mass_rec1_bal05", 100, 0).loss.kwargs["balance"] == 0.5


def test_beyond_cls_given_start_begins_at_the_class_prior_and_leaves_the_pipeline_as_it_was():
    """The diagnostic `seeded_mass`: inside it the mass loss starts with balanced softmax's
    margins (log of the class frequencies, up to a constant) and the weight of K updates
    (K(K+1)/2 with recency 1); outside it the pipeline builds the label-free loss at zero."""
    import torch

    from eqlosses.tasks import classification

    beyond_cls = benchmark_module("beyond_cls")
    cfg = beyond_cls.config_for("mass_rec1_given100", 10, 0)
    counts = torch.tensor([1000.0, 600, 360, 215, 130, 77, 46, 28, 16, 10])
    real = classification.build_criterion
    with beyond_cls.seeded_mass(100):
        seeded = classification.build_criterion(cfg.loss, 10, counts)
    assert classification.build_criterion is real
    assert float(seeded.mass.sum()) == pytest.approx(100 * 101 / 2)
    margins = seeded.adjustment() - seeded.adjustment()[0]
    torch.testing.assert_close(margins, (counts / counts[0]).log().double())
    assert float(real(cfg.loss, 10, counts).mass.abs().sum()) == 0.0
