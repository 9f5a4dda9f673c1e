"""Beyond the paper (issue 13): gradient-driven Softmax-EQL variants vs cross-entropy, balanced
softmax and the paper's Softmax-EQL on Fashion-MNIST-LT, settings chosen on a validation split.

Protocol (the issue's): ``eqlosses train cls`` pipeline, n_max 1000, imbalance 100 (and 10),
100 epochs, SGD lr 0.05 cosine, batch 128, weight decay 5e-4, small_cnn width 16. Every run
is trained with ``data.val_per_class=500``: a balanced validation set of 500 images per class
drawn from the Fashion-MNIST *training* images that the long-tailed subset leaves out (the
training subset itself is unchanged), and its ``metrics.json`` holds the validation accuracy.
Settings are chosen on that (``val`` table). The test set (10,000 images) is read only for
the final settings (``FINAL``), once per run, from its checkpoint (``test_metrics.json``).

    # train (resumable: finished runs are reused; run two in parallel with disjoint --tags)
    python benchmarks/beyond_cls.py train --imbalance 100 --seeds 0 --tags bs eql_t1
    # tables and plots (evaluates the FINAL settings' checkpoints on the test set once);
    # --docs also writes the tables into README.md and docs/beyond-the-paper.md
    python benchmarks/beyond_cls.py report --docs
    # two settings seed by seed (validation and test), and their paired differences;
    # --splits validation while a setting is still being screened
    python benchmarks/beyond_cls.py paired --tags mass bs
    # how far the margins are from balanced softmax's over training (from stats.bin)
    python benchmarks/beyond_cls.py lag --imbalance 10 --tags mass mass_rec1
    # is a gap in the decision rule? validation accuracy with the logits shifted after training
    python benchmarks/beyond_cls.py posthoc --tags bs mass mass_rec1
    # several settings on the same seeds, validation only, paired against the first
    python benchmarks/beyond_cls.py screen --name sampling --tags bs bs_sqrt mass_rec1
    # two final settings on the test set and on the 45,000 training images neither in the
    # subset nor in validation (a larger second test set), with the evaluation noise
    python benchmarks/beyond_cls.py holdout --tags mass_rec1_bal05 bs

The runs are not committed: ``report`` keeps the committed rows (and plots) of the settings
whose runs this checkout lacks, and recomputes the others.

Outputs in ``benchmarks/results/beyond_cls``: ``table.md`` (test, final settings),
``val_table.md`` (every screened setting), ``per_class.md``, ``indicator_*.png``,
``paired_*.md``, ``screen_*.md``, ``holdout_*.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from eqlosses.config import load_config
from eqlosses.tasks.classification import evaluate_checkpoint, run_dir_for, train

OUT = Path("benchmarks/results/beyond_cls")

#: setting tag -> (loss name, loss arguments, description)
SETTINGS: Dict[str, tuple] = {
    "ce": ("ce", {}, "cross-entropy"),
    "bs": ("balanced_softmax", {}, "balanced softmax (class counts given)"),
    "eql_t1": ("softmax_eql", {"tau": 1.0}, "paper Softmax-EQL, tau 1"),
    "eql_t2": ("softmax_eql", {"tau": 2.0}, "paper Softmax-EQL, tau 2"),
    "eql_neg": ("softmax_eql", {"indicator": "neg"}, "paper Softmax-EQL, 'neg' indicator"),
    "raw_pos": ("softmax_eql_x", {"source": "raw"},
                "'pos' of the unadjusted logits, tau 1"),
    "raw_pos_t15": ("softmax_eql_x", {"source": "raw", "tau": 1.5},
                    "'pos' of the unadjusted logits, tau 1.5"),
    "raw_ratio": ("softmax_eql_x", {"source": "raw", "indicator": "ratio"},
                  "pos/neg ratio of the unadjusted logits, tau 1"),
    "raw_pos_ema": ("softmax_eql_x", {"source": "raw", "decay": 0.99},
                    "'pos' of the unadjusted logits, decaying average (0.99/step)"),
    "pos_ema": ("softmax_eql_x", {"decay": 0.99},
                "paper 'pos', decaying average (0.99/step)"),
    "raw_pos_warm": ("softmax_eql_x", {"source": "raw", "tau_warmup": 400},
                     "'pos' of the unadjusted logits, tau ramped 0 -> 1 over 400 steps"),
    "mass": ("softmax_eql_x", {"indicator": "mass"},
             "predicted class mass sum_n softmax(z~)_nj (no labels), tau 1"),
    "mass_t12": ("softmax_eql_x", {"indicator": "mass", "tau": 1.2},
                 "predicted class mass, tau 1.2"),
    "mass_t15": ("softmax_eql_x", {"indicator": "mass", "tau": 1.5},
                 "predicted class mass, tau 1.5"),
    "mass_ema": ("softmax_eql_x", {"indicator": "mass", "decay": 0.99},
                 "predicted class mass, decaying average (0.99/step), tau 1"),
    "mass_rec1": ("softmax_eql_x", {"indicator": "mass", "recency": 1.0},
                  "predicted class mass, update t weighted by t (forgets the first steps), "
                  "tau 1"),
    "mass_rec1_t12": ("softmax_eql_x", {"indicator": "mass", "recency": 1.0, "tau": 1.2},
                      "predicted class mass, update t weighted by t, tau 1.2"),
    "bs_t12": ("balanced_softmax", {"tau": 1.2},
               "logit adjustment, tau 1.2 (class counts given)"),
    "mass_rec1_given100": ("softmax_eql_x", {"indicator": "mass", "recency": 1.0},
                           "diagnostic: mass_rec1 with M started at the class prior (given), "
                           "weighted as 100 updates"),
    "mass_g01": ("softmax_eql_x", {"indicator": "mass", "gamma": 0.1},
                 "predicted class mass, tau 1, logits scaled by (M_j / max M)^0.1"),
    "mass_g02": ("softmax_eql_x", {"indicator": "mass", "gamma": 0.2},
                 "predicted class mass, tau 1, logits scaled by (M_j / max M)^0.2"),
    "mass_g03": ("softmax_eql_x", {"indicator": "mass", "gamma": 0.3},
                 "predicted class mass, tau 1, logits scaled by (M_j / max M)^0.3"),
    # the same losses on a re-sampled stream (``data.sampler=sqrt``: class j drawn with
    # probability proportional to sqrt(n_j), so the stream's prior is sqrt(n_j) / sum_k sqrt(n_k),
    # not the dataset's n_j / N); balanced softmax is handed the dataset counts, as the pipeline
    # does by default, or (bs_t05_sqrt) the stream's prior: tau 0.5 on log n_j is log sqrt(n_j)
    "bs_sqrt": ("balanced_softmax", {}, "balanced softmax (dataset counts given), square-root "
                "sampling"),
    "bs_t05_sqrt": ("balanced_softmax", {"tau": 0.5}, "balanced softmax given the sampled "
                    "stream's prior (tau 0.5 on log n), square-root sampling"),
    "mass_rec1_sqrt": ("softmax_eql_x", {"indicator": "mass", "recency": 1.0},
                       "mass_rec1 (no counts), square-root sampling"),
    # the label-free analogue of bs_sqrt: rows weighted by the mass prior ** -0.5, which in
    # expectation is the square-root re-sampled stream, margins log M (the un-resampled prior)
    "mass_rec1_bal05": ("softmax_eql_x", {"indicator": "mass", "recency": 1.0, "balance": 0.5},
                        "mass_rec1, rows weighted by the mass prior ** -0.5 (no counts)"),
}

#: settings trained on a re-sampled stream: tag -> ``data.sampler`` (the others: instance)
SAMPLER: Dict[str, str] = {"bs_sqrt": "sqrt", "bs_t05_sqrt": "sqrt", "mass_rec1_sqrt": "sqrt"}

#: diagnostic settings that are given the class counts for their first updates only: tag ->
#: K, the mass buffer starting at the class prior with the weight of K updates (sum_t<=K
#: t**recency), as if the first K steps had predicted the prior exactly (``seeded_mass``)
GIVEN_START: Dict[str, int] = {"mass_rec1_given100": 100}

#: the settings evaluated on the test set (chosen on the validation table; see the docs page;
#: mass_rec1 and mass_rec1_bal05, added later, are in the paired tables, not yet in the
#: committed table.md)
FINAL: List[str] = ["ce", "bs", "eql_t2", "raw_pos_t15", "mass", "mass_rec1"]

COLUMNS = (("overall", "top1"), ("many", "many"), ("medium", "medium"), ("few", "few"))
EPOCHS = 100
DELTAS = [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3]  # posthoc: logit shifts, in units of log n


def config_for(tag: str, imbalance: float, seed: int, epochs: int = EPOCHS):
    loss, kwargs, _ = SETTINGS[tag]
    overrides = [f"output_dir={OUT / 'runs'}", f"name=r{imbalance:g}-{tag}-s{seed}",
                 "data.name=fashion_mnist", f"data.imbalance={imbalance}", "data.n_max=1000",
                 "data.val_per_class=500", "model.width=16", f"loss.name={loss}",
                 f"seed={seed}", f"optim.epochs={epochs}", f"eval.every_epochs={epochs}",
                 "progress=false", "tensorboard=false"]
    overrides += [f"loss.{k}={v}" for k, v in kwargs.items()]
    if tag in SAMPLER:
        overrides.append(f"data.sampler={SAMPLER[tag]}")
    return load_config(None, overrides)


@contextlib.contextmanager
def seeded_mass(updates: int):
    """While active, a classification run's mass indicator starts at the class prior of its
    training labels with the weight of ``updates`` updates instead of at zero (a diagnostic:
    how much of a gap the label-free estimate's first steps explain)."""
    from eqlosses.tasks import classification

    real = classification.build_criterion

    def build(loss_cfg, num_classes, train_counts, generator=None):
        criterion = real(loss_cfg, num_classes, train_counts, generator)
        weight = sum(t ** criterion.recency for t in range(1, updates + 1))
        counts = train_counts.to(criterion.mass)
        criterion.mass.copy_(counts / counts.sum() * weight)
        return criterion

    classification.build_criterion = build
    try:
        yield
    finally:
        classification.build_criterion = real


def _value(metrics: Dict[str, Any], key: str) -> float:
    return 100 * (metrics["top1"] if key == "top1" else metrics["groups"][key])


def _cell(values: List[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def cmd_train(args) -> int:
    torch.set_num_threads(1)
    for imbalance in args.imbalance:
        for tag in args.tags:
            for seed in args.seeds:
                cfg = config_for(tag, imbalance, seed)
                done = run_dir_for(cfg) / "metrics.json"
                if done.is_file():
                    continue
                start = time.time()
                with (seeded_mass(GIVEN_START[tag]) if tag in GIVEN_START
                      else contextlib.nullcontext()):
                    metrics = train(cfg, overwrite=True)["metrics"]
                print(f"r{imbalance:g} {tag} s{seed}: val top1 {100 * metrics['top1']:.2f} "
                      f"few {100 * metrics['groups']['few']:.1f} ({time.time() - start:.0f} s)",
                      flush=True)
    return 0


def _runs(imbalance: float, tag: str) -> Dict[int, Path]:
    """The finished runs of a setting at a ratio, by seed."""
    first = run_dir_for(config_for(tag, imbalance, 0))
    prefix = first.name[:-1]  # the name ends in "s0"
    found = {}
    for run in first.parent.glob(prefix + "*"):
        seed = run.name[len(prefix):]
        if seed.isdigit() and (run / "metrics.json").is_file():
            found[int(seed)] = run
    return dict(sorted(found.items()))


def _chosen(runs: Dict[int, Path], seeds) -> Dict[int, Path]:
    """``runs`` restricted to ``seeds`` (all of them when ``seeds`` is None)."""
    return runs if seeds is None else {s: r for s, r in runs.items() if s in seeds}


def _seeds_flag(seeds) -> str:
    """The ``--seeds`` part of a table's command (empty when every run was used)."""
    return "" if seeds is None else " --seeds " + " ".join(map(str, seeds))


def val_metrics(run: Path) -> Dict[str, Any]:
    """The run's validation metrics (what training wrote to ``metrics.json``)."""
    return json.loads((run / "metrics.json").read_text())["metrics"]


def test_metrics(run: Path) -> Dict[str, Any]:
    """The run's test-set metrics, computed once from its checkpoint and cached."""
    cached = run / "test_metrics.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    metrics, _ = evaluate_checkpoint(run / "checkpoint.pt", "cpu", ["data.val_per_class=0"])
    cached.write_text(json.dumps(metrics, indent=1))
    return metrics


def stacked(dataset) -> tuple:
    """``(images [N, ...], labels [N])`` of an in-memory evaluation set, every item as the
    pipeline's dataset gives it (normalised)."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return images, labels


def write_table(name: str, lines: List[str]) -> int:
    """Write ``lines`` to ``OUT / name`` and print them; 0, the subcommand's exit status."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _paired(diffs: List[float]) -> tuple:
    """Paired differences (at least two) as ("mean ± std", "k of n"), k the seeds at or
    above."""
    return (f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}",
            f"{sum(d >= 0 for d in diffs)} of {len(diffs)}")


def _table(rows, header: str) -> List[str]:
    lines = [header, "", "| imbalance | setting | seeds | overall | many | medium | few |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if isinstance(row, str):  # kept from the committed table
            lines.append(row)
            continue
        imbalance, tag, seeds, runs = row
        cells = [_cell([_value(m, key) for m in runs]) for _, key in COLUMNS]
        lines.append(f"| {imbalance:g} | {tag}: {SETTINGS[tag][2]} | "
                     f"{','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return lines


def _committed_rows(name: str) -> Dict[tuple, str]:
    """The rows of a committed table in ``OUT``, keyed by (imbalance, setting tag), so that
    a report from a checkout that lacks some runs keeps their rows instead of dropping them
    (the runs themselves are not committed)."""
    path, rows = OUT / name, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) > 2 and cells[0].replace(".", "", 1).isdigit():
                rows[(float(cells[0]), cells[1].split(":")[0])] = line
    return rows


def cmd_report(args) -> int:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    protocol = ("Fashion-MNIST-LT (n_max 1000), small_cnn width 16, 100 epochs, SGD lr 0.05 "
                "cosine, batch 128, weight decay 5e-4; accuracy (%), mean ± std over seeds; "
                "many > 100, medium 20-100, few < 20 training images.")
    val_rows, test_rows, per_class = [], [], []
    kept = {name: _committed_rows(name) for name in ("val_table.md", "table.md", "per_class.md")}
    for imbalance in args.imbalance:
        for tag in SETTINGS:
            runs = _runs(imbalance, tag)
            if not runs:
                key = (imbalance, tag)
                for rows, name in ((val_rows, "val_table.md"), (test_rows, "table.md"),
                                   (per_class, "per_class.md")):
                    if key in kept[name]:
                        rows.append(kept[name][key])
                continue
            metrics = [val_metrics(r) for r in runs.values()]
            val_rows.append((imbalance, tag, list(runs), metrics))
            if tag in FINAL:
                tests = [test_metrics(r) for r in runs.values()]
                test_rows.append((imbalance, tag, list(runs), tests))
                pc = [[100 * a for a in m["per_class_accuracy"]] for m in tests]
                mean = [statistics.mean(col) for col in zip(*pc)]
                per_class.append((imbalance, tag, mean))
    val = _table(val_rows, "Validation split (500 images per class from the training images "
                           "the long-tailed subset leaves out; settings were chosen on this). "
                 + protocol)
    test = _table(test_rows, "Test set (10,000 images), final settings only, each run "
                             "evaluated once. " + protocol)
    lines = ["Per-class test accuracy (%), mean over the seeds of the test table; classes "
             "0..9 in decreasing training count.", "",
             "| imbalance | setting | " + " | ".join(str(k) for k in range(10)) + " |",
             "|---|---|" + "---|" * 10]
    for row in per_class:
        if isinstance(row, str):
            lines.append(row)
            continue
        imbalance, tag, mean = row
        lines.append(f"| {imbalance:g} | {tag} | " + " | ".join(f"{v:.1f}" for v in mean) + " |")
    (OUT / "val_table.md").write_text("\n".join(val) + "\n")
    (OUT / "table.md").write_text("\n".join(test) + "\n")
    (OUT / "per_class.md").write_text("\n".join(lines) + "\n")
    if args.docs:
        blocks = {"val": val[2:], "test": test[2:], "perclass": lines[2:]}
        for doc, tags in ((Path("README.md"), ["test"]),
                          (Path("docs/beyond-the-paper.md"), ["val", "test", "perclass"])):
            for tag in tags:
                replace_block(doc, f"beyond:{tag}", blocks[tag])
    print("\n".join(val + [""] + test + [""] + lines))
    plot_indicators(args)
    return 0


def cmd_paired(args) -> int:
    """Two settings seed by seed, on the validation split and (unless ``--splits
    validation``: a setting being screened must not see the test set) the test set, and their
    paired differences (``paired_A_B.md``)."""
    torch.set_num_threads(1)
    a, b = args.tags
    rows, summary = [], []
    for imbalance in args.imbalance:
        runs_a, runs_b = _runs(imbalance, a), _runs(imbalance, b)
        for seed in sorted(set(runs_a) & set(runs_b)):
            for split in args.splits:
                read = test_metrics if split == "test" else val_metrics
                ma, mb = read(runs_a[seed]), read(runs_b[seed])
                # the tail group: few-shot where there is one (imbalance 100), else medium
                tail = "few" if not math.isnan(_value(ma, "few")) else "medium"
                for group, key in (("overall", "top1"), (tail, tail)):
                    va, vb = _value(ma, key), _value(mb, key)
                    rows.append(f"| {imbalance:g} | {split} | {seed} | {group} | {va:.2f} | "
                                f"{vb:.2f} | {va - vb:+.2f} |")
                    summary.append((imbalance, split, group, va, vb))
    command = f"python benchmarks/beyond_cls.py paired --tags {a} {b}"
    if tuple(args.splits) != ("validation", "test"):
        command += " --splits " + " ".join(args.splits)
    if args.imbalance != [100.0, 10.0]:
        command += " --imbalance " + " ".join(f"{i:g}" for i in args.imbalance)
    lines = [f"`{a}` against `{b}`, paired by training seed; accuracy (%); difference = "
             f"{a} - {b}. `{command}`", "",
             f"| imbalance | split | seeds | group | {a} | {b} | difference, mean ± std | "
             f"seeds with {a} >= {b} |", "|---|---|---|---|---|---|---|---|"]
    for imbalance in args.imbalance:
        for split in args.splits:
            for group in ("overall", "few", "medium"):
                got = [(va, vb) for i, sp, g, va, vb in summary
                       if (i, sp, g) == (imbalance, split, group)]
                if len(got) < 2:
                    continue
                d = [va - vb for va, vb in got]
                lines.append(
                    f"| {imbalance:g} | {split} | {len(got)} | {group} | "
                    f"{statistics.mean(v for v, _ in got):.2f} | "
                    f"{statistics.mean(v for _, v in got):.2f} | " + " | ".join(_paired(d))
                    + " |")
    lines += ["", "Seed by seed:", "",
              f"| imbalance | split | seed | group | {a} | {b} | difference |",
              "|---|---|---|---|---|---|---|"] + rows
    return write_table(f"paired_{a}_{b}.md", lines)


def margins_against_prior(run: Path):
    """A run's logged steps, indicator relative to the class counts ``(I_j / I_head) /
    (n_j / n_head)`` (1: the class prior; None for a loss that logs no indicator) and margin
    in force minus balanced softmax's, ``(a_j - a_head) - log(n_j / n_head)`` in nats (0:
    balanced softmax's margin), each ``[steps, C]``, read off its ``stats.bin`` and the
    ``train_counts`` of its ``metrics.json``."""
    import numpy as np

    from eqlosses.monitor.recorder import read_stats

    counts = np.asarray(json.loads((run / "metrics.json").read_text())["train_counts"],
                        dtype=float)
    h = read_stats(run, fields=["terms"])
    margin = np.asarray(h.terms["margin"], dtype=float)
    prior = counts / counts[0]
    rel = None
    if "indicator" in h.terms:
        ind = np.maximum(np.asarray(h.terms["indicator"], dtype=float), 1e-12)
        rel = (ind / ind[:, :1]) / prior
    return np.asarray(h.steps), rel, (margin - margin[:, :1]) - np.log(prior)


def cmd_lag(args) -> int:
    """For each setting, at the given training steps (``lag.md``): the largest distance over
    the classes between its margins and balanced softmax's, ``max_j |(a_j - a_head) - log(n_j /
    n_head)|`` in nats (0: the margins of balanced softmax), read off each run's ``stats.bin``
    (the nearest logged step), as mean and range over the seeds."""
    import numpy as np

    lines = ["Largest |margin - balanced softmax's| over the classes (nats), mean (min-max) "
             "over the seeds; `python benchmarks/beyond_cls.py lag --imbalance "
             + " ".join(f"{i:g}" for i in args.imbalance) + " --tags " + " ".join(args.tags)
             + " --steps " + " ".join(map(str, args.steps)) + _seeds_flag(args.seeds) + "`",
             "",
             "| imbalance | setting | seeds | " + " | ".join(f"step {s}" for s in args.steps)
             + " |", "|---|---|---|" + "---|" * len(args.steps)]
    for imbalance in args.imbalance:
        for tag in args.tags:
            runs = _chosen(_runs(imbalance, tag), args.seeds)
            if not runs:
                continue
            per_seed = []
            for run in runs.values():
                steps, _, extra = margins_against_prior(run)
                gap = np.abs(extra).max(axis=1)
                per_seed.append([gap[int(np.abs(steps - s).argmin())] for s in args.steps])
            cells = [f"{np.mean(col):.3f} ({min(col):.3f}-{max(col):.3f})"
                     for col in zip(*per_seed)]
            lines.append(f"| {imbalance:g} | {tag} | {','.join(map(str, sorted(runs)))} | "
                         + " | ".join(cells) + " |")
    return write_table("lag.md", lines)


def cmd_posthoc(args) -> int:
    """Whether the gap between two settings is in the decision rule (``posthoc.md``; the
    validation split only): each run's validation accuracy when its logits are shifted after
    training, ``argmax_j z_j - delta log n_j`` (``delta`` > 0 moves predictions towards the
    rare classes), and the slope of its last layer's bias on ``log n_j`` (the prior left in
    the model). The class counts are used to diagnose, not by any label-free loss."""
    import numpy as np

    from eqlosses.tasks.classification import build_data, build_job
    from eqlosses.tasks.engine import load_checkpoint

    torch.set_num_threads(1)
    deltas = args.deltas
    lines = ["Validation accuracy (%) with the logits shifted after training, argmax z_j - "
             "delta log n_j (delta > 0: towards the rare classes), mean over the seeds; bias "
             "slope: the last layer's bias regressed on log n_j, mean (min-max). "
             "`python benchmarks/beyond_cls.py posthoc --imbalance "
             + " ".join(f"{i:g}" for i in args.imbalance) + " --tags " + " ".join(args.tags)
             + ("" if deltas == DELTAS else " --deltas " + " ".join(f"{d:g}" for d in deltas))
             + _seeds_flag(args.seeds) + "`", "",
             "| imbalance | setting | seeds | bias slope | "
             + " | ".join(f"delta {d:+g}" for d in deltas) + " |",
             "|---|---|---|---|" + "---|" * len(deltas)]
    for imbalance in args.imbalance:
        images = None  # the validation split and counts: the same for every run of a ratio
        for tag in args.tags:
            runs = _chosen(_runs(imbalance, tag), args.seeds)
            if not runs:
                continue
            cfg = config_for(tag, imbalance, min(runs))  # the seed changes only the weights
            if images is None:
                data = build_data(cfg)
                images, labels = stacked(data.val)
                log_n = torch.bincount(torch.as_tensor(data.train_labels),
                                       minlength=data.num_classes).double().log()
            model = build_job(cfg, torch.device("cpu")).model
            accs, slopes = [], []
            for seed, run in sorted(runs.items()):
                model.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
                model.eval()
                with torch.no_grad():
                    logits = model(images)
                accs.append([100 * float(((logits.double() - d * log_n).argmax(1) == labels)
                                         .double().mean()) for d in deltas])
                bias = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].bias
                slopes.append(float(np.polyfit(log_n.numpy(), bias.detach().double().numpy(),
                                               1)[0]))
            mean = np.mean(accs, axis=0)
            lines.append(f"| {imbalance:g} | {tag} | {','.join(map(str, sorted(runs)))} | "
                         f"{np.mean(slopes):.3f} ({min(slopes):.3f}-{max(slopes):.3f}) | "
                         + " | ".join(f"{m:.2f}" for m in mean) + " |")
    return write_table("posthoc.md", lines)


#: images per class in the extra held-out set: all that the head class has left of
#: Fashion-MNIST's 6,000 training images per class (1,000 in training with n_max 1,000, 500
#: in validation)
HOLDOUT_PER_CLASS = 4500


def holdout_indices(cfg):
    """The extra held-out set of a run's data, as indices into Fashion-MNIST's training
    images: ``HOLDOUT_PER_CLASS`` of each class's images that are in neither the long-tailed
    training subset nor the validation split (a second test set of the same distribution,
    4.5 times the size of the official one). Returns ``(held, train, val, images,
    labels)``: the three sets' indices and all 60,000 training images and labels."""
    import numpy as np

    from eqlosses.data.idx import load_fashion_mnist
    from eqlosses.data.longtail import longtail_indices
    from eqlosses.data.split import balanced_holdout

    d = cfg.data
    x, y = load_fashion_mnist(d.root, "train")
    keep = longtail_indices(y, 10, d.imbalance, n_max=d.n_max, seed=d.subset_seed)
    val = balanced_holdout(y, keep, d.val_per_class, 10, d.val_seed)
    held = balanced_holdout(y, np.concatenate([keep, val]), HOLDOUT_PER_CLASS, 10,
                            d.val_seed + 1)
    return held, keep, val, x, y


def holdout_data(cfg, like):
    """``(images [N, 1, 28, 28], labels [N], train_counts [C])`` of the extra held-out set
    (``holdout_indices``), normalised as ``like``, one of the pipeline's evaluation sets."""
    from eqlosses.data.datasets import ArrayImageDataset

    held, keep, _, x, y = holdout_indices(cfg)
    images, labels = stacked(ArrayImageDataset(x[held], y[held], mean=like.mean,
                                               std=like.std))
    return images, labels, torch.bincount(torch.as_tensor(y[keep]), minlength=10)


def predictions(run: Path, split: str, model, images: torch.Tensor) -> torch.Tensor:
    """``[N]`` the run's top-1 predictions on ``split`` ("test" or "holdout"), computed
    from its checkpoint once and cached (``{split}_pred.pt``). Refused for a run whose test
    set has not been read: both are read for final settings only."""
    from eqlosses.tasks.engine import load_checkpoint

    if not (run / "test_metrics.json").is_file():
        raise SystemExit(f"{run.name}: its test set has not been read (paired --tags ... "
                         f"reads it for a final setting); the held-out images are a second "
                         f"test set and are read for final settings only")
    cached = run / f"{split}_pred.pt"
    if cached.is_file():
        return torch.load(cached)
    model.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in images.split(500)])
    torch.save(pred, cached)
    return pred


