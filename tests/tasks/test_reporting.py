"""Reports from run directories: finished, still running or crashed, old-format and damaged
runs; the settings and captions in the report; comparisons; one real training run."""

import json
import re
import warnings

import numpy as np
import pytest
import torch

from eqlosses import SoftmaxEQLLoss
from eqlosses.monitor import StatsRecorder, read_stats
from eqlosses.tasks.reporting import compare_runs, load_run, report_run, task_of

yaml = pytest.importorskip("yaml")
pytest.importorskip("matplotlib")

COUNTS = [500, 150, 60, 12, 3]
NAMES = ["shirt", "shoe", "bag", "coat", "sandal"]


def make_run(root, name, *, loss="softmax_eql", lr=0.05, finished=True, steps=40,
             task="cls", config=True, stats="bin"):
    """A run directory as the engine writes it (2 epochs of 20 steps, statistics every 10)."""
    d = root / name
    d.mkdir(parents=True)
    if config:
        cfg = {"task": task, "name": name, "seed": 3, "device": "auto", "stats_every": 10,
               "data": {"name": "embedded", "imbalance": 100.0, "batch_size": 64,
                        "sampler": "instance"},
               "model": {"name": "small_cnn", "width": 8},
               "loss": {"name": loss, "tau": 1.5},
               "optim": {"name": "sgd", "lr": lr, "epochs": 2, "schedule": "cosine",
                         "warmup_epochs": 1.0}}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = [{"kind": "start", "resume": False, "world_size": 1, "device": "cpu",
            "num_classes": 5, "train_counts": COUNTS,
            "groups": ["many", "many", "medium", "few", "few"]}]
    for step in range(1, steps + 1):
        log.append({"kind": "step", "epoch": (step - 1) // 20, "step": step,
                    "loss": 2.0 / step, "lr": lr})
        if step % 20 == 0:
            log.append({"kind": "eval", "epoch": step // 20, "step": step,
                        "top1": 0.3 * step / 20, "balanced_accuracy": 0.2 * step / 20,
                        "groups": {"few": 0.1, "medium": 0.3, "many": 0.6}})
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    crit = SoftmaxEQLLoss(num_classes=5)
    records = []
    for step in range(10, steps + 1, 10):
        crit.stats.pos_grad.copy_(torch.tensor(COUNTS, dtype=torch.float64) * step / 100)
        crit.stats.neg_grad.fill_(step)
        crit.stats.num_updates.fill_(step)
        records.append(StatsRecorder(d / "stats.bin", crit).record(step, epoch=step // 20))
    if stats == "jsonl":  # a run of an older version
        (d / "stats.bin").unlink()
        (d / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        metrics = {"top1": 0.6, "balanced_accuracy": 0.4,
                   "per_class_accuracy": [0.9, 0.8, 0.5, 0.2, 0.0],
                   "groups": {"few": 0.1, "medium": 0.5, "many": 0.85},
                   "group_bounds": {"few": [float("-inf"), 19.0], "medium": [19.0, 100.0],
                                    "many": [100.0, float("inf")]}}
        (d / "metrics.json").write_text(json.dumps(
            {"name": name, "loss": loss, "metrics": metrics, "train_counts": COUNTS,
             "class_names": NAMES}))
    return d


def html_of(path):
    text = path.read_text(encoding="utf-8")
    return text, re.sub(r"<[^>]+>", "", text)


def captions(text):
    return re.findall(r"<figcaption><b>(.*?)\.</b>", text)


def test_a_crashed_run_gets_curves_statistics_and_a_note(tmp_path):
    d = make_run(tmp_path, "crashed", finished=False, steps=30)
    with open(d / "log.jsonl", "a") as f:
        f.write('{"kind": "step", "epo')  # killed while logging
    with open(d / "stats.bin", "ab") as f:
        f.write(b"\x00" * 11)  # and while recording

    report = report_run(d)
    assert report == d / "report.html"
    text, plain = html_of(report)
    assert "This run has not finished: there is no metrics.json yet" in plain
    assert "The last logged step is 30, in epoch 2 of 2." in plain
    for png in ("training_curves.png", "gradient_ratio.png", "ratio_evolution.png"):
        assert (d / "plots" / png).is_file()
    assert not (d / "plots" / "per_class_accuracy.png").exists()
    assert captions(text) == ["Training curves", "Gradient ratio per class at step 30",
                              "Gradient ratio during training"]
    # the results are those of the last evaluation logged (step 20: top1 0.3)
    assert "From the last evaluation in log.jsonl (after epoch 1, step 20)" in plain
    assert '<td class="num">30.00</td>' in text
    # what was cut short is said, not raised
    assert "log.jsonl: " in plain and "truncated last line" in plain
    assert "cut short" in plain
    # the settings come from config.yaml
    assert "<tr><th>learning rate</th><td>0.05 (sgd, cosine schedule, 1.0 warm-up epochs)" \
           in text
    assert "<tr><th>loss arguments</th><td>tau=1.5</td>" in text
    assert "<tr><th>seed</th><td>3</td>" in text and "<tr><th>epochs</th><td>2</td>" in text
    assert "The gradient ratio of class j is P_j / N_j" in plain


@pytest.mark.slow
def test_an_interrupted_run_says_how_to_continue(tmp_path):
    d = make_run(tmp_path, "stopped", finished=False, steps=25)
    with open(d / "log.jsonl", "a") as f:
        f.write(json.dumps({"kind": "interrupted", "epoch": 1, "step": 25, "saved": True}) + "\n")
    _, plain = html_of(report_run(d))
    assert "It was interrupted at step 25 with a checkpoint saved" in plain
    assert f"eqlosses train cls --resume --run {d}" in plain


@pytest.mark.slow
def test_a_finished_run_report(tmp_path):
    d = make_run(tmp_path, "done")
    text, plain = html_of(report_run(d))
    assert "The run has finished after 2 epochs (40 steps)." in plain
    assert "has not finished" not in plain
    assert captions(text) == ["Training curves", "Per-class accuracy",
                              "Gradient ratio per class at step 40",
                              "Gradient ratio during training"]
    assert "classes are sorted by training count" in plain  # a caption says how to read it
    assert "<h2>Notes</h2>" not in text  # the table is not repeated in a proportional font
    assert re.search(r"<td>softmax_eql</td><td class=\"num\">60\.00</td>", text)
    run = load_run(d)
    assert run["finished"] and run["class_names"] == NAMES and run["task"] == "cls"
    assert run["stats"].steps.tolist() == [10, 20, 30, 40]
    assert run["latest_stats"]["step"] == 40


def test_the_task_comes_from_config_yaml(tmp_path):
    d = make_run(tmp_path, "seg", task="seg", finished=False)
    run = load_run(d)
    assert run["task"] == "seg" and task_of(run) == "seg"
    assert run["train_counts"] == COUNTS  # from the log's start record
    assert task_of({"metrics": {"miou": 0.5}}) == "seg"  # old runs: guessed from the metrics


@pytest.mark.slow
def test_an_old_run_without_config_and_with_stats_jsonl(tmp_path):
    d = make_run(tmp_path, "old", config=False, stats="jsonl")
    (d / "log.jsonl").unlink()
    text, plain = html_of(report_run(d))
    assert (d / "plots" / "gradient_ratio.png").is_file()
    assert (d / "plots" / "ratio_evolution.png").is_file()
    assert "config.yaml is missing" in plain
    assert load_run(d)["stats"].steps.tolist() == [10, 20, 30, 40]


def test_a_run_that_just_started(tmp_path):
    d = make_run(tmp_path, "fresh", finished=False, steps=0)
    (d / "stats.bin").unlink(missing_ok=True)
    text, plain = html_of(report_run(d))
    assert "No training step has been logged yet" in plain
    assert "No gradient statistics were recorded" in plain
    assert "No results yet." in plain and "<figure>" not in text


@pytest.mark.slow
def test_damaged_files_become_notes(tmp_path):
    d = make_run(tmp_path, "damaged")
    (d / "metrics.json").write_text('{"name": "damaged", "metr')
    (d / "config.yaml").write_text("task: [unclosed\n")
    text, plain = html_of(report_run(d))
    assert "metrics.json does not parse" in plain and "has not finished" in plain
    assert "config.yaml is not valid YAML" in plain


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError,
                       match="no config.yaml, log.jsonl, metrics.json or stats.bin"):
        report_run(tmp_path / "empty")


@pytest.mark.slow
def test_compare_runs_with_ratio_evolution_and_settings(tmp_path):
    a = make_run(tmp_path, "eql_a", lr=0.05)
    b = make_run(tmp_path, "eql_b", lr=0.1)
    result = compare_runs([a, b], tmp_path / "cmp")
    names = [p.name for p in result["images"]]
    assert names == ["group_metric.png", "per_class_accuracy.png", "gradient_ratio_runs.png",
                     "ratio_evolution.png", "gradient_ratio_eql_a.png", "gradient_ratio_eql_b.png"]
    assert all(p.is_file() for p in result["images"])
    text, plain = html_of(result["report"])
    assert "Gradient ratio during training, per run" in captions(text)
    lr_row = re.search(r"<tr><th>learning rate</th>(.*?)</tr>", text).group(1)
    assert lr_row.count('class="differs"') == 2  # the runs differ in lr
    assert "<tr><th>seed</th><td>3</td><td>3</td></tr>" in text
    assert "softmax_eql" in result["table"]

    c = make_run(tmp_path, "unfinished", finished=False)
    with pytest.raises(FileNotFoundError, match="no metrics.json: compare needs finished"):
        compare_runs([a, c], tmp_path / "cmp2")


@pytest.mark.slow
def test_a_real_run_records_stats_bin_and_reports(tmp_path):
    from eqlosses.config import load_config
    from eqlosses.tasks import classification as cls

    cfg = load_config(None, ["model.width=4", "data.batch_size=256", "optim.epochs=1",
                             "progress=false", "tensorboard=false", "stats_every=3",
                             f"output_dir={tmp_path}", "name=real"])
    cls.train(cfg)
    run = tmp_path / "real"
    assert (run / "stats.bin").is_file() and not (run / "stats.jsonl").exists()
    h = read_stats(run)
    steps = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"]
    expected = list(range(3, steps + 1, 3)) + ([steps] if steps % 3 else [])
    assert h.steps.tolist() == expected  # every 3 steps, and the final state
    assert np.isfinite(h.ratio).all() and h.ratio.shape[1] == 10
    text, _ = html_of(report_run(run))
    assert len(captions(text)) == 4


@pytest.mark.slow
def test_a_crashed_and_resumed_run_has_the_statistics_of_an_uninterrupted_one(tmp_path,
                                                                               monkeypatch):
    """The engine forgets the records after the checkpoint (step 6) on resume."""
    from eqlosses.config import load_config
    from eqlosses.tasks import classification as cls
    from eqlosses.tasks.common import Progress

    def cfg(name):
        return load_config(None, ["model.width=4", "data.batch_size=256", "optim.epochs=1",
                                  "progress=false", "tensorboard=false", "stats_every=1",
                                  "checkpoint_every_steps=3", "data.augment=false",
                                  f"output_dir={tmp_path}", f"name={name}"])

    cls.train(cfg("straight"))
    original = Progress.update

    def crash_after_step_7(self, done, *args, **kwargs):
        if done == 7:
            raise RuntimeError("killed")
        return original(self, done, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Progress, "update", crash_after_step_7)
        with pytest.raises(RuntimeError, match="killed"):
            cls.train(cfg("crashed"))
    assert read_stats(tmp_path / "crashed").steps.tolist() == list(range(1, 8))
    report_run(tmp_path / "crashed")  # a crashed run reports
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls.train(cfg("crashed"), resume=True)
    # truncated by the engine before recording: no record had to be replaced
    assert not [w for w in caught if "stats.bin" in str(w.message)]
    a, b = read_stats(tmp_path / "straight"), read_stats(tmp_path / "crashed")
    assert a.steps.tolist() == b.steps.tolist() == list(range(1, len(a) + 1))
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])


