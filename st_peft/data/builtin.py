"""Built-in real data sets shipped in ``st_peft/builtin_data``, opened by name with ``st_peft.data.load``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from st_peft.data.container import STData, observed_mask
from st_peft.data.graphs import read_adjacency
from st_peft.data.readers import read_npz, read_wide_csv

BUILTIN_ROOT = Path(__file__).resolve().parent.parent / "builtin_data"


def _los_loop() -> STData:
    # T-GCN's week of METR-LA speeds: the file carries no dates, so day of week is relative.
    root = BUILTIN_ROOT / "los-loop"
    data = read_wide_csv(root / "los_speed.csv", date_column=None, steps_per_day=288, missing_value=0.0,
                         name="los-loop", adjacency=read_adjacency(root / "los_adj.csv"))
    data.channel_names = ["speed"]
    return data


def _sz_taxi() -> STData:
    # The file holds float residues (1e-17, 1e-7) where a speed was not recorded: missing too.
    root = BUILTIN_ROOT / "sz-taxi"
    data = read_npz(root / "SZ_taxi.npz", steps_per_day=96, missing_value=0.0, missing_tolerance=1e-3,
                    name="sz-taxi",
                    adjacency=read_adjacency(root / "sz_adj.csv"), channel_names=["speed"])
    data.timestamps = np.datetime64("2015-01-01T00:00") + np.arange(data.num_steps) * np.timedelta64(15, "m")
    return data


def _nyc(folder: str, file: str, name: str, start: str, step_minutes: int) -> STData:
    # Channel 2 of these files is the time-of-day fraction, a calendar feature we derive
    # from timestamps instead; demand of 0 is a real observation, not a missing value.
    root = BUILTIN_ROOT / folder
    steps = 1440 // step_minutes
    data = read_npz(root / file, steps_per_day=steps, channels=[0, 1], missing_value=None, name=name,
                    adjacency=read_adjacency(root / "adj_mx.npz", key="adj_mx"),
                    channel_names=["inflow", "outflow"])
    data.timestamps = np.datetime64(start) + np.arange(data.num_steps) * np.timedelta64(step_minutes, "m")
    return data


def _etth1() -> STData:
    data = read_wide_csv(BUILTIN_ROOT / "ett" / "ETTh1.csv", date_column="date", name="etth1")
    data.channel_names = ["load"]
    return data


def _chickenpox() -> STData:
    path = BUILTIN_ROOT / "chickenpox" / "chickenpox.json"
    content = json.loads(path.read_text())
    values = np.asarray(content["FX"], dtype=np.float64)[..., None]
    order = sorted(content["node_ids"].items(), key=lambda item: item[1])
    num_nodes = len(order)
    adjacency = np.zeros((num_nodes, num_nodes), dtype=np.float32)
    edges = np.asarray(content["edges"], dtype=np.int64)
    adjacency[edges[:, 0], edges[:, 1]] = 1.0
    # FX holds standardised weekly case counts starting on Monday 2005-01-03.
    timestamps = np.datetime64("2005-01-03") + np.arange(values.shape[0]) * np.timedelta64(7, "D")
    return STData(values=values, mask=observed_mask(values, None), steps_per_day=1, name="chickenpox",
                  timestamps=timestamps, adjacency=adjacency, node_ids=[name for name, _ in order],
                  channel_names=["cases"])


BUILTIN_DATASETS: dict[str, Callable[[], STData]] = {
    "los-loop": _los_loop,
    "sz-taxi": _sz_taxi,
    "nyc-taxi": lambda: _nyc("nyc-taxi", "NYCTaxi.npz", "nyc-taxi", "2016-01-01", 30),
    "nyc-bike": lambda: _nyc("nyc-bike", "NYCBike1.npz", "nyc-bike", "2014-04-01", 60),
    "etth1": _etth1,
    "chickenpox": _chickenpox,
}


BUILTIN_MISSING: dict[str, str] = {
    "los-loop": "0 (a speed of 0 is a sensor that did not report)",
    "sz-taxi": "0 and values within 1e-3 of it (a speed that was not recorded)",
    "nyc-taxi": "nothing: zeros are real demand",
    "nyc-bike": "nothing: zeros are real demand",
    "etth1": "empty cells only",
    "chickenpox": "nothing: every value is observed",
}
"""What each built-in data set counts as missing: the ``missing_value`` its reader is given above."""
