"""StatsRecorder and read_jsonl: content of the lines, losses without statistics, truncated
files, rank semantics."""

import json
import math
import warnings

import pytest
import torch

from eqlosses import BalancedSoftmaxLoss, CrossEntropyLoss, SigmoidEQLLoss, SoftmaxEQLLoss
from eqlosses import distributed
from eqlosses.monitor import StatsRecorder, read_jsonl

C = 4


def train_steps(crit, steps, recorder=None, on_step=None):
    """A few SGD steps of a linear model on random data (targets cover all classes)."""
    model = torch.nn.Linear(6, crit.num_channels)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        x = torch.randn(8, 6)
        y = torch.arange(8) % C
        loss = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if recorder is not None:
            recorder.record(step + 1, epoch=0)
        if on_step is not None:
            on_step(step + 1)
    return model


def test_softmax_eql_three_steps_recorded_line_by_line(tmp_path):
    crit = SoftmaxEQLLoss(num_classes=C)
    path = tmp_path / "sub" / "stats.jsonl"  # the parent directory does not exist yet
    rec = StatsRecorder(path, crit)
    snapshots = []

    def check_written(step):
        # each line is on disk as soon as record() returns (flushed, file not held open)
        lines = path.read_text().splitlines()
        assert len(lines) == step
        snapshots.append((crit.stats.pos_grad.clone(), crit.stats.neg_grad.clone()))

    train_steps(crit, 3, rec, check_written)
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["num_updates"] for r in records] == [1, 2, 3]
    for r, (pos, neg) in zip(records, snapshots):
        assert set(r) == {"step", "epoch", "num_updates", "pos_grad", "neg_grad", "ratio",
                          "terms"}
        assert r["pos_grad"] == pos.tolist() and r["neg_grad"] == neg.tolist()
        assert r["ratio"] == pytest.approx((pos / (neg + 1e-10)).tolist())
        assert all(p > 0 for p in r["pos_grad"])  # every class was a target
    last = records[-1]
    assert last["ratio"] == crit.stats.ratio(init=1.0).tolist()
    terms = crit.class_terms()
    assert set(last["terms"]) == {"indicator", "margin"}
    assert last["terms"]["margin"] == terms["margin"].tolist()
    # the statistics only grow
    for a, b in zip(records, records[1:]):
        assert all(x <= y for x, y in zip(a["pos_grad"], b["pos_grad"]))


def test_every_and_force(tmp_path):
    crit = SigmoidEQLLoss(num_classes=C)
    rec = StatsRecorder(tmp_path / "s.jsonl", crit, every=2)
    train_steps(crit, 5, rec)  # steps 1..5: records 2 and 4
    assert rec.record(5, epoch=1) is None
    written = rec.record(5, epoch=1, force=True)
    records = read_jsonl(rec.path)
    assert [r["step"] for r in records] == [2, 4, 5]
    assert records[-1] == written
    assert records[-1]["epoch"] == 1 and records[-1]["num_updates"] == 5
    assert set(records[-1]["terms"]) == {"ratio", "pos_weight", "neg_weight"}
    assert records[-1]["ratio"] == records[-1]["terms"]["ratio"]  # init_ratio is 1.0 too


def test_before_any_update_the_ratio_is_the_init_value(tmp_path):
    rec = StatsRecorder(tmp_path / "s.jsonl", SoftmaxEQLLoss(num_classes=3))
    r = rec.record(0, epoch=0)
    assert r["num_updates"] == 0 and r["ratio"] == [1.0, 1.0, 1.0]
    assert r["pos_grad"] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("crit, term_names", [
    (CrossEntropyLoss(num_classes=C), set()),
    (BalancedSoftmaxLoss(num_classes=C, class_counts=torch.tensor([40, 20, 5, 1])), {"margin"}),
])
def test_loss_without_statistics_records_terms_and_nulls(tmp_path, crit, term_names):
    rec = StatsRecorder(tmp_path / "s.jsonl", crit)
    train_steps(crit, 2, rec)
    records = read_jsonl(rec.path)
    assert len(records) == 2
    for r in records:
        assert r["num_updates"] is None and r["pos_grad"] is None
        assert r["neg_grad"] is None and r["ratio"] is None
        assert set(r["terms"]) == term_names
    if term_names:
        assert records[0]["terms"]["margin"] == crit.adjustment.tolist()


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    crit = SoftmaxEQLLoss(num_classes=C)
    path = tmp_path / "s.jsonl"
    rec = StatsRecorder(path, crit)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert rec.record(0, epoch=0) is None
    assert rec.record(1, epoch=0, force=True) is None
    assert not path.exists()
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert rec.record(2, epoch=0) is not None
    assert [r["step"] for r in read_jsonl(path)] == [2]


def test_bad_arguments():
    crit = SoftmaxEQLLoss(num_classes=C)
    with pytest.raises(ValueError, match="every must be a positive int, got 0"):
        StatsRecorder("x.jsonl", crit, every=0)
    with pytest.raises(ValueError, match="step must be an int, got 1.0"):
        StatsRecorder("x.jsonl", crit).record(1.0, epoch=0)


def test_truncated_last_line_is_tolerated(tmp_path):
    path = tmp_path / "s.jsonl"
    good = [{"step": 0, "ratio": [1.0, 0.5]}, {"step": 1, "ratio": [0.9, math.nan]}]
    text = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(text + '{"step": 2, "ratio": [0.8')  # a killed run, mid-line
    with pytest.warns(RuntimeWarning, match="truncated last line 3"):
        records = read_jsonl(path)
    assert [r["step"] for r in records] == [0, 1]
    assert math.isnan(records[1]["ratio"][1])

    # A complete last object without its newline is kept; blank lines are skipped.
    path.write_text(text + "\n" + '{"step": 2}')
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]


def test_corruption_elsewhere_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 0}\n{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        read_jsonl(path)
    # an unparsable last line WITH its newline was written whole: not a truncation
    path.write_text('{"step": 0}\n{"step": \n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2: expected a JSON object, found list"):
        read_jsonl(path)


def test_resumed_run_drops_the_truncated_line_before_appending(tmp_path):
    crit = SoftmaxEQLLoss(num_classes=C)
    path = tmp_path / "s.jsonl"
    first = StatsRecorder(path, crit)
    first.record(0, epoch=0)
    first.record(1, epoch=0)
    with open(path, "a") as f:
        f.write('{"step": 2, "epoch": 0, "pos_')  # killed while writing step 2
    resumed = StatsRecorder(path, crit)
    with pytest.warns(RuntimeWarning, match="removed a truncated last line"):
        resumed.record(2, epoch=0)
    resumed.record(3, epoch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncated line left, no corrupt middle line
        records = read_jsonl(path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
