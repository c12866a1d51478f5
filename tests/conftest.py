"""Settings shared by the whole test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from hub_server import HubServer, point_hub_at, refuse_non_local_hosts, running_hub


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Run torch on one thread: the models under test are small, and on a two-core machine two
    threads per process contend with each other (a tiny forward took 3 s on two busy threads
    against 0.04 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hub(tmp_path_factory) -> Iterator[HubServer]:
    """A real Hub-compatible server (olah over local git repositories) on 127.0.0.1, one per test run."""
    with running_hub(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch) -> Path:
    """huggingface_hub pointed at the local server with a fresh cache (returned); names other than
    127.0.0.1 fail."""
    cache = tmp_path / "hf-cache"
    point_hub_at(monkeypatch, hub.endpoint, cache)
    refuse_non_local_hosts(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache
