import pytest
import torch

from eqlosses.data import (class_counts, class_frequency, image_counts, lvis_groups,
                           many_medium_few_groups)


def test_class_counts_skip_background_and_ignore():
    labels = torch.tensor([[0, 1, 1], [3, -100, 2]])
    assert class_counts(labels, 3).tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="found 7"):
        class_counts(torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="integers"):
        class_counts(torch.tensor([0.0]), 3)


def test_image_counts_count_each_image_once():
    assert image_counts([[2, 2, 2], [0, 2], [], [1]], 4).tolist() == [1, 1, 2, 0]
    with pytest.raises(ValueError):
        image_counts([[4]], 4)


def test_frequency():
    torch.testing.assert_close(class_frequency(torch.tensor([1, 3])),
                               torch.tensor([0.25, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError):
        class_frequency(torch.tensor([0, 0]))


def test_lvis_groups_use_lvis_thresholds():
    counts = torch.tensor([0, 1, 10, 11, 100, 101, 5000])
    g = lvis_groups(counts)
    assert g.group_of() == ["rare", "rare", "rare", "common", "common", "frequent", "frequent"]
    assert g.indices("common").tolist() == [3, 4]
    assert g.bounds["rare"][1] == 10
    # the groups partition the classes
    total = sum(m.long() for m in g.masks.values())
    assert (total == 1).all()


def test_many_medium_few_groups_with_custom_thresholds():
    counts = torch.tensor([5, 19, 20, 100, 101])
    assert many_medium_few_groups(counts).group_of() == ["few", "few", "medium", "medium", "many"]
    g = many_medium_few_groups(counts, few_below=6, many_above=50)
    assert g.group_of() == ["few", "medium", "medium", "many", "many"]
    with pytest.raises(ValueError, match="increase"):
        many_medium_few_groups(counts, few_below=200, many_above=100)
