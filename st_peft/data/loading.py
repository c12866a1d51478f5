"""``load()``: a data set by built-in name, file, saved ``datasets`` folder or Hub dataset repository."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from st_peft.data.builtin import BUILTIN_DATASETS
from st_peft.data.container import SECONDS_PER_DAY, STData, checked_steps_per_day
from st_peft.data.errors import DataError
from st_peft.data.graphs import read_adjacency
from st_peft.data.readers import read_h5, read_npz, read_wide_csv

FILE_READERS = {".npz": read_npz, ".h5": read_h5, ".hdf5": read_h5, ".csv": read_wide_csv}
# what Dataset.save_to_disk / DatasetDict.save_to_disk write
_SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")
# "org/name"; a leading dot ("./x", "../x") is a local path, never a repository
_RELATIVE_DATES = {"now", "today", "tomorrow", "yesterday"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def load(
    name_or_path: str | Path,
    *,
    steps_per_day: int | None = None,
    start: str | datetime | None = None,
    adjacency: str | Path | np.ndarray | None = None,
    **options,
) -> STData:
    """Open a data set: a built-in one by name, or a user's file, saved folder or Hub repository.

    Args:
        name_or_path: one of ``BUILTIN_DATASETS`` (``"sz-taxi"``, ``"los-loop"``, ``"nyc-taxi"``,
            ``"nyc-bike"``, ``"etth1"``, ``"chickenpox"``); a ``.npz`` (PEMS layout), ``.h5`` or
            ``.csv`` file; a folder written by ``Dataset.save_to_disk`` (for example of
            :meth:`STData.to_hf_dataset`); or a Hub dataset repository id ``"org/name"`` holding
            such a folder or ``Dataset.push_to_hub``'s files (downloaded through
            ``huggingface_hub``, which honours ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``).
        steps_per_day: time steps in a day, a whole number in ``[1, 86400]`` (288 for 5 minutes,
            1 for daily or coarser). Required for a ``.npz`` and for data without timestamps
            or st-peft metadata; otherwise it overrides what the data implies.
        start: the first timestamp (``"2024-01-01 00:00"`` or a ``datetime``) of data that has
            none (``.npz``, a date-less CSV); later steps follow every ``86400 / steps_per_day``
            seconds. Without it, day of week counts from the first step.
        adjacency: a graph file, read with :func:`~st_peft.data.read_adjacency` (dense csv or
            npz, PEMS distance CSV, edge list, DCRNN pickle) with the data's node count and
            ids; or an ``(N, N)`` array. It replaces any graph the data carries.
        **options: passed to the reader of a file's format (``missing_value``, ``node_ids``, ...).

    Returns:
        The data set as :class:`STData` ``(T, N, C)``.

    Raises:
        DataError: one line naming the problem and the fix.
    """
    key = str(name_or_path)
    if key in BUILTIN_DATASETS:
        given = {"steps_per_day": steps_per_day, "start": start, "adjacency": adjacency, **options}
        given = sorted(name for name, value in given.items() if value is not None)
        if given:
            raise DataError(
                f"built-in data set '{key}' takes no options, got {given}: its steps per day, dates and graph "
                "are built in"
            )
        return BUILTIN_DATASETS[key]()
    if steps_per_day is not None:
        steps_per_day = checked_steps_per_day(steps_per_day, key)
    path = Path(name_or_path)
    if path.is_dir():
        data = _from_saved_dataset(path, steps_per_day, options, name=path.name)
    elif path.is_file():
        data = _from_file(path, steps_per_day, options)
    elif _HUB_ID.fullmatch(key) and path.suffix not in FILE_READERS:
        data = _from_saved_dataset(_download_dataset(key), steps_per_day, options, name=key.split("/")[1])
    else:
        raise DataError(
            f"'{key}' is neither a built-in data set ({', '.join(BUILTIN_DATASETS)}), an existing file or "
            "folder, nor a Hub dataset id (org/name)"
        )
    if start is not None:
        data = dataclasses.replace(data, timestamps=_regular_timestamps(start, data, key))
    if adjacency is not None:
        if isinstance(adjacency, (str, Path)):
            adjacency = read_adjacency(adjacency, num_nodes=data.num_nodes, node_ids=data.node_ids)
        data = dataclasses.replace(data, adjacency=adjacency)
    return data


def _from_file(path: Path, steps_per_day: int | None, options: dict) -> STData:
    if path.suffix not in FILE_READERS:
        raise DataError(
            f"{path}: unknown format '{path.suffix}' (known: {', '.join(FILE_READERS)}, or a folder saved by "
            "Dataset.save_to_disk)"
        )
    if path.suffix == ".npz" and steps_per_day is None:
        raise DataError(
            f"{path}: an .npz file holds no timestamps: pass steps_per_day=... (288 for 5-minute PEMS data; "
            "command line: --steps-per-day 288)"
        )
    if steps_per_day is not None:
        options = {**options, "steps_per_day": steps_per_day}
    return FILE_READERS[path.suffix](path, **options)


def _from_saved_dataset(folder: Path, steps_per_day: int | None, options: dict, name: str) -> STData:
    """An :class:`STData` from a ``save_to_disk`` folder, or from data files a ``datasets`` loader reads.

    ``name`` names the data set when it carries no st-peft metadata (``push_to_hub`` drops it).
    """
    import datasets

    if options:
        raise DataError(f"{folder}: a saved dataset takes steps_per_day, start and adjacency only, got {sorted(options)}")
    try:
        if any((folder / file).is_file() for file in _SAVED_DATASET_FILES):
            dataset = datasets.load_from_disk(str(folder))
        else:
            dataset = datasets.load_dataset(str(folder))
    except Exception as error:
        raise DataError(
            f"{folder}: not a dataset folder (Dataset.save_to_disk or data files datasets can load): {error}"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1 and "train" not in dataset:
            raise DataError(f"{folder}: holds splits {sorted(dataset)}; st-peft reads one series (a 'train' split)")
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    has_metadata = '"st_peft"' in (dataset.info.description or "")
    return STData.from_hf_dataset(dataset, name=None if has_metadata else name, steps_per_day=steps_per_day)


def _download_dataset(repo_id: str) -> Path:
    """Download a Hub dataset repository (or find it in the cache) and return its folder.

    The download goes through :func:`st_peft.hub_http.hub_requests`, so it gives up after a
    bounded silence and its failure names the cause (not found, offline, the HTTP status,
    unreachable), the same way every push and pull of the project does.
    """
    from huggingface_hub import snapshot_download

    from st_peft.hub_http import HubError, hub_requests

    try:
        with hub_requests("pull the dataset", repo_id):
            return Path(snapshot_download(repo_id, repo_type="dataset"))
    except HubError as error:
        raise DataError(f"'{repo_id}' is no local file or folder, and as a Hub dataset id: {error}") from error


def _regular_timestamps(start: str | datetime, data: STData, source: str) -> np.ndarray:
    """``(T,)`` datetime64[ns] from ``start`` every ``86400 / steps_per_day`` seconds."""
    if data.timestamps is not None:
        raise DataError(f"{source}: the data has its own timestamps; drop start (command line: --start)")
    if (SECONDS_PER_DAY * 10**9) % data.steps_per_day:
        raise DataError(
            f"{source}: {data.steps_per_day} steps a day do not divide a day into whole nanoseconds; "
            "give timestamps in the file instead of start"
        )
    # pandas reads "now" and "today" as the clock's time: a run would rebuild other dates on every read
    if isinstance(start, str) and start.strip().lower() in _RELATIVE_DATES:
        raise DataError(f"{source}: start {start!r} is relative to today; give the first step's date and time "
                        "(e.g. '2024-01-01 00:00')")
    try:
        first = pd.Timestamp(start)
    except (TypeError, ValueError, OverflowError) as error:
        raise DataError(f"{source}: start {start!r} is not a date and time (e.g. '2024-01-01 00:00')") from error
    if first is pd.NaT:
        raise DataError(f"{source}: start {start!r} is not a date and time (e.g. '2024-01-01 00:00')")
    if first.tzinfo is not None:
        first = first.tz_convert("UTC").tz_localize(None)
    step_ns = SECONDS_PER_DAY * 10**9 // data.steps_per_day
    # datetime64[ns] ends in 2262 and wraps around silently past it
    try:
        first.as_unit("ns") + pd.Timedelta((data.num_steps - 1) * step_ns, unit="ns")
    except (OverflowError, pd.errors.OutOfBoundsDatetime):
        raise DataError(f"{source}: {data.num_steps} steps from start {start!r} end after {pd.Timestamp.max:%Y-%m-%d}, "
                        "the last date st-peft can represent; give the real first date") from None
    step = np.timedelta64(step_ns, "ns")
    return first.to_datetime64().astype("datetime64[ns]") + np.arange(data.num_steps) * step
