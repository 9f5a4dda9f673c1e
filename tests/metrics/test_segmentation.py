"""SegmentationMetrics: a loop reference, ignore pixels, NaN classes, dataset-level IoU,
frequency groups, one all-reduce, and a real two-process gloo run of sync()."""

import json
import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import eqlosses.distributed
from eqlosses.data.frequency import FrequencyGroups
from eqlosses.metrics.segmentation import SegmentationMetrics
from tests.dist_utils import free_port, spawn_and_wait

IGNORE = 255


def same(a, b):
    """Equality of compute() results, NaN included."""
    return json.dumps(a) == json.dumps(b)


def reference(preds, targets, num_classes, ignore=IGNORE):
    """Per-class IoU / accuracy by a plain loop over the pixels (from the definitions)."""
    tp = [0] * num_classes
    fp = [0] * num_classes
    fn = [0] * num_classes
    correct = total = 0
    for p, t in zip(preds.reshape(-1).tolist(), targets.reshape(-1).tolist()):
        if t == ignore:
            continue
        total += 1
        if p == t:
            tp[t] += 1
            correct += 1
        else:
            fp[p] += 1
            fn[t] += 1
    iou = [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else math.nan
           for c in range(num_classes)]
    acc = [tp[c] / (tp[c] + fn[c]) if tp[c] + fn[c] else math.nan for c in range(num_classes)]
    valid = [v for v in iou if not math.isnan(v)]
    valid_acc = [v for v in acc if not math.isnan(v)]
    return {"per_class_iou": iou, "miou": sum(valid) / len(valid),
            "pixel_accuracy": correct / total, "per_class_accuracy": acc,
            "mean_accuracy": sum(valid_acc) / len(valid_acc)}


def random_maps(b, h, w, c, ignore_share=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, c, (b, h, w), generator=g)
    targets[torch.rand(b, h, w, generator=g) < ignore_share] = IGNORE
    preds = torch.where(torch.rand(b, h, w, generator=g) < 0.5, targets.clamp(max=c - 1),
                        torch.randint(0, c, (b, h, w), generator=g))
    return preds, targets


@pytest.mark.parametrize("c, seed", [(2, 0), (5, 1), (9, 2)])
def test_matches_the_loop_reference_over_batches(c, seed):
    preds, targets = random_maps(6, 7, 9, c, seed=seed)
    m = SegmentationMetrics(c)
    for i in range(0, 6, 4):  # batches of 4 and 2
        m.update(preds[i:i + 4], targets[i:i + 4])
    got, ref = m.compute(), reference(preds, targets, c)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], nan_ok=True), key
    assert got["num_pixels"] == int((targets != IGNORE).sum())
    assert m.confusion.dtype == torch.int64 and m.confusion.shape == (c, c)
    # rows = ground truth, columns = prediction
    t0, p0 = int(targets[targets != IGNORE][0]), int(preds[targets != IGNORE][0])
    single = SegmentationMetrics(c)
    single.update(preds.reshape(-1)[targets.reshape(-1) != IGNORE][:1].view(1, 1, 1),
                  torch.tensor([[[t0]]]))
    assert single.confusion[t0, p0] == 1 and single.num_pixels == 1


def test_scores_are_reduced_by_argmax():
    logits = torch.randn(3, 4, 5, 6)
    targets = torch.randint(0, 4, (3, 5, 6))
    a, b = SegmentationMetrics(4), SegmentationMetrics(4)
    a.update(logits, targets)
    b.update(logits.argmax(1), targets)
    assert torch.equal(a.confusion, b.confusion)


def test_ignored_pixels_count_nowhere_whatever_is_predicted():
    preds, targets = random_maps(2, 6, 6, 4, ignore_share=0.4)
    a, b = SegmentationMetrics(4), SegmentationMetrics(4)
    a.update(preds, targets)
    other = preds.clone()
    other[targets == IGNORE] = 3
    b.update(other, targets)
    assert torch.equal(a.confusion, b.confusion)
    assert a.num_pixels == int((targets != IGNORE).sum())
    # another ignore label
    c = SegmentationMetrics(4, ignore_index=-100)
    c.update(preds, targets.masked_fill(targets == IGNORE, -100))
    assert torch.equal(c.confusion, a.confusion)
    # all pixels ignored: nothing counted, every metric NaN
    d = SegmentationMetrics(4)
    d.update(preds, torch.full_like(targets, IGNORE))
    r = d.compute()
    assert d.num_pixels == 0 and math.isnan(r["miou"]) and math.isnan(r["pixel_accuracy"])


