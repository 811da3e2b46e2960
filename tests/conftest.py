"""Shared test set-up: the repo root on sys.path, the real data beside the checkout, quiet CPU threads."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

# Two cores on CI: more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


def skip_or_fail_on_ci(reason):
    """Skip on a developer's machine; fail on CI (CI=true), which always has the data and Chromium."""
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI=true: this must run on CI)")
    pytest.skip(reason)


@pytest.fixture
def shared_data():
    """../shared/data beside the checkout (real MMLU, Gutenberg, tiny-shakespeare); skips when absent."""
    if not SHARED_DATA.is_dir():
        skip_or_fail_on_ci("../shared/data is not present beside the checkout")
    return SHARED_DATA
