"""ClassificationMetrics: hand-computed confusion matrices, group means, top-k, masks, NaN
handling, and a real two-process gloo run of sync()."""

import json
import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import eqlosses.distributed
from eqlosses.data.frequency import FrequencyGroups, many_medium_few_groups
from eqlosses.metrics import ClassificationMetrics
from tests.dist_utils import free_port, spawn_and_wait


def same(a, b):
    """Equality of compute() results, NaN included (NaN != NaN in a plain ==)."""
    return json.dumps(a) == json.dumps(b)


def one_hot_scores(pred, num_classes):
    """Scores whose arg-max is ``pred``."""
    return torch.nn.functional.one_hot(torch.as_tensor(pred), num_classes).float()


def test_confusion_matrix_and_accuracies_by_hand():
    # true:  0 0 0 1 1 2
    # pred:  0 0 1 1 2 0
    m = ClassificationMetrics(3, topk=(1,))
    m.update(one_hot_scores([0, 0, 1, 1, 2, 0], 3), torch.tensor([0, 0, 0, 1, 1, 2]))
    r = m.compute()
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert r["num_samples"] == 6
    assert r["top1"] == pytest.approx(3 / 6)
    assert r["per_class_accuracy"] == pytest.approx([2 / 3, 1 / 2, 0.0])
    # the mean of per-class accuracies, not the sample accuracy
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert r["groups"] == {} and r["group_bounds"] == {}
    assert "top5" not in r  # C < 5


def test_batches_accumulate_like_one_batch_and_reset_zeroes():
    scores = torch.randn(50, 7)
    targets = torch.randint(0, 7, (50,))
    whole = ClassificationMetrics(7)
    whole.update(scores, targets)
    parts = ClassificationMetrics(7)
    for i in range(0, 50, 8):
        parts.update(scores[i:i + 8], targets[i:i + 8])
    assert same(parts.compute(), whole.compute())
    assert parts.num_samples == 50
    parts.reset()
    assert parts.num_samples == 0 and int(parts.topk_correct.sum()) == 0


def test_top5_counts_the_target_among_the_five_highest_scores():
    c = 8
    # Sample 0: target has the 5th highest score (a top-5 hit, a top-1 miss).
    # Sample 1: target has the 6th highest score (a miss). Sample 2: the highest (a hit).
    scores = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]] * 3)
    targets = torch.tensor([4, 5, 0])
    m = ClassificationMetrics(c, topk=(1, 5, 3))
    m.update(scores, targets)
    r = m.compute()
    assert r["top1"] == pytest.approx(1 / 3)
    assert r["top5"] == pytest.approx(2 / 3)
    assert r["top3"] == pytest.approx(1 / 3)
    # top-1 from the confusion matrix agrees with the top-k count for k = 1
    assert int(m.topk_correct[0]) == sum(r["confusion_matrix"][i][i] for i in range(c))


def test_topk_larger_than_num_classes_is_not_reported():
    m = ClassificationMetrics(4)  # topk=(1, 5)
    m.update(torch.randn(6, 4), torch.randint(0, 4, (6,)))
    assert "top5" not in m.compute()


def test_group_accuracy_is_the_mean_of_per_class_accuracies():
    counts = torch.tensor([500, 5, 50, 300, 10])  # many: 0, 3; medium: 2; few: 1, 4
    groups = many_medium_few_groups(counts)
    # class 0: 9/10 correct; class 3: 1/2 correct -> many = (0.9 + 0.5) / 2 = 0.7
    # (sample-weighted it would be 10/12 = 0.833)
    # class 2: 1/1; class 1: 0/2; class 4: 1/4 -> few = (0 + 0.25) / 2
    targets = [0] * 10 + [3] * 2 + [2] + [1] * 2 + [4] * 4
    preds = [0] * 9 + [1] + [3, 0] + [2] + [0, 0] + [4, 0, 0, 0]
    m = ClassificationMetrics(5)
    m.update(one_hot_scores(preds, 5), torch.tensor(targets))
    r = m.compute(groups)
    assert list(r["groups"]) == ["few", "medium", "many"]
    assert r["groups"]["many"] == pytest.approx(0.7)
    assert r["groups"]["medium"] == pytest.approx(1.0)
    assert r["groups"]["few"] == pytest.approx(0.125)
    assert r["group_bounds"] == {"few": [-math.inf, 19.0], "medium": [19.0, 100.0],
                                 "many": [100.0, math.inf]}
    assert r["balanced_accuracy"] == pytest.approx((0.9 + 0 + 1 + 0.5 + 0.25) / 5)
    assert r["top1"] == pytest.approx(12 / 19)
    assert r["top5"] == 1.0


