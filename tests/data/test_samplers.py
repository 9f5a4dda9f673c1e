import math
from collections import Counter

import numpy as np
import pytest
import torch

from eqlosses.data import LongTailSampler, repeat_factors


def _labels(counts, seed=0):
    """Shuffled labels with ``counts[c]`` samples of class ``c``."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


# -- repeat factors --------------------------------------------------------------------------

def test_repeat_factors_single_label_formula():
    labels = _labels([90, 8, 2])
    r = repeat_factors(labels, 3, threshold=0.1)
    assert r.dtype == torch.float64 and r.shape == (100,)
    r_class = np.maximum(1.0, np.sqrt(0.1 / np.array([0.9, 0.08, 0.02])))
    torch.testing.assert_close(r, torch.from_numpy(r_class[labels]))
    # a tensor or a list gives the same; the default threshold leaves these frequent classes at 1
    torch.testing.assert_close(repeat_factors(torch.as_tensor(labels), 3, 0.1), r)
    torch.testing.assert_close(repeat_factors(labels.tolist(), 3, 0.1), r)
    assert (repeat_factors(labels, 3) == 1).all()


def test_repeat_factors_per_image_takes_the_rarest_class_and_counts_images_once():
    images = [[0, 0, 0, 0], [0, 1], [0], [], [2, 0]]
    # image frequencies: class 0 in 4/5 images, 1 in 1/5, 2 in 1/5 (repeats count once)
    r = repeat_factors(images, 4, threshold=0.5)
    r0, r1 = max(1.0, math.sqrt(0.5 / 0.8)), math.sqrt(0.5 / 0.2)
    torch.testing.assert_close(r, torch.tensor([r0, r1, r0, 1.0, r1], dtype=torch.float64))
    torch.testing.assert_close(
        repeat_factors([np.array([0, 0, 0, 0]), torch.tensor([0, 1]), (0,), [], [2, 0]], 4, 0.5),
        r)


@pytest.mark.parametrize("labels, kwargs, match", [
    ([0, 3], {}, r"\[0, 3\), found 3"),
    ([[0], [5]], {}, r"\[0, 3\), found 5"),
    ([0, [1]], {}, "mix integers and label lists"),
    ([[0.5]], {}, "integers"),
    (np.zeros((2, 2), np.int64), {}, "1-d"),
    ([0, 1], {"threshold": 0.0}, "threshold"),
])
def test_repeat_factors_errors(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        repeat_factors(labels, 3, **kwargs)


# -- epoch lists -----------------------------------------------------------------------------

def test_instance_is_a_permutation_deterministic_in_seed_and_epoch():
    labels = _labels([30, 10, 3])
    s = LongTailSampler(labels, 3, seed=5)
    e0 = list(s)
    assert sorted(e0) == list(range(43)) and len(s) == 43
    assert list(s) == e0                                   # no set_epoch: the same epoch again
    assert list(LongTailSampler(labels, 3, seed=5)) == e0  # a new sampler, same seed
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e1) == list(range(43)) and e1 != e0
    assert list(LongTailSampler(labels, 3, seed=6)) != e0
    np.testing.assert_array_equal(s.epoch_indices(0), e0)


def test_ranks_partition_the_epoch_with_padding():
    labels = _labels([6, 4, 1])                           # 11 samples, 3 ranks: pad to 12
    per_rank = [list(LongTailSampler(labels, 3, num_replicas=3, rank=r, seed=2))
                for r in range(3)]
    epoch = LongTailSampler(labels, 3, seed=2).epoch_indices(0).tolist()
    assert [len(p) for p in per_rank] == [4, 4, 4]
    interleaved = [per_rank[i % 3][i // 3] for i in range(12)]
    assert interleaved == epoch + epoch[:1]                # padded with the list's start
    union = Counter(sum(per_rank, []))
    assert set(union) == set(epoch)                        # covers the epoch
    assert sum(union.values()) - len(union) == 1           # disjoint apart from the padding


def test_ranks_with_drop_last_are_disjoint():
    labels = _labels([6, 4, 1])
    per_rank = [list(LongTailSampler(labels, 3, mode="sqrt", num_replicas=2, rank=r,
                                     drop_last=True)) for r in range(2)]
    epoch = LongTailSampler(labels, 3, mode="sqrt").epoch_indices(0).tolist()
    assert [len(p) for p in per_rank] == [5, 5]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(epoch[:10])


def test_defaults_to_one_process_without_a_process_group():
    assert not torch.distributed.is_initialized()
    s = LongTailSampler([0, 1, 1], 2)
    assert (s.num_replicas, s.rank) == (1, 0)


@pytest.mark.parametrize("mode, weights", [("class_balanced", lambda n: np.ones_like(n)),
                                           ("sqrt", np.sqrt)])
def test_class_frequencies_follow_the_mode(mode, weights):
    counts = np.array([400, 40, 4, 1])
    labels = _labels(counts)
    s = LongTailSampler(labels, 4, mode=mode, seed=0)
    drawn = []
    for epoch in range(4):                                 # 4 x 445 = 1780 draws
        s.set_epoch(epoch)
        drawn += list(s)
    freq = np.bincount(labels[drawn], minlength=4) / len(drawn)
    expected = weights(counts.astype(float)) / weights(counts.astype(float)).sum()
    # binomial standard deviation <= 0.012 here: allow about 4 of them
    np.testing.assert_allclose(freq, expected, atol=0.05)
    np.testing.assert_allclose(s.class_probs, expected)
    # within a class the draw is uniform: each of the 4 samples of class 2 is drawn
    assert set(np.flatnonzero(labels == 2)) <= set(drawn)


def test_class_balanced_skips_empty_classes():
    s = LongTailSampler([0, 0, 0, 2], 3, mode="class_balanced", seed=1)
    assert s.class_probs.tolist() == [0.5, 0.0, 0.5]
    drawn = [i for e in range(20) for i in (s.set_epoch(e), list(s))[1]]
    assert 3 in drawn and len(drawn) == 80
    assert 0.3 < drawn.count(3) / 80 < 0.7


def test_rfs_repeats_rare_samples_and_length_matches_the_factors():
    labels = _labels([90, 8, 2])
    s = LongTailSampler(labels, 3, mode="rfs", rfs_threshold=0.1, seed=0)
    r = repeat_factors(labels, 3, 0.1).numpy()
    torch.testing.assert_close(s.repeat_factors, torch.from_numpy(r))
    lengths, rare_counts = [], []
    rare = np.flatnonzero(labels == 2)                     # r = sqrt(5) = 2.236
    for epoch in range(100):
        s.set_epoch(epoch)
        drawn = list(s)
        assert len(drawn) == len(s)
        c = Counter(drawn)
        assert set(c) == set(range(100))                   # every sample at least once
        assert all(c[i] == 1 for i in np.flatnonzero(labels == 0))
        assert all(c[i] in (2, 3) for i in rare)
        lengths.append(len(drawn))
        rare_counts += [c[i] for i in rare]
    assert abs(np.mean(lengths) - r.sum()) < 0.5           # sum r_i = 103.42; sd of mean 0.11
    assert abs(np.mean(rare_counts) - math.sqrt(5)) < 0.15


def test_rfs_and_instance_accept_detection_labels():
    images = [[0, 0, 1], [0], [0], [0], [], [2]]
    s = LongTailSampler(images, 3, mode="rfs", rfs_threshold=0.5, seed=0)
    c = Counter(list(s))
    assert set(c) == set(range(6))
    # class 2 is in 1 image of 6: r = sqrt(0.5 * 6) = 1.73, so image 5 appears once or twice
    assert c[5] in (1, 2) and c[4] == 1
    assert sorted(LongTailSampler(images, 3, mode="instance")) == list(range(6))
    with pytest.raises(ValueError, match="one class per sample"):
        LongTailSampler(images, 3, mode="class_balanced")


# -- resuming --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["instance", "class_balanced", "sqrt", "rfs"])
def test_resume_mid_epoch_equals_uninterrupted(mode):
    labels = _labels([40, 10, 3])
    kwargs = dict(mode=mode, rfs_threshold=0.2, num_replicas=2, rank=1, seed=3)
    full = LongTailSampler(labels, 3, **kwargs)
    full.set_epoch(4)
    reference = list(full)
    full.set_epoch(5)
    reference_next = list(full)

    first = LongTailSampler(labels, 3, **kwargs)
    first.set_epoch(4)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    assert state == {"epoch": 4, "position": 7}

    resumed = LongTailSampler(labels, 3, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)          # the epoch loop calls this again: the position is kept
    assert len(resumed) == len(reference)                  # len is the full epoch
    assert head + list(resumed) == reference
    assert resumed.state_dict() == {"epoch": 4, "position": len(reference)}
    resumed.set_epoch(5)
    assert list(resumed) == reference_next


def test_position_counts_batches_taken_from_a_dataloader():
    labels = _labels([20, 5])
    s = LongTailSampler(labels, 2, seed=0)
    loader = torch.utils.data.DataLoader(torch.arange(25), batch_size=4, sampler=s)
    it = iter(loader)
    got = torch.cat([next(it), next(it)]).tolist()
    assert s.state_dict() == {"epoch": 0, "position": 8}
    resumed = LongTailSampler(labels, 2, seed=0)
    resumed.load_state_dict(s.state_dict())
    rest = torch.cat(list(torch.utils.data.DataLoader(torch.arange(25), batch_size=4,
                                                      sampler=resumed))).tolist()
    assert got + rest == s.epoch_indices(0).tolist()


def test_state_errors_and_epoch_change_resets_position():
    s = LongTailSampler([0, 1, 1, 0], 2, num_replicas=2, rank=0)
    s.load_state_dict({"epoch": 1, "position": 1})
    s.set_epoch(2)
    assert s.state_dict() == {"epoch": 2, "position": 0}
    with pytest.raises(ValueError, match=r"position must be an integer >= 0.*got -1"):
        s.load_state_dict({"epoch": 0, "position": -1})
    assert s.state_dict() == {"epoch": 2, "position": 0}   # a rejected state changes nothing
    with pytest.raises(ValueError, match="missing \\['position'\\]"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        s.set_epoch(-1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="balanced"), "mode must be one of"),
    (dict(num_replicas=2, rank=2), r"rank must be in \[0, 2\)"),
    (dict(num_replicas=0, rank=0), "num_replicas must be >= 1"),
    (dict(seed=-1), "seed must be an integer >= 0"),
])
def test_sampler_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LongTailSampler([0, 1], 2, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        LongTailSampler([], 2)


def test_end_of_epoch_loaded_yields_nothing_iterated_starts_over():
    labels = _labels([5, 2])                                # 7 samples, batches of 4: 8 > 7
    s = LongTailSampler(labels, 2, seed=0)
    s.load_state_dict({"epoch": 3, "position": 8})          # batches done x batch size
    assert s.state_dict() == {"epoch": 3, "position": 7}    # past the end counts as the end
    s.set_epoch(3)
    assert list(s) == []                                    # nothing left of epoch 3
    again = list(s)                                         # then the epoch starts over
    assert again == s.epoch_indices(3).tolist()
    assert list(s) == again
