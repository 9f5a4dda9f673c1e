"""The one seeding function for per-sample randomness, and a base for seeded augmentation.

Augmentation that is a pure function of ``(seed, epoch, index)`` makes resume exact and the
result independent of the number of loader workers and of the process that loads the sample.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["item_seed", "SeededDataset"]

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def item_seed(seed: int, *keys: int) -> int:
    """A seed in ``[0, 2**63)`` that is a pure, well-mixed function of the integers
    ``seed, *keys`` (SplitMix64 chained over them): the same on every platform, process and
    Python run (unlike ``hash``, whose value Python may randomise for other types).

    ``item_seed(seed, epoch, index)`` seeds the augmentation of sample ``index`` in ``epoch``.

    >>> item_seed(0, 0, 0) == item_seed(0, 0, 0) != item_seed(0, 1, 0)
    True
    """
    h = _splitmix64(int(seed) & _M64)
    for key in keys:
        h = _splitmix64(h ^ (int(key) & _M64))
    return h >> 1


class SeededDataset(Dataset):
    """Base of a dataset wrapper whose item ``i`` in epoch ``e`` draws its randomness from
    :meth:`generator` ``(i)``, seeded by ``item_seed(seed, e, i)``. Call :meth:`set_epoch` at
    the start of each epoch (before the loader's iterator is created)."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed, self.epoch = base, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def generator(self, index: int) -> torch.Generator:
        """A fresh CPU generator for item ``index`` of the current epoch."""
        return torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
