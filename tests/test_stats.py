import pytest
import torch

from eqlosses import GradientStatistics


def test_buffers_are_registered_float64_and_persistent():
    stats = GradientStatistics(4)
    assert set(stats.state_dict()) == {"pos_grad", "neg_grad", "num_updates", "num_skipped"}
    assert stats.pos_grad.dtype == torch.float64 and stats.pos_grad.shape == (4,)


def test_update_accumulates_and_ratio():
    stats = GradientStatistics(3)
    assert stats.update(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, 4.0, 0.0]))
    assert stats.update(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([2.0, 4.0, 0.0]))
    assert stats.pos_grad.tolist() == [2.0, 1.0, 0.0]
    assert stats.neg_grad.tolist() == [4.0, 8.0, 0.0]
    ratio = stats.ratio(init=100.0)
    torch.testing.assert_close(ratio, torch.tensor([0.5, 0.125, 100.0], dtype=torch.float64))
    assert int(stats.num_updates) == 2


def test_float32_increments_accumulate_in_float64():
    stats = GradientStatistics(1)
    for _ in range(1000):
        stats.update(torch.tensor([0.1], dtype=torch.float32), torch.tensor([1e-8]))
    expected = 1000 * float(torch.tensor(0.1, dtype=torch.float32))
    assert abs(stats.pos_grad.item() - expected) < 1e-9


def test_shape_checks_and_bad_arguments():
    stats = GradientStatistics(3)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        stats.update(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="positive int"):
        GradientStatistics(0)
    with pytest.raises(ValueError, match="dtype"):
        GradientStatistics(3, dtype=torch.float16)


def test_reset_and_float32_option():
    stats = GradientStatistics(2, dtype=torch.float32)
    stats.update(torch.ones(2), torch.ones(2))
    assert stats.pos_grad.dtype == torch.float32
    stats.reset()
    assert stats.pos_grad.sum() == 0 and int(stats.num_updates) == 0


def test_load_float32_checkpoint_keeps_float64():
    src = GradientStatistics(2, dtype=torch.float32)
    src.update(torch.tensor([0.5, 1.0]), torch.tensor([2.0, 3.0]))
    dst = GradientStatistics(2)
    dst.load_state_dict(src.state_dict())
    assert dst.pos_grad.dtype == torch.float64 and dst.pos_grad.tolist() == [0.5, 1.0]


def test_non_finite_increments_are_skipped_on_the_device_and_counted():
    """``num_updates`` counts applied updates, ``num_skipped`` skipped ones (their sum is the
    number of calls); a skipped update leaves the accumulators exactly as they were."""
    import warnings

    stats = GradientStatistics(2)
    stats.update(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    before = stats.state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = [stats.update(torch.tensor([float("nan"), 1.0]), torch.ones(2)),
                   stats.update(torch.ones(2), torch.tensor([float("inf"), 0.0])),
                   stats.update(torch.tensor([0.5, 0.5]), torch.zeros(2))]
    assert [bool(a) for a in applied] == [False, False, True]
    assert all(a.dtype == torch.bool and a.shape == () for a in applied)
    assert sum("non-finite" in str(w.message) for w in caught) == 1  # warned once
    assert int(stats.num_updates) == 2 and int(stats.num_skipped) == 2
    assert stats.pos_grad.tolist() == [1.5, 2.5] and stats.neg_grad.tolist() == [3.0, 4.0]
    stats.num_updates -= 1
    stats.pos_grad -= torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert torch.equal(stats.pos_grad, before["pos_grad"])


def test_update_without_warning_reads_nothing_on_the_host(monkeypatch):
    stats = GradientStatistics(2)
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host read"))
    stats.update(torch.tensor([float("nan"), 1.0]), torch.ones(2), warn=False)
    stats.update(torch.ones(2), torch.ones(2), warn=False)
    monkeypatch.undo()
    assert int(stats.num_updates) == 1 and int(stats.num_skipped) == 1


def test_extra_increments_travel_in_the_same_all_reduce_under_the_same_decision(monkeypatch):
    """A loss's own per-class sums ride along: one collective for all rows, summed over the
    processes (here a fake sum that doubles), and zeroed when the update is skipped."""
    import eqlosses.stats as stats_module

    calls = []

    def fake_all_reduce(t):
        calls.append(tuple(t.shape))
        return t.mul_(2)  # as if a second process held the same increments

    monkeypatch.setattr(stats_module, "all_reduce_sum_", fake_all_reduce)
    stats = GradientStatistics(2)
    extra = torch.tensor([[0.25, 0.5]])
    assert bool(stats.update(torch.ones(2), torch.ones(2), extra=extra))
    assert calls == [(3, 2)]
    assert extra.tolist() == [[0.5, 1.0]] and stats.pos_grad.tolist() == [2.0, 2.0]
    extra = torch.tensor([[float("nan"), 1.0]])
    assert not bool(stats.update(torch.ones(2), torch.ones(2), extra=extra, warn=False))
    assert extra.tolist() == [[0.0, 0.0]] and stats.pos_grad.tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match=r"\[K, 2\]"):
        stats.update(torch.ones(2), torch.ones(2), extra=torch.ones(3))