def test_group_mask_of_the_wrong_size_is_rejected():
    groups = many_medium_few_groups(torch.tensor([1, 200, 50]))
    m = ClassificationMetrics(4)
    m.update(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"expected \(4,\) for 4 classes"):
        m.compute(groups)


def test_valid_mask_excludes_padded_samples_and_negative_targets_are_ignored():
    scores = torch.randn(10, 6)
    targets = torch.randint(0, 6, (10,))
    reference = ClassificationMetrics(6)
    reference.update(scores[:7], targets[:7])

    # As a distributed sampler pads a shard: rows 7..9 repeat rows 0..2 and are marked invalid;
    # one more row has an ignore label.
    padded_scores = torch.cat([scores[:7], scores[:3], torch.randn(1, 6)])
    padded_targets = torch.cat([targets[:7], targets[:3], torch.tensor([-100])])
    valid = torch.tensor([True] * 7 + [False] * 3 + [True])
    m = ClassificationMetrics(6)
    m.update(padded_scores, padded_targets, valid=valid)
    assert same(m.compute(), reference.compute())
    assert m.num_samples == 7

    unmasked = ClassificationMetrics(6)
    unmasked.update(padded_scores, padded_targets)
    assert unmasked.num_samples == 10  # the duplicates count when not masked


def test_classes_without_test_samples_are_nan_and_left_out_of_the_means():
    counts = torch.tensor([200, 50, 3, 2])  # many: 0; medium: 1; few: 2, 3
    groups = many_medium_few_groups(counts)
    m = ClassificationMetrics(4)
    # only classes 0 and 1 have test samples: 0 -> 1/2, 1 -> 1/1
    m.update(one_hot_scores([0, 2, 1], 4), torch.tensor([0, 0, 1]))
    r = m.compute(groups)
    pca = r["per_class_accuracy"]
    assert pca[:2] == pytest.approx([0.5, 1.0])
    assert math.isnan(pca[2]) and math.isnan(pca[3])
    assert r["balanced_accuracy"] == pytest.approx(0.75)
    assert math.isnan(r["groups"]["few"])  # no test sample in the group
    assert r["groups"]["many"] == pytest.approx(0.5)
    # everything is plain Python and survives a JSON round trip (NaN and inf included)
    back = json.loads(json.dumps(r))
    assert back["confusion_matrix"] == r["confusion_matrix"]
    assert math.isnan(back["groups"]["few"]) and back["group_bounds"]["many"][1] == math.inf


def test_no_sample_at_all_gives_nan_not_an_error():
    r = ClassificationMetrics(5).compute(many_medium_few_groups(torch.tensor([1, 2, 3, 4, 5])))
    assert r["num_samples"] == 0
    for key in ("top1", "top5", "balanced_accuracy"):
        assert math.isnan(r[key])
    assert all(math.isnan(v) for v in r["per_class_accuracy"])


def test_empty_batch_and_fully_masked_batch_count_nothing():
    m = ClassificationMetrics(3)
    m.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    m.update(torch.randn(2, 3), torch.tensor([0, 1]), valid=torch.tensor([False, False]))
    assert m.num_samples == 0


@pytest.mark.parametrize("scores, targets, valid, match", [
    (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), None, r"shape \[N, 5\], got \(4, 3\)"),
    (torch.randn(4, 5), torch.tensor([0, 1, 2]), None, r"shape \[4\].*got \(3,\)"),
    (torch.randn(2, 5), torch.tensor([0.0, 1.0]), None, "integer class indices, got dtype"),
    (torch.randn(2, 5), torch.tensor([0, 5]), None, r"in \[0, 5\).*found \[5\]"),
    (torch.randn(2, 5), torch.tensor([0, 1]), torch.tensor([1, 0]), "bool mask of shape"),
])
def test_bad_inputs_are_rejected_with_what_was_expected(scores, targets, valid, match):
    with pytest.raises(ValueError, match=match):
        ClassificationMetrics(5).update(scores, targets, valid)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        ClassificationMetrics(0)
    with pytest.raises(ValueError, match="positive ints, got"):
        ClassificationMetrics(3, topk=(0,))
    with pytest.raises(ValueError, match="must not repeat"):
        ClassificationMetrics(3, topk=(1, 1))


