"""StatsRecorder and the readers: content of the records, the documented binary layout, the
size bound and which steps are kept, resume truncation, records cut short, the JSON-lines
format of older runs, rank semantics."""

import json
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch

from eqlosses import BalancedSoftmaxLoss, CrossEntropyLoss, SigmoidEQLLoss, SoftmaxEQLLoss
from eqlosses import distributed
from eqlosses.monitor import (StatsRecorder, latest_stats, read_jsonl, read_stats,
                              truncate_stats)

C = 4


def train_steps(crit, steps, recorder=None, on_step=None):
    """A few SGD steps of a linear model on random data (targets cover all classes)."""
    model = torch.nn.Linear(6, crit.num_channels)
    for step in range(steps):
        x = torch.randn(8, 6)
        y = torch.arange(8) % C
        loss = crit(model(x), y)
        model.zero_grad()
        loss.backward()
        with torch.no_grad():  # plain SGD (torch.optim's first import is slow)
            for p in model.parameters():
                p -= 0.5 * p.grad
        if recorder is not None:
            recorder.record(step + 1, epoch=0)
        if on_step is not None:
            on_step(step + 1)
    return model


def set_state(crit, step):
    """Give the loss's statistics a value that depends on the step (no training needed)."""
    c = crit.stats.num_classes
    base = torch.arange(1, c + 1, dtype=torch.float64)
    crit.stats.pos_grad.copy_(step * base / c)
    crit.stats.neg_grad.copy_(step * (1.0 + 0.1 * base))
    crit.stats.num_updates.fill_(step)


