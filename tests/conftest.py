import os
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
def golden():
    """Load one of the golden files (numbers from the authors' reference code)."""

    def load(name: str):
        path = GOLDEN / f"{name}.npz"
        if not path.exists():
            pytest.fail(f"missing golden file {path}")
        return dict(np.load(path))

    return load


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The tests use small tensors, for which intra-op threads cost far more than they save
    # (on a 2-core VM, 25-80x for tiny ops).
    torch.set_num_threads(1)