def test_classes_absent_from_both_are_nan_and_predicted_only_classes_count_as_zero():
    targets = torch.tensor([[[0, 0, 1, 1]]])
    preds = torch.tensor([[[0, 2, 1, 1]]])  # class 2 only predicted, class 3 nowhere
    m = SegmentationMetrics(4)
    m.update(preds, targets)
    r = m.compute()
    assert r["per_class_iou"][:3] == [0.5, 1.0, 0.0] and math.isnan(r["per_class_iou"][3])
    assert r["miou"] == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3: class 3 left out
    assert r["per_class_accuracy"][:2] == [0.5, 1.0]
    assert all(math.isnan(v) for v in r["per_class_accuracy"][2:])
    assert r["mean_accuracy"] == pytest.approx(0.75)
    assert r["pixel_accuracy"] == pytest.approx(0.75)


def test_iou_is_dataset_level_not_a_mean_over_images():
    # image 1: class 0 perfect on 1 pixel; image 2: class 0 on 3 pixels, 1 of them wrong
    m = SegmentationMetrics(2)
    m.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]))
    m.update(torch.tensor([[[0, 0, 1, 1]]]), torch.tensor([[[0, 0, 0, 1]]]))
    r = m.compute()
    # class 0: TP 3, FN 1, FP 0 -> 3/4; class 1: TP 2, FP 1 -> 2/3
    assert r["per_class_iou"] == pytest.approx([0.75, 2 / 3])
    per_image_mean = (1.0 + 2 / 3) / 2  # what averaging image IoUs of class 0 would give
    assert r["per_class_iou"][0] != pytest.approx(per_image_mean)


def test_head_body_tail_groups_by_training_pixel_share():
    c = 5
    counts = torch.tensor([5000, 4000, 900, 95, 5])  # shares .5, .4, .09, .0095, .0005
    preds, targets = random_maps(4, 8, 8, c, seed=3)
    m = SegmentationMetrics(c)
    m.update(preds, targets)
    r = m.compute(pixel_share=counts, head_above=0.05, tail_below=0.001)
    iou = r["per_class_iou"]
    assert r["group_of"] == ["head", "head", "head", "body", "tail"]
    assert r["groups"]["head"] == pytest.approx(sum(iou[:3]) / 3)
    assert r["groups"]["body"] == pytest.approx(iou[3])
    assert r["groups"]["tail"] == pytest.approx(iou[4])
    assert r["group_bounds"] == {"head": [0.05, 1.0], "body": [0.001, 0.05],
                                 "tail": [0.0, 0.001]}
    # fractions give the same groups as counts; a share equal to a threshold is body
    same_r = m.compute(pixel_share=counts / counts.sum(), head_above=0.05, tail_below=0.001)
    assert same(same_r, r)
    dyadic = torch.tensor([0.5, 0.25, 0.125, 0.125 - 2 ** -7, 2 ** -7])  # exact in binary
    edge = m.compute(pixel_share=dyadic, head_above=0.125, tail_below=2 ** -7)
    assert edge["group_of"] == ["head", "head", "body", "body", "body"]
    assert math.isnan(edge["groups"]["tail"])  # an empty group
    # default thresholds: 1 % and 0.1 %
    default = m.compute(pixel_share=counts)
    assert default["group_bounds"]["head"][0] == 0.01 and default["group_bounds"]["tail"][1] \
        == 0.001
    assert default["group_of"] == ["head", "head", "head", "body", "tail"]
    # no share: no groups
    assert m.compute()["groups"] == {} and m.compute()["group_of"] == []
    # any FrequencyGroups works too
    custom = FrequencyGroups(masks={"a": torch.tensor([True] * 2 + [False] * 3),
                                    "b": torch.tensor([False] * 2 + [True] * 3)},
                             bounds={"a": (0, 1), "b": (1, 2)})
    assert m.compute(groups=custom)["groups"]["a"] == pytest.approx(sum(iou[:2]) / 2)
    json.dumps(r)  # serialisable


@pytest.mark.parametrize("share, kw, match", [
    (torch.ones(4), {}, r"shape \(5,\)"),
    (torch.tensor([1.0, -1, 0, 0, 0]), {}, "non-negative"),
    (torch.zeros(5), {}, "not all zero"),
    (torch.ones(5), dict(head_above=0.001, tail_below=0.01), "tail_below <= head_above"),
])
def test_bad_pixel_share(share, kw, match):
    m = SegmentationMetrics(5)
    with pytest.raises(ValueError, match=match):
        m.compute(pixel_share=share, **kw)