def record_steps(path, crit, steps, max_records=256):
    rec = StatsRecorder(path, crit, max_records=max_records)
    for step in steps:
        set_state(crit, step)
        rec.record(step, epoch=step // 1000)
    return rec


def test_softmax_eql_steps_recorded_one_by_one(tmp_path):
    crit = SoftmaxEQLLoss(num_classes=C)
    path = tmp_path / "sub" / "stats.bin"  # the parent directory does not exist yet
    rec = StatsRecorder(path, crit)
    snapshots = []

    def check_written(step):
        # each record is on disk as soon as record() returns (flushed, file not held open)
        assert read_stats(path).steps.tolist() == list(range(1, step + 1))
        snapshots.append((crit.stats.pos_grad.clone(), crit.stats.neg_grad.clone()))

    train_steps(crit, 3, rec, check_written)
    h = read_stats(path)
    assert h.num_updates.tolist() == [1, 2, 3] and h.num_classes == C and h.has_stats
    for t, (pos, neg) in enumerate(snapshots):
        np.testing.assert_allclose(h.pos_grad[t], pos.numpy(), rtol=1e-6)  # float32 on disk
        np.testing.assert_allclose(h.neg_grad[t], neg.numpy(), rtol=1e-6)
        np.testing.assert_allclose(h.ratio[t], (pos / (neg + 1e-10)).numpy(), rtol=1e-6)
        assert (h.pos_grad[t] > 0).all()  # every class was a target
    assert set(h.terms) == {"indicator", "margin"}
    np.testing.assert_allclose(h.terms["margin"][-1], crit.class_terms()["margin"].numpy(),
                               rtol=1e-6, atol=1e-7)
    # the statistics only grow
    assert (np.diff(h.pos_grad, axis=0) >= 0).all()
    # the last record is the latest snapshot, also read on its own
    latest = latest_stats(path)
    assert latest["step"] == 3 and latest["num_updates"] == 3
    np.testing.assert_array_equal(latest["ratio"], h.ratio[-1])
    np.testing.assert_array_equal(h.record(-1)["terms"]["indicator"], h.terms["indicator"][-1])


def test_every_and_force(tmp_path):
    crit = SigmoidEQLLoss(num_classes=C)
    rec = StatsRecorder(tmp_path / "s.bin", crit, every=2)
    train_steps(crit, 5, rec)  # steps 1..5: records 2 and 4
    assert rec.record(5, epoch=1) is None
    written = rec.record(5, epoch=1, force=True)
    h = read_stats(rec.path)
    assert h.steps.tolist() == [2, 4, 5]
    assert h.epochs.tolist() == [0, 0, 1] and h.num_updates.tolist()[-1] == 5
    np.testing.assert_allclose(h.ratio[-1], written["ratio"], rtol=1e-6)
    assert set(h.terms) == {"ratio", "pos_weight", "neg_weight"}
    np.testing.assert_array_equal(h.terms["ratio"], h.ratio)  # the loss's own ratio
    np.testing.assert_allclose(h.terms["pos_weight"][-1], written["terms"]["pos_weight"],
                               rtol=1e-6)


def test_before_any_update_the_ratio_is_the_init_value(tmp_path):
    rec = StatsRecorder(tmp_path / "s.bin", SoftmaxEQLLoss(num_classes=3))
    r = rec.record(0, epoch=0)
    assert r["num_updates"] == 0 and r["ratio"] == [1.0, 1.0, 1.0]
    assert r["pos_grad"] == [0.0, 0.0, 0.0]
    assert latest_stats(rec.path)["ratio"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("crit, term_names", [
    (CrossEntropyLoss(num_classes=C), set()),
    (BalancedSoftmaxLoss(num_classes=C, class_counts=torch.tensor([40, 20, 5, 1])), {"margin"}),
])
def test_loss_without_statistics_records_terms_and_nulls(tmp_path, crit, term_names):
    rec = StatsRecorder(tmp_path / "s.bin", crit)
    train_steps(crit, 2, rec)
    h = read_stats(rec.path)
    assert h.steps.tolist() == [1, 2] and not h.has_stats
    assert h.ratio is None and h.pos_grad is None and h.neg_grad is None
    assert set(h.terms) == term_names
    latest = latest_stats(rec.path)
    assert latest["num_updates"] is None and latest["ratio"] is None
    if term_names:
        np.testing.assert_allclose(h.terms["margin"][0], crit.adjustment.numpy(), rtol=1e-6)


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    crit = SoftmaxEQLLoss(num_classes=C)
    path = tmp_path / "s.bin"
    rec = StatsRecorder(path, crit)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert rec.record(0, epoch=0) is None
    assert rec.record(1, epoch=0, force=True) is None
    assert not path.exists()
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert rec.record(2, epoch=0) is not None
    assert read_stats(path).steps.tolist() == [2]


def test_bad_arguments(tmp_path):
    crit = SoftmaxEQLLoss(num_classes=C)
    with pytest.raises(ValueError, match="every must be a positive int, got 0"):
        StatsRecorder("x.bin", crit, every=0)
    with pytest.raises(ValueError, match="max_records must be an even int >= 4, got 7"):
        StatsRecorder("x.bin", crit, max_records=7)
    with pytest.raises(ValueError, match="step must be an int, got 1.0"):
        StatsRecorder("x.bin", crit).record(1.0, epoch=0)
    with pytest.raises(ValueError, match="not JSON lines; name the file stats.bin"):
        StatsRecorder(tmp_path / "stats.jsonl", crit)
    with pytest.raises(FileNotFoundError, match="has no stats.bin"):
        read_stats(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.bin does not exist"):
        latest_stats(tmp_path / "missing.bin")
    (tmp_path / "other.bin").write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(ValueError, match="not an eqlosses statistics file"):
        read_stats(tmp_path / "other.bin")


def test_file_follows_the_documented_layout(tmp_path):
    """Parse the file by hand, from the module documentation alone."""
    crit = SigmoidEQLLoss(num_classes=3)
    record_steps(tmp_path / "stats.bin", crit, [10, 20])
    raw = (tmp_path / "stats.bin").read_bytes()
    assert raw[:8] == b"EQLSTAT1"
    size = struct.unpack("<I", raw[8:12])[0]
    assert (12 + size) % 8 == 0
    header = json.loads(raw[12:12 + size])
    assert header["format"] == "eqlosses-stats" and header["version"] == 1
    names = [a["name"] for a in header["arrays"]]
    assert names == ["pos_grad", "neg_grad", "ratio", "terms/pos_weight", "terms/neg_weight"]
    assert header["aliases"] == {"terms/ratio": "ratio"}
    n_floats = 5 * 3
    assert header["record_bytes"] == 32 + 4 * n_floats
    body = raw[12 + size:]
    assert len(body) == 2 * header["record_bytes"]
    for i, step in enumerate([10, 20]):
        rec = body[i * header["record_bytes"]:(i + 1) * header["record_bytes"]]
        s, epoch, updates, flags, crc = struct.unpack("<qqqII", rec[:32])
        assert (s, epoch, updates, flags) == (step, 0, step, 1)
        assert crc == zlib.crc32(rec[32:], zlib.crc32(rec[:28]))
        values = np.frombuffer(rec[32:], dtype="<f4")
        np.testing.assert_allclose(values[:3], step * np.arange(1, 4) / 3, rtol=1e-6)


def is_even_grid(steps):
    """Evenly spaced steps that are all multiples of their spacing."""
    d = np.diff(steps)
    return len(set(d.tolist())) == 1 and all(s % d[0] == 0 for s in steps)


def test_the_history_is_bounded_and_evenly_thinned(tmp_path):
    crit = SoftmaxEQLLoss(num_classes=50)
    m = 16
    steps = list(range(10, 10_010, 10))  # 1000 records
    path = tmp_path / "stats.bin"
    rec = StatsRecorder(path, crit, max_records=m)
    sizes = []
    for step in steps:
        set_state(crit, step)
        rec.record(step, epoch=0)
        sizes.append(path.stat().st_size)
        if step == 10 * (m - 1):  # fewer than max_records so far: every record is kept
            assert read_stats(path).steps.tolist() == steps[:m - 1]
    floats = 5 * 50  # pos, neg, ratio, indicator, margin
    bound = 1024 + (m + 1) * (32 + 4 * floats)
    assert max(sizes) <= bound
    h = read_stats(path)
    assert len(h) <= m + 1
    assert h.steps[-1] == 10_000  # the latest is always there
    kept = h.steps[:-1] if h.steps[-1] % (h.steps[1] - h.steps[0]) else h.steps
    assert m // 2 <= len(kept) <= m
    assert is_even_grid(kept)
    spacing = kept[1] - kept[0]
    assert kept[0] == spacing and kept[-1] > 10_000 - spacing  # spans the whole run
    np.testing.assert_allclose(h.pos_grad[:, -1], h.steps.astype(float), rtol=1e-6)


def test_lvis_sized_history_stays_small(tmp_path):
    """C = 1203, Sigmoid-EQL (5 arrays): 600 records stay under the documented 6.2 MB."""
    crit = SigmoidEQLLoss(num_classes=1203)
    path = tmp_path / "stats.bin"
    record_steps(path, crit, range(10, 6010, 10))
    assert path.stat().st_size < 6.2e6
    h = read_stats(path, fields=["ratio"])
    assert set(h.arrays) == {"ratio"} and h.ratio.shape[1] == 1203
    assert 128 <= len(h) <= 257 and h.steps[-1] == 6000


@pytest.mark.slow
def test_the_documented_lvis_measurement(tmp_path):
    """The module documentation's numbers: 90k steps, a record every 10, C = 1203."""
    crit = SigmoidEQLLoss(num_classes=1203)
    path = tmp_path / "stats.bin"
    record_steps(path, crit, range(10, 90_010, 10))
    # the size from the documented layout: the header, then 141 records of 32 bytes plus
    # five float32 arrays of C (pos_grad, neg_grad, ratio, pos_weight, neg_weight)
    with open(path, "rb") as f:
        head = f.read(12)
    header_end = 12 + int.from_bytes(head[8:12], "little")
    assert path.stat().st_size == header_end + 141 * (32 + 4 * 5 * 1203) <= 3_400_000
    h = read_stats(path, fields=["ratio"])
    assert len(h) == 141 and h.steps[-1] == 90_000
    assert h.steps[:-1].tolist() == list(range(640, 90_000, 640))


def test_resume_after_truncation_equals_an_uninterrupted_run(tmp_path):
    crit = SoftmaxEQLLoss(num_classes=5)
    steps = list(range(10, 3010, 10))
    straight = tmp_path / "straight.bin"
    record_steps(straight, crit, steps, max_records=16)

    resumed = tmp_path / "resumed.bin"
    record_steps(resumed, crit, [s for s in steps if s <= 2200], max_records=16)
    with open(resumed, "ab") as f:
        f.write(b"\x01" * 30)  # killed while writing the next record
    with pytest.warns(RuntimeWarning, match="cut short"):
        removed = truncate_stats(resumed, 1500)  # the checkpoint was at step 1500
    assert removed > 0
    assert read_stats(resumed).steps[-1] <= 1500
    record_steps(resumed, crit, [s for s in steps if s > 1500], max_records=16)

    a, b = read_stats(straight), read_stats(resumed)
    assert a.steps.tolist() == b.steps.tolist()
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    assert truncate_stats(tmp_path / "absent.bin", 10) == 0


def test_truncated_or_torn_last_record_is_dropped_with_a_warning(tmp_path):
    crit = SoftmaxEQLLoss(num_classes=C)
    path = tmp_path / "stats.bin"
    record_steps(path, crit, [1, 2, 3])
    full = path.read_bytes()

    path.write_bytes(full[:-10])  # the last record cut short
    with pytest.warns(RuntimeWarning, match="cut short"):
        assert read_stats(path).steps.tolist() == [1, 2]
    with pytest.warns(RuntimeWarning, match="cut short"):
        assert latest_stats(path)["step"] == 2

    torn = bytearray(full)
    torn[-5] ^= 0xFF  # a rewrite of the last record torn half-way
    path.write_bytes(bytes(torn))
    with pytest.warns(RuntimeWarning, match="checksum fails"):
        assert read_stats(path).steps.tolist() == [1, 2]
    with pytest.warns(RuntimeWarning, match="cut short"):
        assert latest_stats(path)["step"] == 2

    middle = bytearray(full)
    middle[-len(full) // 3] ^= 0xFF  # damage elsewhere is not an interrupted write
    path.write_bytes(bytes(middle))
    with pytest.raises(ValueError, match=r"stats\.bin: record 1 of 3 fails its checksum"):
        read_stats(path)


def test_recorder_removes_a_truncated_record_before_appending(tmp_path):
    crit = SoftmaxEQLLoss(num_classes=C)
    path = tmp_path / "stats.bin"
    record_steps(path, crit, [1, 2])
    with open(path, "ab") as f:
        f.write(b"\x00" * 17)  # killed while writing step 3
    resumed = StatsRecorder(path, crit)
    with pytest.warns(RuntimeWarning, match="removed 17 bytes"):
        resumed.record(3, epoch=0)
    resumed.record(4, epoch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing cut short left
        assert read_stats(path).steps.tolist() == [1, 2, 3, 4]


def test_an_older_step_replaces_the_later_records(tmp_path):
    crit = SoftmaxEQLLoss(num_classes=C)
    rec = record_steps(tmp_path / "stats.bin", crit, [10, 20, 30])
    with pytest.warns(RuntimeWarning, match="replacing the records of steps >= 20"):
        rec.record(20, epoch=0)
    assert read_stats(rec.path).steps.tolist() == [10, 20]


def test_a_file_of_another_loss_is_refused(tmp_path):
    record_steps(tmp_path / "stats.bin", SoftmaxEQLLoss(num_classes=C), [1])
    rec = StatsRecorder(tmp_path / "stats.bin", SoftmaxEQLLoss(num_classes=C + 1))
    with pytest.raises(ValueError, match="another layout"):
        rec.record(2, epoch=0)

    crit = SoftmaxEQLLoss(num_classes=C)
    rec = StatsRecorder(tmp_path / "other.bin", crit)
    rec.record(1, epoch=0)
    terms = crit.class_terms()
    crit.class_terms = lambda: {**terms, "extra": torch.ones(C)}  # a term appears mid-run
    with pytest.raises(ValueError, match="arrays changed during the run"):
        rec.record(2, epoch=0)
    assert read_stats(rec.path).steps.tolist() == [1]  # nothing half-written


# --------------------------------------------------------------------------------------------
# stats.jsonl, the format of older runs
# --------------------------------------------------------------------------------------------

def legacy_line(step, c=3):
    return json.dumps({"step": step, "epoch": 0, "num_updates": step,
                       "pos_grad": [step * (j + 1.0) for j in range(c)],
                       "neg_grad": [2.0 * step] * c,
                       "ratio": [(j + 1.0) / 2 for j in range(c)],
                       "terms": {"margin": [0.5] * c}}, separators=(",", ":")) + "\n"


def test_old_stats_jsonl_is_read(tmp_path):
    (tmp_path / "stats.jsonl").write_text("".join(legacy_line(s) for s in (10, 20, 30))
                                          + legacy_line(40)[:50])  # killed mid-line
    with pytest.warns(RuntimeWarning, match="truncated last line 4"):
        h = read_stats(tmp_path)
    assert h.legacy and h.steps.tolist() == [10, 20, 30] and h.num_classes == 3
    np.testing.assert_array_equal(h.pos_grad[:, 2], [30.0, 60.0, 90.0])
    np.testing.assert_array_equal(h.terms["margin"], np.full((3, 3), 0.5, np.float32))
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        latest = latest_stats(tmp_path)
    assert latest["step"] == 30 and latest["ratio"].tolist() == [0.5, 1.0, 1.5]
    assert latest["terms"]["margin"].tolist() == [0.5] * 3


def test_a_long_old_file_is_streamed_and_thinned(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_text("".join(legacy_line(s) for s in range(10, 10_010, 10)))  # 1000 lines
    h = read_stats(path, fields=["ratio"], max_records=16)
    assert set(h.arrays) == {"ratio"}
    assert len(h) <= 17 and h.steps[-1] == 10_000
    assert is_even_grid(h.steps[:-1]) and len(h.steps) - 1 >= 8
    with pytest.raises(ValueError, match=r"stats\.jsonl, line 2: not valid JSON"):
        path.write_text(legacy_line(10) + '{"step": 20, "rat\n' + legacy_line(30))
        read_stats(path)


def test_a_run_resumed_across_the_format_change_reads_both(tmp_path):
    (tmp_path / "stats.jsonl").write_text("".join(legacy_line(s) for s in (10, 20, 30)))
    crit = SoftmaxEQLLoss(num_classes=3)
    record_steps(tmp_path / "stats.bin", crit, [30, 40])  # resumed from step 20
    h = read_stats(tmp_path, fields=["ratio", "pos_grad"])
    assert h.steps.tolist() == [10, 20, 30, 40]
    np.testing.assert_allclose(h.pos_grad[:, 0], [10.0, 20.0, 10.0, 40 / 3], rtol=1e-6)


def test_read_jsonl_tolerates_only_a_truncated_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    good = [{"step": 0, "loss": 1.0}, {"step": 1, "loss": math.nan}]
    text = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(text + '{"step": 2, "lo')
    with pytest.warns(RuntimeWarning, match="truncated last line 3"):
        assert [r["step"] for r in read_jsonl(path)] == [0, 1]
    path.write_text('{"step": 0}\n{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl, line 2: not valid JSON"):
        read_jsonl(path)
