"""Settings shared by the whole test suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Run torch on one thread: the models under test are small, and on a two-core machine two
    threads per process contend with each other (a tiny forward took 3 s on two busy threads
    against 0.04 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
