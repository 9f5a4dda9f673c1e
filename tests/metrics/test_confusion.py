"""ConfusionMatrixState: the one confusion-matrix state of the classification and segmentation
metrics: a hand-computed matrix, ignore index and valid mask, declared states, reset,
state_dict round trip, device moves, bad inputs, and one all-reduce per metric object."""

import pytest
import torch

import eqlosses.distributed
from eqlosses.metrics import ClassificationMetrics, ConfusionMatrixState, SegmentationMetrics


def test_update_gives_the_hand_computed_matrix():
    # true: 0 0 0 1 1 2 2
    # pred: 0 1 0 1 2 2 0
    s = ConfusionMatrixState(3)
    s.update(torch.tensor([0, 1, 0, 1, 2, 2, 0]), torch.tensor([0, 0, 0, 1, 1, 2, 2]))
    assert s.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert s.confusion.dtype == torch.int64
    # any shape (flattened), accumulating over calls
    s.update(torch.tensor([[2, 2]]), torch.tensor([[1, 2]]))
    assert s.confusion.tolist() == [[2, 1, 0], [0, 1, 2], [1, 0, 2]]


def test_ignore_index_and_valid_mask_count_nowhere():
    s = ConfusionMatrixState(3, ignore_index=255)
    # an ignored target counts nowhere, even with an out-of-range prediction there
    s.update(torch.tensor([0, 7, 1, 2]), torch.tensor([0, 255, 1, 1]),
             valid=torch.tensor([True, True, False, True]))
    assert s.confusion.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    # another ignore label: -1 is then an error, not ignored
    s = ConfusionMatrixState(3, ignore_index=-100)
    s.update(torch.tensor([0, 1]), torch.tensor([-100, 1]))
    assert s.confusion.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match=r"\[0, 3\) or ignore_index=-100, found \[-1\]"):
        s.update(torch.tensor([0]), torch.tensor([-1]))
    # ignore_index=None: every negative target is ignored
    s = ConfusionMatrixState(3)
    s.update(torch.tensor([0, 1, 2]), torch.tensor([-1, -100, 2]))
    assert int(s.confusion.sum()) == 1 and int(s.confusion[2, 2]) == 1


def test_count_returns_the_kept_mask():
    s = ConfusionMatrixState(2, ignore_index=9)
    keep = s._count(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[9, 1], [0, 1]]),
                    torch.tensor([[True, True], [False, True]]))
    assert keep.tolist() == [False, True, False, True]


def test_declared_states_reset_and_state_dict_round_trip():
    s = ConfusionMatrixState(2)
    s.add_state("hits", torch.zeros(3, dtype=torch.int64))
    assert s.state_names == ["confusion", "hits"]
    s.update(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))
    s.hits += torch.tensor([1, 2, 3])
    state = s.state_dict()
    assert set(state) == {"confusion", "hits"}
    state["hits"][0] = 99  # a copy: the state itself is untouched
    assert s.hits.tolist() == [1, 2, 3]

    other = ConfusionMatrixState(2)
    other.add_state("hits", torch.zeros(3, dtype=torch.int64))
    other.load_state_dict(s.state_dict())
    assert torch.equal(other.confusion, s.confusion) and torch.equal(other.hits, s.hits)

    s.reset()
    assert int(s.confusion.sum()) == 0 and int(s.hits.sum()) == 0
    assert other.confusion.tolist() == [[1, 1], [0, 1]]  # loaded values are not shared


def test_load_state_dict_rejects_other_names_and_shapes():
    s = ConfusionMatrixState(2)
    with pytest.raises(ValueError, match=r"missing \['confusion'\], unknown \['conf'\]"):
        s.load_state_dict({"conf": torch.zeros(2, 2, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"confusion must have shape \(2, 2\), got \(3, 3\)"):
        s.load_state_dict({"confusion": torch.zeros(3, 3, dtype=torch.int64)})
    # a classification state does not load into a segmentation metric
    with pytest.raises(ValueError, match=r"unknown \['topk_correct'\]"):
        SegmentationMetrics(4).load_state_dict(ClassificationMetrics(4).state_dict())


def test_classification_state_dict_round_trip_resumes_an_evaluation():
    scores, targets = torch.randn(20, 6), torch.randint(0, 6, (20,))
    whole = ClassificationMetrics(6, topk=(1, 3))
    whole.update(scores, targets)
    first = ClassificationMetrics(6, topk=(1, 3))
    first.update(scores[:11], targets[:11])
    resumed = ClassificationMetrics(6, topk=(1, 3))
    resumed.load_state_dict(first.state_dict())
    resumed.update(scores[11:], targets[11:])
    assert resumed.compute() == whole.compute()


def test_to_moves_every_declared_state():
    s = ConfusionMatrixState(2)
    s.add_state("extra", torch.zeros(1, dtype=torch.int64))
    assert s.device == torch.device("cpu")
    assert s.to("meta") is s  # meta: a second device that every machine has
    assert s.device.type == "meta" and s.extra.device.type == "meta"
    fixed = ConfusionMatrixState(2, device="meta")
    assert fixed.confusion.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_states_follow_the_inputs_unless_a_device_is_given():
    m = ClassificationMetrics(4, topk=(1, 2))
    m.update(torch.randn(5, 4, device="cuda"), torch.randint(0, 4, (5,), device="cuda"))
    assert m.confusion.is_cuda and m.topk_correct.is_cuda
    fixed = ClassificationMetrics(4, topk=(1, 2), device="cpu")
    fixed.update(torch.randn(5, 4, device="cuda"), torch.randint(0, 4, (5,), device="cuda"))
    assert not fixed.confusion.is_cuda and not fixed.topk_correct.is_cuda
    assert fixed.compute() == m.compute()


@pytest.mark.parametrize("preds, targets, valid, match", [
    (torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), None,
     "targets must be integer class indices, got dtype torch.float32"),
    (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), None,
     "predictions must be integer class indices, got dtype torch.float32"),
    (torch.tensor([0, 1, 1]), torch.tensor([0, 1]), None,
     r"predictions \(3,\) and targets \(2,\) must have the same shape"),
    (torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1, 1]),
     r"valid must be a bool mask of shape \(2,\), got dtype torch.int64"),
    (torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([True]),
     r"valid must be a bool mask of shape \(2,\), got .* shape \(1,\)"),
    (torch.tensor([0, 1]), torch.tensor([0, 3]), None,
     r"targets must be in \[0, 3\) or ignore_index=255, found \[3\]"),
    (torch.tensor([0, 4]), torch.tensor([0, 1]), None,
     r"predicted classes must be in \[0, 3\), found \[4\]"),
    (torch.tensor([0, -1]), torch.tensor([0, 1]), None,
     r"predicted classes must be in \[0, 3\), found \[-1\]"),
])
def test_bad_inputs_say_what_was_expected(preds, targets, valid, match):
    s = ConfusionMatrixState(3, ignore_index=255)
    with pytest.raises(ValueError, match=match):
        s.update(preds, targets, valid)
    assert int(s.confusion.sum()) == 0  # nothing counted from a rejected batch


