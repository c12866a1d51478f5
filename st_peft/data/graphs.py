"""Readers for graph files: DCRNN pickles (restricted), edge lists, PEMS distance CSVs, adjacency matrices."""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from st_peft.data.errors import DataError

# DCRNN's ``normalized_k``: Gaussian-kernel weights below it are set to 0.
DISTANCE_THRESHOLD = 0.1

# The only globals plain numpy data needs, for every pickle protocol and numpy 1 or 2 module
# names: array reconstruction (protocols 0-4), arrays from a buffer (protocol 5), dtypes and
# scalars. Anything else (a function, a class, os.system) is refused before it can run.
_ALLOWED_PICKLE_GLOBALS = {
    (module, name)
    for package in ("numpy.core", "numpy._core")
    for module, name in (
        (f"{package}.multiarray", "_reconstruct"),
        (f"{package}.multiarray", "scalar"),
        (f"{package}.numeric", "_frombuffer"),
    )
} | {("numpy", "ndarray"), ("numpy", "dtype")}

# Protocols 0-2 write bytes (an array's buffer) as ``_codecs.encode(text, "latin1")``.
_BYTES_GLOBAL = ("_codecs", "encode")


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` restricted to the one codec pickle uses for bytes."""
    if encoding != "latin1":
        raise DataError(
            f"refused to unpickle '_codecs.encode' with encoding {encoding!r}: pickles encode bytes as latin1 only"
        )
    return codecs.encode(text, "latin1")


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that builds lists, dicts, strings, bytes, numbers and numpy arrays, and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) == _BYTES_GLOBAL:
            return _latin1_bytes
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise DataError(
                f"refused to unpickle '{module}.{name}': graph pickles may hold only lists, dicts, "
                "strings, numbers and numpy arrays"
            )
        return super().find_class(module, name)


def load_plain_pickle(path: str | Path):
    """Unpickle a file that holds only plain data, never executing anything else.

    Files of every pickle protocol (0 to 5) load, from Python 2 (as DCRNN's, read with
    ``latin1`` so their numpy arrays decode) or 3, numpy 1 or 2.

    Raises:
        DataError: if the file is missing, corrupt, or asks for any other global (named).
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
    return [s.decode("latin1") if isinstance(s, bytes) else str(s) for s in sensor_ids], adjacency


def read_edge_list(
    path: str | Path,
    num_nodes: int | None = None,
    node_ids: list[str] | None = None,
    weight: str = "binary",
    symmetric: bool = True,
    threshold: float = DISTANCE_THRESHOLD,
) -> np.ndarray:
    """Read an edge list ``from,to[,cost]`` (a header row is optional) into an adjacency.

    Args:
        path: CSV file with two columns (source, target) and an optional third (cost or distance).
        num_nodes: N when the endpoints are node indices; each must be an integer in ``[0, N)``.
        node_ids: the id of each node when the file names sensors (PEMS03, PEMS-BAY distances);
            rows naming an id outside ``node_ids`` are skipped, as DCRNN does.
        weight: ``"binary"`` (1 per edge), ``"cost"`` (the third column as it is), or
            ``"gaussian"``: DCRNN's kernel ``exp(-(d / std)^2)`` of the distance ``d`` in the third
            column over the standard deviation of the listed distances, with weights below
            ``threshold`` set to 0.
        symmetric: also add each edge in the other direction (the PEMS files list each road
            segment once).
        threshold: the Gaussian kernel's cut-off (DCRNN's ``normalized_k``, 0.1).

    Returns:
        float32 ``(N, N)`` adjacency.

    Raises:
        DataError: naming the file line of the first endpoint that is not an integer, lies
            outside ``[0, N)``, or a cost that is not a finite number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"edge list not found: {path}")
    if (num_nodes is None) == (node_ids is None):
        raise DataError(f"{path}: pass exactly one of num_nodes or node_ids to read an edge list")
    if weight not in ("binary", "cost", "gaussian"):
        raise DataError(f"unknown edge weight '{weight}': use binary, cost or gaussian")
    try:
        frame = pd.read_csv(path, header=None, dtype=str, skipinitialspace=True)
    except Exception as error:
        raise DataError(f"corrupt edge list {path}: {error}") from error
    if frame.shape[1] < 2:
        raise DataError(f"{path}: an edge list needs at least two columns, found {frame.shape[1]}")
    has_header = not _is_number(frame.iloc[0, 0])
    # file line of each row, for messages
    lines = np.arange(len(frame)) + 1
    if has_header:
        frame, lines = frame.iloc[1:], lines[1:]
    if weight != "binary" and frame.shape[1] < 3:
        raise DataError(f"{path}: weight '{weight}' needs a third column (cost or distance)")
    if node_ids is not None:
        index = {str(node): i for i, node in enumerate(node_ids)}
        known = (frame[0].isin(index) & frame[1].isin(index)).to_numpy()
        if len(frame) and not known.any():
            raise DataError(
                f"{path}: no edge joins two of the given node ids (line {lines[0]} names "
                f"{frame.iloc[0, 0]!r}, {frame.iloc[0, 1]!r}); pass num_nodes=N for endpoints that are row indices"
            )
        frame, lines = frame[known], lines[known]
        sources = frame[0].map(index).to_numpy(dtype=np.int64)
        targets = frame[1].map(index).to_numpy(dtype=np.int64)
        num_nodes = len(node_ids)
    else:
        sources = _node_indices(frame[0], lines, num_nodes, path)
        targets = _node_indices(frame[1], lines, num_nodes, path)
    if len(sources) == 0:
        raise DataError(f"{path}: the edge list has no edge{' after its header' if has_header else ''}; a graph "
                        "model would train on no graph")
    weights = np.ones(len(sources))
    if weight != "binary":
        costs = pd.to_numeric(frame[2], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(costs))
        if bad.size:
            raise DataError(f"{path}: line {lines[bad[0]]} has cost {frame.iloc[bad[0], 2]!r}, not a finite number")
        _refuse_conflicting_rows(sources, targets, costs, lines, path)
        weights = costs if weight == "cost" else _gaussian_kernel(costs, threshold)
    adjacency = np.zeros((num_nodes, num_nodes), dtype=np.float32)
    adjacency[sources, targets] = weights
    if symmetric:
        adjacency[targets, sources] = weights
    if not adjacency.any():
        matched = "" if node_ids is None else f" ({len(sources)} of its rows join two of the data's node ids)"
        raise DataError(f"{path}: no edge keeps a weight{matched}: the {weight} weights are all 0, which is an empty "
                        "graph; check the node ids and the distances")
    return _checked_square(adjacency, path)


def read_adjacency(
    path: str | Path,
    key: str | None = None,
    num_nodes: int | None = None,
    node_ids: list[str] | None = None,
) -> np.ndarray:
    """Read an adjacency from any graph file, telling the format from the file.

    * ``.npz`` / ``.npy``: a dense ``(N, N)`` matrix (the first array, or ``key``).
    * ``.pkl``: a DCRNN ``adj_mx.pkl`` (:func:`read_dcrnn_pickle`); given ``node_ids`` that are
      all among its sensor ids, rows and columns follow ``node_ids``.
    * a text file with the header ``from,to,cost`` or ``from,to,distance`` (the PEMS
      distance CSVs): distances become DCRNN's weights, ``exp(-(d / std)^2)`` over the standard
      deviation of the listed distances, entries below 0.1 set to 0, each edge both ways
      (:func:`read_edge_list` with ``weight="gaussian"``). ``from,to`` gives binary edges and
      ``from,to,weight`` the weights as written.
    * a headerless text file of N rows of N numbers: a dense matrix.
    * a headerless text file of two or three columns that is not square: an edge list
      ``from,to[,weight]``, binary or weighted as written.

    Edge lists need ``num_nodes`` (endpoints are indices in ``[0, N)``) or ``node_ids``
    (endpoints are sensor ids); ``st_peft.data.load(..., adjacency=path)`` passes the data's.

    Returns:
        float32 ``(N, N)``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"adjacency file not found: {path}")
    if path.suffix == ".pkl":
        sensor_ids, matrix = read_dcrnn_pickle(path)
        return _in_node_order(matrix, sensor_ids, node_ids)
    if path.suffix in (".npz", ".npy"):
        try:
            if path.suffix == ".npy":
                matrix = np.load(path, allow_pickle=False)
            else:
                with np.load(path, allow_pickle=False) as archive:
                    matrix = archive[key or archive.files[0]]
        except Exception as error:
            raise DataError(f"corrupt adjacency file {path}: {error}; {_READERS_HINT}") from error
        return _checked_square(np.asarray(matrix, dtype=np.float32), path)
    return _read_text_graph(path, num_nodes, node_ids)


# header of an edge list -> read_edge_list's weight
_EDGE_HEADERS = {
    ("from", "to"): "binary",
    ("from", "to", "cost"): "gaussian",
    ("from", "to", "distance"): "gaussian",
    ("from", "to", "weight"): "cost",
}
_READERS_HINT = (
    "read an edge list with st_peft.data.read_edge_list(path, num_nodes=N, weight=...), "
    "a DCRNN pickle (.pkl) with read_dcrnn_pickle"
)


def _read_text_graph(path: Path, num_nodes: int | None, node_ids: list[str] | None) -> np.ndarray:
    """A dense matrix, a PEMS distance CSV or an edge list, told apart by header and shape."""
    try:
        frame = pd.read_csv(path, header=None, dtype=str, skipinitialspace=True)
    except Exception as error:
        raise DataError(f"corrupt adjacency file {path}: {error}; {_READERS_HINT}") from error
    header = tuple(str(cell).strip().lower() for cell in frame.iloc[0])
    rows, columns = frame.shape
    if not all(_is_number(cell) for cell in header):
        if header not in _EDGE_HEADERS:
            raise DataError(
                f"corrupt adjacency file {path}: header {','.join(header)} is none of "
                f"{', '.join(','.join(h) for h in _EDGE_HEADERS)} and a dense matrix has no header; {_READERS_HINT}"
            )
        weight = _EDGE_HEADERS[header]
    elif rows == columns:
        try:
            matrix = frame.to_numpy(dtype=np.float32)
        except ValueError as error:
            raise DataError(f"corrupt adjacency file {path}: {error}; {_READERS_HINT}") from error
        nodes = num_nodes if num_nodes is not None else (len(node_ids) if node_ids is not None else None)
        endpoints = matrix[:, :2]
        # 2 or 3 rows of node indices (and costs) read as well as an edge list: refuse to guess
        if columns in (2, 3) and nodes is not None and \
                (endpoints == np.round(endpoints)).all() and ((endpoints >= 0) & (endpoints < nodes)).all():
            raise DataError(
                f"{path}: {rows} rows of {columns} numbers could be a dense {rows}x{rows} matrix or an edge list of "
                f"{nodes} nodes; add the header from,to,cost for an edge list, or save a matrix as .npy"
            )
        return _checked_square(matrix, path)
    elif columns in (2, 3):
        weight = "binary" if columns == 2 else "cost"
    else:
        raise DataError(
            f"corrupt adjacency file {path}: {rows} rows of {columns} columns is neither a square matrix "
            f"nor an edge list (2 or 3 columns); {_READERS_HINT}"
        )
    if num_nodes is None and node_ids is None:
        raise DataError(
            f"{path} is an edge list: pass num_nodes=N (endpoints are row indices) or node_ids "
            "(endpoints are sensor ids); st_peft.data.load(..., adjacency=path) passes the data's"
        )
    by_id = node_ids is not None and not _default_ids(node_ids)
    return read_edge_list(
        path,
        num_nodes=None if by_id else (num_nodes if num_nodes is not None else len(node_ids)),
        node_ids=node_ids if by_id else None,
        weight=weight,
    )


def _refuse_conflicting_rows(sources: np.ndarray, targets: np.ndarray, costs: np.ndarray, lines: np.ndarray,
                             path: Path) -> None:
    """Refuse an edge listed twice with two costs, naming both lines (the later row would silently win).

    The same row twice, as PEMS08's published file has, writes the same weight twice and is kept.
    """
    rows = pd.DataFrame({"source": sources, "target": targets, "cost": costs})
    costs_per_edge = rows.groupby(["source", "target"])["cost"].transform("nunique").to_numpy()
    conflicting = np.flatnonzero(costs_per_edge > 1)
    if conflicting.size:
        first = int(conflicting[0])
        second = int(next(i for i in conflicting[1:] if sources[i] == sources[first] and targets[i] == targets[first]))
        raise DataError(f"{path}: lines {lines[first]} and {lines[second]} list the edge {sources[first]} -> "
                        f"{targets[first]} with costs {costs[first]:g} and {costs[second]:g}; keep one row per edge")


def _node_indices(column: pd.Series, lines: np.ndarray, num_nodes: int, path: Path) -> np.ndarray:
    """Endpoints as int64 indices, refusing the first that is not an integer in ``[0, num_nodes)``."""
    numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(numbers) | (numbers != np.round(numbers)))
    if bad.size:
        raise DataError(
            f"{path}: line {lines[bad[0]]} names node {column.iloc[bad[0]]!r}, not an integer index; "
            "pass node_ids when the file names sensors"
        )
    outside = np.flatnonzero((numbers < 0) | (numbers >= num_nodes))
    if outside.size:
        raise DataError(
            f"{path}: line {lines[outside[0]]} names node index {int(numbers[outside[0]])}, "
            f"outside [0, {num_nodes}) for {num_nodes} nodes"
        )
    return numbers.astype(np.int64)


def _gaussian_kernel(distances: np.ndarray, threshold: float) -> np.ndarray:
    """DCRNN's weights: ``exp(-(d / std)^2)`` with ``std`` over the listed distances, below ``threshold`` -> 0."""
    std = distances.std() or 1.0
    weights = np.exp(-np.square(distances / std))
    return np.where(weights < threshold, 0.0, weights)


def _in_node_order(matrix: np.ndarray, sensor_ids: list[str], node_ids: list[str] | None) -> np.ndarray:
    """The pickle's adjacency with rows and columns in ``node_ids`` order when every id is a sensor of it."""
    position = {sensor: i for i, sensor in enumerate(sensor_ids)}
    if node_ids is None or _default_ids(node_ids) or not all(node in position for node in node_ids):
        return matrix
    order = np.asarray([position[node] for node in node_ids], dtype=np.int64)
    return np.ascontiguousarray(matrix[np.ix_(order, order)])


def _default_ids(node_ids: list[str]) -> bool:
    """Whether ``node_ids`` are STData's default ``"0" .. "N-1"`` (row indices, not sensor ids)."""
    return list(node_ids) == [str(i) for i in range(len(node_ids))]


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
