"""Pytest fixtures more than one test directory uses (imported into their conftest.py)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: one torch thread is several times faster than
    two (no OpenMP team spinning at every op), and leaves the other core to the servers and
    clients a test starts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