@pytest.mark.parametrize("args, match", [
    ((0,), "num_classes must be a positive int, got 0"),
    ((True,), "num_classes must be a positive int, got True"),
    ((3, 1), r"ignore_index must lie outside the classes \[0, 3\), got 1"),
    ((3, 1.5), "ignore_index must be an int or None, got 1.5"),
])
def test_bad_constructor_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        ConfusionMatrixState(*args)


@pytest.mark.parametrize("name, default, reduction, match", [
    ("confusion", torch.zeros(1, dtype=torch.int64), "sum", "already taken"),
    ("device", torch.zeros(1, dtype=torch.int64), "sum", "already taken"),
    ("_hidden", torch.zeros(1, dtype=torch.int64), "sum", "public identifier"),
    ("hits", torch.zeros(1), "sum", "must be an int64 tensor, got torch.float32"),
    ("hits", [0, 0], "sum", "must be an int64 tensor, got list"),
    ("hits", torch.zeros(1, dtype=torch.int64), "max", r"one of \('sum',\)"),
])
def test_bad_state_declarations(name, default, reduction, match):
    with pytest.raises(ValueError, match=match):
        ConfusionMatrixState(2).add_state(name, default, reduction)


def make_classification():
    m = ClassificationMetrics(5, topk=(1, 2, 5))
    m.update(torch.randn(8, 5), torch.randint(0, 5, (8,)))
    return m, 5 * 5 + 3


def make_segmentation():
    m = SegmentationMetrics(4)
    m.update(torch.randint(0, 4, (2, 3, 3)), torch.randint(0, 4, (2, 3, 3)))
    return m, 4 * 4


def make_state():
    s = ConfusionMatrixState(3)
    s.add_state("a", torch.zeros(2, 2, dtype=torch.int64))
    s.add_state("b", torch.zeros(4, dtype=torch.int64))
    s.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    s.a += 1
    s.b += torch.arange(4)
    return s, 3 * 3 + 4 + 4


@pytest.mark.parametrize("make", [make_classification, make_segmentation, make_state])
def test_sync_is_exactly_one_collective_per_metric_object(monkeypatch, make):
    calls = []

    def counting(t):  # sums nothing: one process's view of a group of one
        calls.append(t.numel())
        return t

    monkeypatch.setattr(eqlosses.distributed, "all_reduce_sum_", counting)
    m, packed_numel = make()
    before = m.state_dict()
    m.sync()
    assert calls == [packed_numel]  # every declared state, in one packed tensor
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # unpacked in place
    m.sync()  # a second sync before reset() communicates nothing
    assert calls == [packed_numel]


def test_sync_unpacks_every_state_in_declaration_order(monkeypatch):
    # a fake all-reduce that adds a distinct number to each packed position: each state must
    # get back exactly its own slice
    monkeypatch.setattr(eqlosses.distributed, "all_reduce_sum_",
                        lambda t: t.add_(torch.arange(t.numel())))
    s, _ = make_state()
    before = s.state_dict()
    s.sync()
    assert torch.equal(s.confusion, before["confusion"] + torch.arange(9).view(3, 3))
    assert torch.equal(s.a, before["a"] + torch.arange(9, 13).view(2, 2))
    assert torch.equal(s.b, before["b"] + torch.arange(13, 17))
    with pytest.raises(RuntimeError, match=r"ConfusionMatrixState.update\(\) after sync"):
        s.update(torch.tensor([0]), torch.tensor([0]))
    s.reset()
    s.update(torch.tensor([0]), torch.tensor([0]))
    assert int(s.confusion.sum()) == 1


def test_metrics_share_the_state_class():
    assert issubclass(ClassificationMetrics, ConfusionMatrixState)
    assert issubclass(SegmentationMetrics, ConfusionMatrixState)
    assert ClassificationMetrics(3).state_names == ["confusion", "topk_correct"]
    assert SegmentationMetrics(3).state_names == ["confusion"]