@pytest.mark.parametrize("preds, targets, match", [
    (torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(2, 3, 4, dtype=torch.long),
     "same"),
    (torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long), r"\[B, 3, H, W\]"),
    (torch.zeros(2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long), "integer classes"),
    (torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(2, 3, 3), "integer labels"),
    (torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long),
     "integer labels"),
    (torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[0, 3]]]), r"found \[3\]"),
    (torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[0, -1]]]), r"found \[-1\]"),
    (torch.tensor([[[0, 5]]]), torch.zeros(1, 1, 2, dtype=torch.long),
     r"predicted classes .* found \[5\]"),
])
def test_bad_inputs_say_what_was_expected(preds, targets, match):
    with pytest.raises(ValueError, match=match):
        SegmentationMetrics(3).update(preds, targets)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="positive int"):
        SegmentationMetrics(0)
    with pytest.raises(ValueError, match="outside the classes"):
        SegmentationMetrics(5, ignore_index=2)


def test_reset_and_state_dict_round_trip():
    preds, targets = random_maps(2, 5, 5, 3)
    m = SegmentationMetrics(3)
    m.update(preds, targets)
    state = m.state_dict()
    other = SegmentationMetrics(3)
    other.load_state_dict(state)
    assert same(other.compute(), m.compute())
    m.reset()
    assert m.num_pixels == 0
    with pytest.raises(ValueError, match="shape"):
        SegmentationMetrics(4).load_state_dict(state)


def test_sync_is_one_all_reduce_of_the_matrix(monkeypatch):
    calls = []

    def fake_all_reduce(t):
        calls.append(t.clone())
        return t.mul_(2)  # as if a second rank had seen the same pixels

    monkeypatch.setattr(eqlosses.distributed, "all_reduce_sum_", fake_all_reduce)
    preds, targets = random_maps(2, 5, 5, 4)
    m = SegmentationMetrics(4)
    m.update(preds, targets)
    before = m.compute()
    m.sync()
    # the one declared state, packed flat
    assert len(calls) == 1 and calls[0].dtype == torch.int64 and calls[0].shape == (4 * 4,)
    after = m.compute()
    assert after["num_pixels"] == 2 * before["num_pixels"]
    assert same(after["per_class_iou"], before["per_class_iou"])
    m.sync()  # no second reduction before reset()
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="call reset"):
        m.update(preds, targets)
    m.reset()
    m.update(preds, targets)
    assert m.num_pixels == before["num_pixels"]


def test_sync_without_process_group_changes_nothing():
    preds, targets = random_maps(2, 5, 5, 4)
    m = SegmentationMetrics(4)
    m.update(preds, targets)
    before = m.compute()
    m.sync()
    assert same(m.compute(), before)


# --------------------------------------------------------------------------------------------
# A real two-process run (gloo on CPU)
# --------------------------------------------------------------------------------------------

WORLD = 2


def _eval_worker(rank, port, out_dir, shards, num_classes, share):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        calls = []
        real = eqlosses.distributed.all_reduce_sum_

        def counting(t):
            calls.append(tuple(t.shape))
            return real(t)

        eqlosses.distributed.all_reduce_sum_ = counting  # what ConfusionMatrixState.sync calls
        preds, targets = shards[rank]
        m = SegmentationMetrics(num_classes)
        for i in range(preds.shape[0]):  # one image per batch
            m.update(preds[i:i + 1], targets[i:i + 1])
        local = m.num_pixels
        m.sync()
        torch.save({"metrics": m.compute(pixel_share=share), "calls": calls, "local": local,
                    "confusion": m.confusion.clone()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_sync_equals_one_process_on_all_images(tmp_path: Path):
    c = 6
    preds, targets = random_maps(5, 6, 7, c, seed=4)
    targets[targets == 5] = 4  # class 5 neither in the ground truth ...
    preds[preds == 5] = 3  # ... nor predicted: a NaN class on both ranks
    share = torch.tensor([0.6, 0.3, 0.05, 0.04, 0.0099, 0.0001])
    shards = [(preds[:3], targets[:3]), (preds[3:], targets[3:])]  # uneven halves
    spawn_and_wait(_eval_worker, (free_port(), str(tmp_path), shards, c, share), WORLD, 90.0,
                   "the 2-process segmentation evaluation")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = SegmentationMetrics(c)
    single.update(preds, targets)
    expected = single.compute(pixel_share=share)
    assert results[0]["local"] + results[1]["local"] == expected["num_pixels"]
    assert 0 < results[0]["local"] < expected["num_pixels"]
    for res in results:
        assert res["calls"] == [(c * c,)]  # exactly one all-reduce, of the packed matrix
        assert torch.equal(res["confusion"], single.confusion)
        assert same(res["metrics"], expected)
    assert math.isnan(expected["per_class_iou"][5])
