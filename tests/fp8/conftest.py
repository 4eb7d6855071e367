"""The fp8 tests run many small ops: one intra-op thread avoids thread wake-up costs that dominate them
(10x on a busy 2-core machine). Restored after each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
