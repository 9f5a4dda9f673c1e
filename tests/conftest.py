import os
import shutil
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


@pytest.fixture
def fused_kernel():
    """The fused CPU kernel (eqlosses.functional.fused) enabled for one test: built on first
    use on a machine (about 30 s), then loaded from torch's extension cache."""
    from eqlosses.functional import fused

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the fused CPU kernel cannot be built here")
    fused.enable_fused_cpu_kernel()
    yield fused
    fused.disable_fused_cpu_kernel()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _same_thread_count():
    """Restore torch's thread count after each test: code run in-process (the examples set
    two threads) must not change the float results of later tests, e.g. a resumed run that
    must equal, bit for bit, one trained in a child process with one thread."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The tests use small tensors, for which intra-op threads cost far more than they save
    # (on a 2-core VM, 25-80x for tiny ops).
    torch.set_num_threads(1)


# Hypothesis profiles for the property tests (tests/test_properties.py): "ci" (the default:
# few examples, derandomised so that every run tries the same cases) and "thorough" (many
# random examples, for local runs): EQLOSSES_HYPOTHESIS=thorough pytest tests/test_properties.py
try:
    from hypothesis import HealthCheck, settings as _hypothesis_settings
except ImportError:  # the property tests skip themselves without hypothesis
    pass
else:
    _health = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
               HealthCheck.function_scoped_fixture]
    _hypothesis_settings.register_profile(
        "ci", max_examples=25, deadline=None, derandomize=True, database=None,
        print_blob=True, suppress_health_check=_health)
    _hypothesis_settings.register_profile(
        "thorough", max_examples=1000, deadline=None, database=None, print_blob=True,
        suppress_health_check=_health)
    _hypothesis_settings.load_profile(os.environ.get("EQLOSSES_HYPOTHESIS", "ci"))
