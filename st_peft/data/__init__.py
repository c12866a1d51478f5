"""Spatio-temporal data: readers, graphs, the `STData` container, scalers, windows and splits.

Every array is ``(time, nodes, channels)``; batches add a leading batch axis.
"""

from st_peft.data.builtin import BUILTIN_DATASETS
from st_peft.data.container import STData, observed_mask
from st_peft.data.errors import DataError
from st_peft.data.graphs import load_plain_pickle, read_adjacency, read_dcrnn_pickle, read_edge_list
from st_peft.data.loading import load
from st_peft.data.readers import read_h5, read_npz, read_wide_csv
from st_peft.data.scaler import StandardScaler
from st_peft.data.windows import ForecastingSplits, WindowCollator, build_splits

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "ForecastingSplits",
    "STData",
    "StandardScaler",
    "WindowCollator",
    "build_splits",
    "load",
    "load_plain_pickle",
    "observed_mask",
    "read_adjacency",
    "read_dcrnn_pickle",
    "read_edge_list",
    "read_h5",
    "read_npz",
    "read_wide_csv",
]