def paired_accuracy(pa: torch.Tensor, pb: torch.Tensor, labels: torch.Tensor,
                    classes: torch.Tensor) -> tuple:
    """Two models' accuracies (%) on the images of ``classes`` (all of equal size per
    class, so this is also the mean per-class accuracy), their difference, the standard
    error of that difference from the evaluation images alone (the paired, McNemar form,
    ``sqrt(discordant / n^2 - d^2 / n)`` in fractions: how far it would move on another
    draw of as many images, the models fixed), and the per-image differences ``[n]`` (1, 0
    or -1)."""
    sel = torch.isin(labels, classes)
    per_image = (pa[sel] == labels[sel]).double() - (pb[sel] == labels[sel]).double()
    n = per_image.numel()
    acc_a = float((pa[sel] == labels[sel]).double().mean())
    d = float(per_image.mean())
    se = math.sqrt(max(float(per_image.abs().sum()) / n ** 2 - d * d / n, 0.0))
    return 100 * acc_a, 100 * (acc_a - d), 100 * d, 100 * se, per_image


def cmd_holdout(args) -> int:
    """Two final settings seed by seed on the official test set and on the extra held-out
    set (``holdout_data``), with the part of the spread of their paired difference that
    the evaluation images alone account for (``holdout_A_B.md``)."""
    from eqlosses.data.frequency import many_medium_few_groups
    from eqlosses.tasks.classification import build_data, build_job

    torch.set_num_threads(1)
    a, b = args.tags
    command = f"python benchmarks/beyond_cls.py holdout --tags {a} {b}"
    if args.imbalance != [100.0, 10.0]:
        command += " --imbalance " + " ".join(f"{i:g}" for i in args.imbalance)
    lines = [f"`{a}` against `{b}` on the official test set (1,000 images per class) and on "
             f"the extra held-out set ({HOLDOUT_PER_CLASS:,} per class: the Fashion-MNIST "
             f"training images in neither the training subset nor the validation split), "
             f"paired by training seed; accuracy (%); difference = {a} - {b}. The evaluation "
             f"se is the standard error of one seed's difference from the evaluation images "
             f"alone (root mean square over the seeds); the images' se of the mean is that "
             f"of the mean over the seeds (the models fixed, the images re-drawn); the "
             f"spread the seeds add is sqrt(std^2 - evaluation se^2). `{command}`", "",
             f"| imbalance | set | seeds | group | {a} | {b} | difference, mean ± std | seeds "
             f"with {a} >= {b} | evaluation se | images' se of the mean | spread from "
             f"training |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    seed_rows = []
    for imbalance in args.imbalance:
        runs_a, runs_b = _runs(imbalance, a), _runs(imbalance, b)
        seeds = sorted(set(runs_a) & set(runs_b))
        if len(seeds) < 2:
            continue
        cfg = config_for(a, imbalance, seeds[0])  # the seed changes only the weights
        test_cfg = config_for(a, imbalance, seeds[0])
        test_cfg.data.val_per_class = 0  # the official test set, as test_metrics reads it
        test = build_data(test_cfg).val
        images, labels, counts = holdout_data(cfg, like=test)
        sets = {"test": stacked(test), "holdout": (images, labels)}
        groups = many_medium_few_groups(counts)
        tail = "few" if bool(torch.as_tensor(groups.masks["few"]).any()) else "medium"
        members = {"overall": torch.arange(10),
                   tail: torch.as_tensor(groups.masks[tail]).nonzero().flatten()}
        model_a = build_job(cfg, torch.device("cpu")).model
        model_b = build_job(config_for(b, imbalance, seeds[0]), torch.device("cpu")).model
        for name, (x, y) in sets.items():
            results = {group: [] for group in members}
            for seed in seeds:
                pa = predictions(runs_a[seed], name, model_a, x)
                pb = predictions(runs_b[seed], name, model_b, x)
                for group, classes in members.items():
                    res = paired_accuracy(pa, pb, y, classes)
                    results[group].append(res)
                    seed_rows.append(f"| {imbalance:g} | {name} | {seed} | {group} | "
                                     f"{res[0]:.2f} | {res[1]:.2f} | {res[2]:+.2f} | "
                                     f"{res[3]:.2f} |")
            for group, res in results.items():
                diffs = [r[2] for r in res]
                eval_se = math.sqrt(statistics.mean(r[3] ** 2 for r in res))
                train_sd = math.sqrt(max(statistics.variance(diffs) - eval_se ** 2, 0.0))
                # the mean over the seeds, re-drawn images: each image's seed-averaged
                # difference is one draw
                per_image = torch.stack([r[4] for r in res]).mean(0)
                mean_se = 100 * float(per_image.std()) / math.sqrt(per_image.numel())
                lines.append(f"| {imbalance:g} | {name} | {len(seeds)} | {group} | "
                             f"{statistics.mean(r[0] for r in res):.2f} | "
                             f"{statistics.mean(r[1] for r in res):.2f} | "
                             + " | ".join(_paired(diffs)) + f" | {eval_se:.2f} | "
                             f"{mean_se:.2f} | {train_sd:.2f} |")
    lines += ["", "Seed by seed:", "",
              f"| imbalance | set | seed | group | {a} | {b} | difference | evaluation se |",
              "|---|---|---|---|---|---|---|---|"] + seed_rows
    return write_table(f"holdout_{a}_{b}.md", lines)


def cmd_screen(args) -> int:
    """Validation accuracy of several settings on the same seeds, and each setting's paired
    difference in overall accuracy from the first tag's (``screen_NAME.md``; the validation
    split only, so it can screen settings the test set has not seen)."""
    ref, seeds = args.tags[0], args.seeds
    command = (f"python benchmarks/beyond_cls.py screen --name {args.name} --imbalance "
               + " ".join(f"{i:g}" for i in args.imbalance) + _seeds_flag(seeds)
               + " --tags " + " ".join(args.tags))
    lines = [f"Validation accuracy (%), mean ± std over the seeds listed; the last column is "
             f"the paired difference in overall accuracy from `{ref}`, mean ± std (seeds at or "
             f"above). `{command}`", "",
             f"| imbalance | setting | seeds | overall | many | medium | few | "
             f"overall - {ref} |", "|---|---|---|---|---|---|---|---|"]
    for imbalance in args.imbalance:
        base = _runs(imbalance, ref)
        for tag in args.tags:
            runs = _chosen(_runs(imbalance, tag), seeds)
            if not runs:
                continue
            metrics = {s: val_metrics(r) for s, r in runs.items()}
            cells = [_cell([_value(m, key) for m in metrics.values()]) for _, key in COLUMNS]
            diff = [_value(m, "top1") - _value(val_metrics(base[s]), "top1")
                    for s, m in metrics.items() if s in base]
            vs = "-" if tag == ref or len(diff) < 2 else "{} ({})".format(*_paired(diff))
            lines.append(f"| {imbalance:g} | {tag}: {SETTINGS[tag][2]} | "
                         f"{','.join(map(str, sorted(runs)))} | " + " | ".join(cells)
                         + f" | {vs} |")
    if args.docs:
        replace_block(Path("docs/beyond-the-paper.md"), f"beyond:{args.name}", lines[2:])
    return write_table(f"screen_{args.name}.md", lines)


def replace_block(doc: Path, tag: str, lines: List[str]) -> None:
    """Replace the lines between ``<!-- tag -->`` and ``<!-- /tag -->`` in ``doc``."""
    text = doc.read_text()
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise SystemExit(f"{doc}: expected one {start} ... {end} block")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    doc.write_text(head + start + "\n\n" + "\n".join(lines) + "\n\n" + end + tail)


def plot_indicators(args) -> None:
    """For each gradient-driven setting (seed 0), against the training step: the indicator
    relative to the class counts, ``(I_j / I_head) / (n_j / n_head)`` (1: the indicator is the
    class prior), and the margin in force relative to balanced softmax's,
    ``(a_j - a_head) - log(n_j / n_head)`` in nats (0: balanced softmax's margin)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for imbalance in args.imbalance:
        tags = [t for t in SETTINGS if SETTINGS[t][0] in ("softmax_eql", "softmax_eql_x")
                and 0 in _runs(imbalance, t)]
        missing = [t for t in FINAL if SETTINGS[t][0] in ("softmax_eql", "softmax_eql_x")
                   and t not in tags]
        if missing:  # a partial checkout of the runs: keep the committed plot
            print(f"indicator_r{imbalance:g}.png kept: no seed-0 run of {', '.join(missing)}")
            continue
        fig, axes = plt.subplots(2, len(tags), figsize=(3.6 * len(tags) + 1.0, 6.4),
                                 squeeze=False, sharey="row")
        for col, tag in enumerate(tags):
            run = _runs(imbalance, tag)[0]
            counts = json.loads((run / "metrics.json").read_text())["train_counts"]
            steps, rel, extra = margins_against_prior(run)
            for j in range(rel.shape[1]):
                color = plt.cm.viridis(j / max(rel.shape[1] - 1, 1))
                axes[0, col].plot(steps, rel[:, j], color=color, lw=1,
                                  label=f"class {j} (n={counts[j]:g})")
                axes[1, col].plot(steps, extra[:, j], color=color, lw=1)
            axes[0, col].axhline(1.0, color="red", ls=":", lw=1)
            axes[1, col].axhline(0.0, color="red", ls=":", lw=1)
            axes[0, col].set_yscale("log")
            axes[0, col].set_title(tag, fontsize=9)
            axes[1, col].set_xlabel("training step")
        axes[0, 0].set_ylabel("(I_j / I_head) / (n_j / n_head)")
        axes[1, 0].set_ylabel("margin - balanced softmax's (nats)")
        axes[0, -1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(f"Fashion-MNIST-LT, imbalance {imbalance:g}, seed 0: indicator vs class "
                     f"counts (dotted red: the class prior / balanced softmax)", fontsize=9)
        fig.tight_layout()
        fig.savefig(OUT / f"indicator_r{imbalance:g}.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train the runs that are not finished yet")
    p.add_argument("--imbalance", type=float, nargs="+", default=[100.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tags", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("report", help="tables and plots from the finished runs")
    p.add_argument("--imbalance", type=float, nargs="+", default=[100.0, 10.0])
    p.add_argument("--docs", action="store_true",
                   help="write the tables into README.md and docs/beyond-the-paper.md")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("paired", help="two settings seed by seed (validation and test)")
    p.add_argument("--imbalance", type=float, nargs="+", default=[100.0, 10.0])
    p.add_argument("--tags", nargs=2, default=["mass", "bs"], choices=list(SETTINGS))
    p.add_argument("--splits", nargs="+", default=["validation", "test"],
                   choices=["validation", "test"],
                   help="validation only while a setting is screened (the test set is read "
                        "for final settings only)")
    p.set_defaults(func=cmd_paired)
    p = sub.add_parser("lag", help="how far each setting's margins are from balanced "
                                   "softmax's over training")
    p.add_argument("--imbalance", type=float, nargs="+", default=[10.0])
    p.add_argument("--tags", nargs="+", default=["mass"], choices=list(SETTINGS))
    p.add_argument("--steps", type=int, nargs="+", default=[20, 100, 300, 1000, 3000])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="only these seeds (default: every finished run)")
    p.set_defaults(func=cmd_lag)
    p = sub.add_parser("posthoc", help="validation accuracy with the logits shifted by "
                                       "-delta log n after training, and the prior left in "
                                       "the last bias")
    p.add_argument("--imbalance", type=float, nargs="+", default=[100.0, 10.0])
    p.add_argument("--tags", nargs="+", default=["bs", "mass", "mass_rec1"],
                   choices=list(SETTINGS))
    p.add_argument("--deltas", type=float, nargs="+", default=DELTAS)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="only these seeds (default: every finished run)")
    p.set_defaults(func=cmd_posthoc)
    p = sub.add_parser("holdout", help="two final settings on the test set and on the "
                                       "extra held-out images, with the evaluation noise")
    p.add_argument("--imbalance", type=float, nargs="+", default=[100.0, 10.0])
    p.add_argument("--tags", nargs=2, default=["mass_rec1_bal05", "bs"],
                   choices=list(SETTINGS))
    p.set_defaults(func=cmd_holdout)
    p = sub.add_parser("screen", help="validation accuracy of several settings on the same "
                                      "seeds, paired against the first")
    p.add_argument("--name", required=True, help="writes screen_NAME.md")
    p.add_argument("--imbalance", type=float, nargs="+", default=[100.0, 10.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tags", nargs="+", required=True, choices=list(SETTINGS))
    p.add_argument("--docs", action="store_true",
                   help="also write the table into docs/beyond-the-paper.md (block NAME)")
    p.set_defaults(func=cmd_screen)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
