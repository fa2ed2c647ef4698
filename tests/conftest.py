"""Fixtures shared by the test files. Helpers live in the importable ``rlmeta.testing`` package,
so no test edits ``sys.path`` and no test imports another."""
from __future__ import annotations

import os
from pathlib import Path

# OpenMP threads that wait by spinning hold a core even when idle: with two test workers, each starting jobs of
# two threads on two cores, every torch process then runs many times slower (measured here: two 2-thread torch
# training loops side by side on a loaded machine did 37 steps each in 15 s by default, 1,533 with PASSIVE).
# Set before torch is imported in this process; every subprocess (Snakemake jobs, torchrun workers) inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from rlmeta.settings import ROOT

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (the full GSM8K, MATH, MATH-500 and RSS files). CI always has it beside the
    checkout, so its absence fails the tests that need it instead of skipping them."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} not found: these tests read the project's shared data, which CI places "
                    "beside the checkout (../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices gain nothing from a second thread, and on a shared 2-core machine spin-waiting
    threads make each step several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