def test_sync_packs_all_states_into_one_all_reduce(monkeypatch):
    calls = []

    def fake_all_reduce(t):
        calls.append(t.clone())
        return t.mul_(2)  # as if a second rank had seen the same samples

    monkeypatch.setattr(eqlosses.distributed, "all_reduce_sum_", fake_all_reduce)
    m = ClassificationMetrics(6)
    m.update(one_hot_scores([0, 1, 2], 6), torch.tensor([0, 1, 1]))
    before = m.compute()
    m.sync()
    assert len(calls) == 1 and calls[0].dtype == torch.int64
    assert calls[0].numel() == 6 * 6 + 2  # confusion matrix + top-1 and top-5 counts
    after = m.compute()
    assert after["num_samples"] == 2 * before["num_samples"]
    assert after["confusion_matrix"] == [[2 * v for v in row] for row in
                                         before["confusion_matrix"]]
    assert after["top5"] == before["top5"]
    m.sync()  # a second sync before reset() must not double the totals again
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="call reset"):
        m.update(torch.randn(1, 6), torch.tensor([0]))
    m.reset()
    m.update(torch.randn(1, 6), torch.tensor([0]))
    assert m.num_samples == 1


def test_sync_without_process_group_changes_nothing():
    m = ClassificationMetrics(4)
    m.update(torch.randn(9, 4), torch.randint(0, 4, (9,)))
    before = m.compute()
    m.sync()
    assert same(m.compute(), before)


# --------------------------------------------------------------------------------------------
# A real two-process run (gloo on CPU)
# --------------------------------------------------------------------------------------------

WORLD = 2
JOIN_TIMEOUT_S = 90.0




def _eval_worker(rank, port, out_dir, shards, num_classes, counts):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        calls = []
        real = eqlosses.distributed.all_reduce_sum_

        def counting(t):
            calls.append(t.numel())
            return real(t)

        eqlosses.distributed.all_reduce_sum_ = counting  # what ConfusionMatrixState.sync calls
        scores, targets, valid = shards[rank]
        m = ClassificationMetrics(num_classes, topk=(1, 5))
        for i in range(0, scores.shape[0], 3):  # a few batches
            m.update(scores[i:i + 3], targets[i:i + 3], valid[i:i + 3])
        local = m.num_samples
        m.sync()
        result = {"metrics": m.compute(many_medium_few_groups(counts)), "calls": calls,
                  "local": local}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_sync_equals_one_process_on_all_samples(tmp_path: Path):
    c, n = 7, 13
    scores = torch.randn(n, c)
    targets = torch.randint(0, c, (n,))
    targets[3] = -100  # an ignored row
    counts = torch.tensor([300, 150, 60, 40, 12, 5, 1])

    # DistributedSampler(shuffle=False) style: rank r takes samples r, r + 2, ...; the 13
    # samples are padded to 14 by repeating sample 0, which is marked invalid.
    idx = torch.cat([torch.arange(n), torch.tensor([0])])
    is_pad = torch.tensor([False] * n + [True])
    shards = [(scores[idx[r::WORLD]], targets[idx[r::WORLD]], ~is_pad[r::WORLD])
              for r in range(WORLD)]

    spawn_and_wait(_eval_worker, (free_port(), str(tmp_path), shards, c, counts), WORLD,
                   JOIN_TIMEOUT_S, "the 2-process evaluation")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = ClassificationMetrics(c, topk=(1, 5))
    single.update(scores, targets)
    expected = single.compute(many_medium_few_groups(counts))

    assert expected["num_samples"] == n - 1
    assert results[0]["local"] + results[1]["local"] == n - 1  # the shards were partial
    for res in results:
        assert res["calls"] == [c * c + 2]  # exactly one all-reduce, of the packed states
        got = res["metrics"]
        assert got["confusion_matrix"] == expected["confusion_matrix"]
        assert got["num_samples"] == expected["num_samples"]
        for key in ("top1", "top5", "balanced_accuracy"):
            assert got[key] == pytest.approx(expected[key])
        assert got["groups"] == pytest.approx(expected["groups"], nan_ok=True)
    # both ranks hold the very same result (NaN included)
    assert same(results[0]["metrics"], results[1]["metrics"])


def test_custom_frequency_groups():
    # compute() accepts any FrequencyGroups, e.g. hand-built with other names
    groups = FrequencyGroups(masks={"head": torch.tensor([True, False]),
                                    "tail": torch.tensor([False, True])},
                             bounds={"head": (10.0, math.inf), "tail": (-math.inf, 10.0)})
    m = ClassificationMetrics(2, topk=(1,))
    m.update(one_hot_scores([0, 0], 2), torch.tensor([0, 1]))
    r = m.compute(groups)
    assert r["groups"] == {"head": 1.0, "tail": 0.0}
    assert r["group_bounds"] == {"head": [10.0, math.inf], "tail": [-math.inf, 10.0]}
