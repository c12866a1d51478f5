"""Readers for graph files: DCRNN pickles (restricted), edge lists, adjacency matrices."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from st_peft.data.errors import DataError

# The only globals a DCRNN ``adj_mx.pkl`` needs: numpy's array reconstruction. Anything
# else in a pickle (a function, a class, os.system) is refused before it can run.
_ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that builds lists, dicts, strings, numbers and numpy arrays, and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise DataError(
                f"refused to unpickle '{module}.{name}': graph pickles may hold only lists, dicts, "
                "strings, numbers and numpy arrays"
            )
        return super().find_class(module, name)


def load_plain_pickle(path: str | Path):
    """Unpickle a file that holds only plain data, never executing anything else.

    Python 2 pickles (as DCRNN's) are read with ``latin1`` so their numpy arrays decode.

    Raises:
        DataError: if the file is missing, corrupt, or asks for any other global.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"graph file not found: {path}")
    try:
        with path.open("rb") as handle:
            return _PlainDataUnpickler(handle, encoding="latin1").load()
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"corrupt pickle {path}: {error}") from error


def read_dcrnn_pickle(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a DCRNN ``adj_mx.pkl``: ``(sensor_ids, id_to_index, adjacency)``.

    Returns:
        The sensor ids in node order and the float32 ``(N, N)`` adjacency.
    """
    content = load_plain_pickle(path)
    if not (isinstance(content, (list, tuple)) and len(content) == 3):
        raise DataError(f"{path}: expected (sensor_ids, id_to_index, adj_mx), got {type(content).__name__}")
    sensor_ids, _, adjacency = content
    adjacency = _checked_square(np.asarray(adjacency, dtype=np.float32), path)
    if len(sensor_ids) != adjacency.shape[0]:
        raise DataError(f"{path}: {len(sensor_ids)} sensor ids for a {adjacency.shape[0]}-node adjacency")
    return [str(s) for s in sensor_ids], adjacency


def read_edge_list(
    path: str | Path,
    num_nodes: int | None = None,
    node_ids: list[str] | None = None,
    weight: str = "binary",
    symmetric: bool = True,
) -> np.ndarray:
    """Read an edge list ``from,to,cost`` (a header row is optional) into an adjacency.

    Args:
        path: CSV file with at least two columns (source, target) and an optional third (cost).
        num_nodes: N when the ids are row indices ``0..N-1``.
        node_ids: the id of each node when the file names sensors (PEMS03, PEMS-BAY distances).
        weight: ``"binary"`` (1 per edge), ``"cost"`` (the third column), or ``"gaussian"``
            (``exp(-(cost / std)^2)`` over the listed costs, the DCRNN kernel).
        symmetric: also add each edge in the other direction.

    Returns:
        float32 ``(N, N)`` adjacency.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"edge list not found: {path}")
    if (num_nodes is None) == (node_ids is None):
        raise DataError("pass exactly one of num_nodes or node_ids to read an edge list")
    try:
        frame = pd.read_csv(path, header=None, dtype=str)
    except Exception as error:
        raise DataError(f"corrupt edge list {path}: {error}") from error
    if frame.shape[1] < 2:
        raise DataError(f"{path}: an edge list needs at least two columns, found {frame.shape[1]}")
    if not _is_number(frame.iloc[0, 0]):
        frame = frame.iloc[1:]
    if node_ids is not None:
        index = {str(node): i for i, node in enumerate(node_ids)}
        known = frame[0].isin(index) & frame[1].isin(index)
        frame = frame[known]
        sources = frame[0].map(index).to_numpy()
        targets = frame[1].map(index).to_numpy()
        num_nodes = len(node_ids)
    else:
        sources = frame[0].astype(float).astype(np.int64).to_numpy()
        targets = frame[1].astype(float).astype(np.int64).to_numpy()
        if len(sources) and max(sources.max(), targets.max()) >= num_nodes:
            raise DataError(f"{path}: node index {max(sources.max(), targets.max())} >= num_nodes {num_nodes}")
    costs = frame[2].astype(float).to_numpy() if frame.shape[1] > 2 else np.ones(len(sources))
    if weight == "binary":
        weights = np.ones(len(sources))
    elif weight == "cost":
        weights = costs
    elif weight == "gaussian":
        std = costs[np.isfinite(costs)].std() or 1.0
        weights = np.exp(-np.square(costs / std))
    else:
        raise DataError(f"unknown edge weight '{weight}': use binary, cost or gaussian")
    adjacency = np.zeros((num_nodes, num_nodes), dtype=np.float32)
    adjacency[sources, targets] = weights
    if symmetric:
        adjacency[targets, sources] = weights
    return _checked_square(adjacency, path)


def read_adjacency(path: str | Path, key: str | None = None) -> np.ndarray:
    """Read a dense adjacency matrix from ``.npz``/``.npy`` (first or named array) or headerless ``.csv``.

    Returns:
        float32 ``(N, N)``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"adjacency file not found: {path}")
    try:
        if path.suffix == ".csv":
            matrix = pd.read_csv(path, header=None).to_numpy(dtype=np.float32)
        elif path.suffix == ".npy":
            matrix = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as archive:
                matrix = archive[key or archive.files[0]]
    except Exception as error:
        raise DataError(f"corrupt adjacency file {path}: {error}") from error
    return _checked_square(np.asarray(matrix, dtype=np.float32), path)


def _checked_square(matrix: np.ndarray, source: str | Path) -> np.ndarray:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise DataError(f"{source}: adjacency must be square (N, N), got {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise DataError(f"{source}: adjacency holds NaN or inf")
    # pandas hands back column-major arrays; models register the adjacency as a buffer
    # and safetensors refuses to save a non-contiguous one
    return np.ascontiguousarray(matrix)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True
