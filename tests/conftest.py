"""Fixtures shared by the test files. Helpers live in the importable ``rlmeta.testing`` package,
so no test edits ``sys.path`` and no test imports another."""
from __future__ import annotations

from pathlib import Path

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