@pytest.mark.slow  # five figures drawn (seconds)
def test_compare_shows_the_baseline_ratios_next_to_the_equalization_loss(tmp_path):
    """The paper's figure 1 as a comparison: cross-entropy's ratios (recorded with
    track_statistics) next to Softmax-EQL's, captioned with each run's mean ratio per group."""
    from eqlosses.losses import CrossEntropyLoss

    eql = make_run(tmp_path, "softmax_eql", steps=20)  # last ratios: COUNTS / 100
    ce = make_run(tmp_path, "ce", loss="ce", steps=20)
    (ce / "stats.bin").unlink()
    crit = CrossEntropyLoss(5, track_statistics=True)
    crit.stats.pos_grad.copy_(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    crit.stats.neg_grad.fill_(20.0)
    StatsRecorder(ce / "stats.bin", crit).record(20, epoch=1)
    result = compare_runs([ce, eql], tmp_path / "cmp")
    assert (tmp_path / "cmp" / "gradient_ratio_runs.png") in result["images"]
    assert (tmp_path / "cmp" / "gradient_ratio_runs.png").stat().st_size > 5000
    text, plain = html_of(result["report"])
    assert "Gradient ratio per class, per run" in captions(text)
    # groups from metrics.json: many > 100 (500, 150), medium (19, 100] (60), few (12, 3)
    assert "ce: many 0.175, medium 0.1, few 0.0375" in plain
    assert "softmax_eql: many 3.25, medium 0.6, few 0.075" in plain


@pytest.mark.slow
def test_the_demo_report_compares_cross_entropy_with_softmax_eql(tmp_path):
    """`eqlosses demo` (tiny: one epoch, a narrow model) records cross-entropy's statistics and
    its report draws them next to Softmax-EQL's."""
    from eqlosses.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--losses", "ce", "softmax_eql", "--epochs", "1",
                 "--set", "model.width=4", "--set", "data.batch_size=256", "--set",
                 "progress=false", "--set", "tensorboard=false", "--set", "stats_every=5"]) == 0
    ce = read_stats(out / "ce")
    assert ce.ratio is not None and np.isfinite(ce.ratio).all()
    assert (ce.pos_grad[-1] > 0).all() and (ce.neg_grad[-1] > 0).all()
    assert (out / "compare" / "gradient_ratio_runs.png").is_file()
    text, plain = html_of(out / "compare" / "report.html")
    assert "Gradient ratio per class, per run" in captions(text)
    assert re.search(r"ce: many [0-9.e-]+, medium [0-9.e-]+, few [0-9.e-]+", plain)
    assert re.search(r"softmax_eql: many [0-9.e-]+", plain)


@pytest.mark.slow  # figures drawn (seconds)
def test_plot_reads_a_directory_holding_only_a_recorders_statistics(tmp_path, capsys):
    """A training loop of one's own writes stats.bin with StatsRecorder and nothing else:
    `eqlosses plot` reports it (as a classification run whose counts are unknown)."""
    from eqlosses.cli import main

    crit = SoftmaxEQLLoss(4)
    rec = StatsRecorder(tmp_path / "mine" / "stats.bin", crit)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        crit(torch.randn(16, 4, generator=g), torch.tensor([0] * 10 + [1] * 4 + [2, 3]))
        rec.record(step, epoch=0)
    assert main(["plot", str(tmp_path / "mine")]) == 0
    run = load_run(tmp_path / "mine")
    assert run["task"] == "cls" and run["stats"] is not None and not run["finished"]
    assert any("class counts are unknown" in note for note in run["notes"])
    assert "report:" in capsys.readouterr().out
