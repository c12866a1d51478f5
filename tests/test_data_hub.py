"""``st_peft.data.load`` of a Hub dataset repository id, through a real Hub-compatible server on 127.0.0.1."""

from __future__ import annotations

import subprocess
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from hub_server import GIT_IDENTITY

import st_peft.data as D


def publish_dataset(hub, data: D.STData, repo_id: str) -> None:
    """PREPARED, not pushed (the server is read-only): commit ``data.to_hf_dataset().save_to_disk``
    as the ``main`` branch of the dataset repository ``repo_id``."""
    repo: Path = hub.mirrors / "datasets" / repo_id
    data.to_hf_dataset().save_to_disk(str(repo))
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", *GIT_IDENTITY, "commit", "-q", "-m", f"prepare {repo_id}"], cwd=repo, check=True)


def test_load_by_hub_dataset_id_then_offline_from_the_cache(hub, hub_env, monkeypatch):
    data = D.load("sz-taxi").select_nodes(np.arange(6))
    publish_dataset(hub, data, "city/sz-taxi-6")
    pulled = D.load("city/sz-taxi-6")
    np.testing.assert_array_equal(pulled.values, data.values)
    np.testing.assert_array_equal(pulled.adjacency, data.adjacency)
    np.testing.assert_array_equal(pulled.calendar(), data.calendar())
    assert (pulled.name, pulled.steps_per_day, pulled.node_ids) == ("sz-taxi", 96, data.node_ids)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    np.testing.assert_array_equal(D.load("city/sz-taxi-6").values, data.values)


def test_missing_hub_dataset_is_one_clear_line(hub_env):
    with pytest.raises(D.DataError, match="'city/nothing-here' is no local file or folder.*: not found \\(RepositoryNotFoundError\\)"):
        D.load("city/nothing-here")


def test_offline_hub_dataset_not_in_the_cache_says_so(hub_env, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(D.DataError, match="never-downloaded.*offline mode is on \\(HF_HUB_OFFLINE=1\\): only files already in the cache"):
        D.load("city/never-downloaded")
