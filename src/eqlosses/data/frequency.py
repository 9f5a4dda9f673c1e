"""Class counts, frequencies and frequency groups (LVIS rare/common/frequent; many/medium/few).

Torch only. The thresholds are arguments; the defaults are the literature's:

- LVIS (by training *image* count): rare 1-10, common 11-100, frequent > 100.
- ImageNet-LT / Places-LT / iNaturalist (by training *sample* count): few < 20,
  medium 20-100, many > 100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Tuple

import torch

__all__ = ["class_counts", "image_counts", "class_frequency", "FrequencyGroups", "lvis_groups",
           "many_medium_few_groups", "head_to_tail"]


def class_counts(labels: torch.Tensor, num_classes: int, ignore_index: int = -100
                 ) -> torch.Tensor:
    """Number of samples of each class ``[C]`` (int64) from integer labels of any shape.

    Labels equal to ``ignore_index`` or to ``num_classes`` (background) are not counted; any
    other value outside ``[0, C)`` is an error.

    >>> class_counts(torch.tensor([0, 0, 2, 3, -100]), num_classes=3)
    tensor([2, 0, 1])
    """
    labels = torch.as_tensor(labels)
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    flat = labels.reshape(-1).long()
    flat = flat[(flat != ignore_index) & (flat != num_classes)]
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_classes):
        bad = flat[(flat < 0) | (flat >= num_classes)][0].item()
        raise ValueError(f"labels must be in [0, {num_classes}] or {ignore_index}, found {bad}")
    return torch.bincount(flat, minlength=num_classes)


def image_counts(labels_per_image: Iterable[Iterable[int]], num_classes: int) -> torch.Tensor:
    """Number of images containing each class ``[C]``: each image counts once per class.

    >>> image_counts([[0, 0, 1], [1], []], num_classes=3)
    tensor([1, 2, 0])
    """
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for labels in labels_per_image:
        present = torch.unique(torch.as_tensor(list(labels), dtype=torch.int64))
        if present.numel():
            if int(present.min()) < 0 or int(present.max()) >= num_classes:
                raise ValueError(f"image labels must be in [0, {num_classes}), got "
                                 f"{present.tolist()}")
            counts[present] += 1
    return counts


def class_frequency(counts: torch.Tensor, total: int | float | None = None) -> torch.Tensor:
    """``counts / total`` as float64; ``total`` defaults to ``counts.sum()``.

    For EQL's ``lambda_`` use image counts divided by the number of training images.

    >>> class_frequency(torch.tensor([3, 1]), total=8)
    tensor([0.3750, 0.1250], dtype=torch.float64)
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    total = float(counts.sum()) if total is None else float(total)
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    return counts / total


_HEAD_TO_TAIL = ("many", "frequent", "head", "medium", "common", "body", "few", "rare", "tail")


def head_to_tail(names: Iterable[str]) -> list[str]:
    """Group names ordered from the most to the least frequent (unknown names last).

    >>> head_to_tail(["few", "medium", "many"])
    ['many', 'medium', 'few']
    """
    order = {name: i for i, name in enumerate(_HEAD_TO_TAIL)}
    return sorted(names, key=lambda n: order.get(n, len(order)))


@dataclass(frozen=True)
class FrequencyGroups:
    """A partition of the classes into named groups by training count.

    ``masks[name]`` is a ``[C]`` bool mask; ``bounds`` records the thresholds used, so that
    reports can state them.
    """

    masks: Dict[str, torch.Tensor]
    bounds: Dict[str, Tuple[float, float]]

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self.masks)

    def indices(self, name: str) -> torch.Tensor:
        return self.masks[name].nonzero().squeeze(1)

    def group_of(self) -> list[str]:
        """The group name of each class, in class order."""
        c = next(iter(self.masks.values())).numel()
        out = [""] * c
        for name, mask in self.masks.items():
            for i in mask.nonzero().squeeze(1).tolist():
                out[i] = name
        return out


def _three_groups(counts, names, low_max, mid_max) -> FrequencyGroups:
    counts = torch.as_tensor(counts)
    if counts.dim() != 1:
        raise ValueError(f"counts must be a 1-d tensor [C], got shape {tuple(counts.shape)}")
    if not low_max < mid_max:
        raise ValueError(f"thresholds must increase, got {low_max} and {mid_max}")
    low = counts <= low_max
    high = counts > mid_max
    mid = ~low & ~high
    inf = float("inf")
    return FrequencyGroups(
        masks={names[0]: low, names[1]: mid, names[2]: high},
        bounds={names[0]: (-inf, low_max), names[1]: (low_max, mid_max),
                names[2]: (mid_max, inf)},
    )


def lvis_groups(image_counts: torch.Tensor, rare_max: int = 10, common_max: int = 100
                ) -> FrequencyGroups:
    """LVIS groups by training image count: rare ``<= rare_max``, common ``<= common_max``,
    frequent above. Classes with no image fall in ``rare``.

    >>> lvis_groups(torch.tensor([1, 10, 11, 100, 101])).group_of()
    ['rare', 'rare', 'common', 'common', 'frequent']
    """
    return _three_groups(image_counts, ("rare", "common", "frequent"), rare_max, common_max)


def many_medium_few_groups(counts: torch.Tensor, few_below: int = 20, many_above: int = 100
                           ) -> FrequencyGroups:
    """ImageNet-LT groups by training sample count: few ``< few_below``, many
    ``> many_above``, medium in between (inclusive).

    >>> many_medium_few_groups(torch.tensor([19, 20, 100, 101])).group_of()
    ['few', 'medium', 'medium', 'many']
    """
    g = _three_groups(counts, ("few", "medium", "many"), few_below - 1, many_above)
    return g
