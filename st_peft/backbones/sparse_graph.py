"""Sparse graph operators for GWNet and STGCN on graphs too large for dense ``(N, N)`` products.

Below :data:`SPARSE_GRAPH_MIN_NODES` nodes a graph backbone keeps its graph as dense ``(N, N)``
buffers (``graph_ops``) and multiplies densely; from that size on, or when the config's
``sparse_graph`` says so, it keeps the graph as an edge list and multiplies with
``torch.sparse`` CSR matrices, whose cost grows with the edges instead of ``N^2``.

The edge list is one ``graph_index`` ``(2, M)`` (int64, rows then columns, sorted row-major) of
the entries of ``A + A^T + I`` that can be non-zero, shared by every operator of the model, and
one ``(M,)`` float32 buffer of values per operator. Both are plain tensors, so safetensors
stores them and ``from_pretrained`` rebuilds the sparse matrices from them; ``M`` is saved as
the config's ``graph_entries`` so that the empty model ``from_pretrained`` fills has their shapes.

Exact and approximate:

- the transition matrices (:func:`transition_values`) are ``graph_ops.transition_matrix``'s up to
  float rounding (their degrees are summed in another order);
- a sparse product (:func:`over_nodes`) is exact up to float rounding: it sums the same terms
  as the dense product, in another order;
- the scaled Laplacian (:func:`scaled_laplacian_values`) is approximate: its largest eigenvalue
  comes from Lanczos iterations (:func:`largest_laplacian_eigenvalue`) instead of a dense
  ``eigvalsh``, to a relative tolerance of :data:`EIGENVALUE_TOLERANCE`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from st_peft.backbones.graph_ops import building_to_load

# From this many nodes a graph backbone whose config leaves ``sparse_graph`` unset keeps its
# graph sparse. Below it the dense path is the one every model saved so far was built with.
SPARSE_GRAPH_MIN_NODES = 1024
# Relative accuracy of the largest Laplacian eigenvalue, and the Lanczos steps allowed to reach it.
EIGENVALUE_TOLERANCE = 1e-5
LANCZOS_MAX_STEPS = 2000


def uses_sparse_graph(config: Any) -> bool:
    """Whether a model of ``config`` keeps its graph sparse: ``config.sparse_graph``, or when that is
    None, ``config.num_nodes >= SPARSE_GRAPH_MIN_NODES``.

    A model built to be loaded (``graph_ops.building_to_load``) whose config has None was saved
    before the field existed, when every graph was dense: a sparse model writes True there.
    """
    if config.sparse_graph is not None:
        return config.sparse_graph
    return config.num_nodes >= SPARSE_GRAPH_MIN_NODES and not building_to_load()


def graph_index(adjacency: np.ndarray) -> np.ndarray:
    """Entries ``(2, M)`` int64 of ``A + A^T + I`` that can be non-zero, sorted by row, then column.

    Every operator a backbone derives from ``A`` (``D^-1 A``, ``D^-1 A^T``, the Laplacian of
    ``(A + A^T) / 2`` with its diagonal) lives on these entries.
    """
    num_nodes = len(adjacency)
    rows, cols = np.nonzero(adjacency)
    diagonal = np.arange(num_nodes)
    keys = np.unique(np.concatenate([rows * num_nodes + cols, cols * num_nodes + rows,
                                     diagonal * num_nodes + diagonal]))
    return np.stack([keys // num_nodes, keys % num_nodes])


def entries(adjacency: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``adjacency[rows, cols]`` as float64 ``(M,)``, whatever the graph's dtype (float32 converts exactly)."""
    return adjacency[rows, cols].astype(np.float64)


def transition_values(adjacency: np.ndarray, index: np.ndarray, *, backward: bool = False) -> np.ndarray:
    """``graph_ops.transition_matrix`` of ``A`` (or of ``A^T`` when ``backward``) at ``index`` ``(2, M)``: ``(M,)``.

    Every edge of ``A`` and ``A^T`` is among ``index``'s entries, so the degrees are sums over them
    (in float64, summed in another order than the dense path: equal up to float rounding).
    """
    rows, cols = index
    weights = entries(adjacency, cols, rows) if backward else entries(adjacency, rows, cols)
    degree = np.bincount(rows, weights=weights, minlength=len(adjacency))
    inverse = np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)
    return weights * inverse[rows]


def scaled_laplacian_values(adjacency: np.ndarray, index: np.ndarray,
                            tolerance: float = EIGENVALUE_TOLERANCE) -> np.ndarray:
    """``graph_ops.scaled_laplacian`` of ``A`` at ``index`` ``(2, M)`` (which holds the diagonal): ``(M,)``.

    Approximate: ``lambda_max`` is :func:`largest_laplacian_eigenvalue`'s, within a relative
    ``tolerance`` of the dense ``eigvalsh``; every other step is the dense one's, entry by entry
    (degrees summed in another order, equal up to float rounding).

    Raises:
        ValueError: if the graph has no edge between distinct nodes.
    """
    rows, cols = index
    off_diagonal = rows != cols
    weights = np.where(off_diagonal, (entries(adjacency, rows, cols) + entries(adjacency, cols, rows)) / 2.0, 0.0)
    if not weights.any():
        raise ValueError(
            "adjacency has no edges between distinct nodes; a Chebyshev graph convolution needs a graph"
        )
    degree = np.bincount(rows, weights=weights, minlength=len(adjacency))
    inv_sqrt = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
    laplacian = np.where(off_diagonal, -inv_sqrt[rows] * weights * inv_sqrt[cols], 1.0)
    lambda_max = largest_laplacian_eigenvalue(index, laplacian, len(adjacency), tolerance)
    return 2.0 * laplacian / lambda_max - np.where(off_diagonal, 0.0, 1.0)


def largest_laplacian_eigenvalue(index: np.ndarray, values: np.ndarray, num_nodes: int,
                                 tolerance: float = EIGENVALUE_TOLERANCE,
                                 max_steps: int = LANCZOS_MAX_STEPS) -> float:
    """The largest eigenvalue of a normalised Laplacian given as ``values`` ``(M,)`` at ``index`` ``(2, M)``.

    Lanczos iterations in float64 from a seeded start (so a graph always gets the same value).
    The largest Ritz value ``theta`` never exceeds ``lambda_max``, and a normalised Laplacian's
    ``lambda_max`` never exceeds 2, so the iterations stop once ``min(2 - theta, r) <= tolerance *
    theta``, with ``r`` the Ritz residual (the standard Lanczos test). On graphs of a few hundred
    nodes the residual test ends it at machine precision; on large road-like graphs, whose
    ``lambda_max`` sits within about 1e-5 of 2 among many close eigenvalues, the bound 2 does.
    The relative error is then at most ``tolerance``.

    Warns when ``max_steps`` pass first, naming the interval the eigenvalue is known to lie in.
    """
    operator = torch.sparse_coo_tensor(torch.from_numpy(index), torch.from_numpy(values), (num_nodes, num_nodes),
                                       check_invariants=False).to_sparse_csr()
    start = torch.randn(num_nodes, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vector, previous = start / start.norm(), torch.zeros_like(start)
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    next_check = 10
    for step in range(1, min(max_steps, num_nodes) + 1):
        product = operator @ vector
        alpha = float((product * vector).sum())
        product = product - alpha * vector - beta * previous
        beta = float(product.norm())
        alphas.append(alpha)
        # an invariant subspace (beta = 0) or the whole space makes the Ritz values exact
        exhausted = beta <= 1e-12 * abs(alpha) or step == num_nodes
        if step == next_check or exhausted or step == max_steps:
            theta, residual = _top_ritz_pair(alphas, betas, beta)
            if exhausted or min(2.0 - theta, residual) <= tolerance * theta:
                return theta
            # the tridiagonal eigenproblem costs step^3: check less often as the steps grow
            next_check = step + max(10, step // 8)
        betas.append(beta)
        previous, vector = vector, product / beta
    warnings.warn(f"the largest Laplacian eigenvalue did not reach a relative tolerance of {tolerance:g} in "
                  f"{max_steps} Lanczos steps; it lies in [{theta:.9g}, {min(2.0, theta + residual):.9g}], "
                  f"{theta:.9g} is used", stacklevel=2)
    return theta


def _top_ritz_pair(alphas: list[float], betas: list[float], beta: float) -> tuple[float, float]:
    """The largest eigenvalue of the Lanczos tridiagonal matrix and its Ritz residual ``beta |s_last|``."""
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    eigenvalues, eigenvectors = torch.linalg.eigh(tridiagonal)
    return float(eigenvalues[-1]), beta * abs(float(eigenvectors[-1, -1]))


def register_sparse_graph(module: nn.Module, config: Any, matrix: np.ndarray | None,
                          operators: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]) -> None:
    """Register ``graph_index`` ``(2, M)`` and, for each operator, its values ``<name>_values`` ``(M,)``.

    Args:
        module: the model the persistent buffers belong to.
        config: its config; ``config.graph_entries`` is set to ``M`` (read back when ``matrix`` is None).
        matrix: the validated ``(N, N)`` graph (any real dtype), or None for a model built to be loaded
            (``graph_ops.building_to_load``), whose checkpoint brings the values.
        operators: name -> function of ``(matrix, index)`` giving the float64 ``(M,)`` values.

    Raises:
        ValueError: a model built to be loaded whose config lacks ``graph_entries``.
    """
    if matrix is None:
        if config.graph_entries is None:
            raise ValueError(f"{type(module).__name__}: its config has a sparse graph but no graph_entries, so the "
                             "saved edge list's size is unknown; build it with the adjacency instead")
        index = torch.zeros(2, config.graph_entries, dtype=torch.int64)
        values = dict.fromkeys(operators, torch.zeros(config.graph_entries))
    else:
        numpy_index = graph_index(matrix)
        config.graph_entries = numpy_index.shape[1]
        index = torch.from_numpy(numpy_index)
        values = {name: torch.tensor(build(matrix, numpy_index), dtype=torch.float32)
                  for name, build in operators.items()}
    module.register_buffer("graph_index", index)
    for name, tensor in values.items():
        module.register_buffer(f"{name}_values", tensor.clone())


def adjacency_values(adjacency: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The graph's own weights ``A`` at ``index`` ``(2, M)``: ``(M,)`` (zero where only ``A^T`` or ``I`` has one)."""
    return entries(adjacency, index[0], index[1])


def sparse_operator(index: torch.Tensor, values: torch.Tensor, num_nodes: int,
                    node_index: torch.Tensor | None = None) -> torch.Tensor:
    """The sparse CSR ``(n, n)`` matrix of ``values`` ``(M,)`` at ``index`` ``(2, M)``, on ``node_index``'s nodes.

    Without ``node_index`` ``n = num_nodes``; with ``node_index`` ``(n,)`` it is the sub-matrix
    ``S[node_index][:, node_index]`` of the dense path, built from the edges whose ends both lie
    in the subset, in ``O(M + N)``.

    Raises:
        ValueError: ``node_index`` names a node twice (a sub-matrix with repeated rows is not sparse).
    """
    rows, cols = index
    size = num_nodes
    if node_index is not None:
        size = len(node_index)
        position = torch.full((num_nodes,), -1, dtype=torch.int64, device=index.device)
        position[node_index] = torch.arange(size, device=index.device)
        if not torch.equal(position[node_index], torch.arange(size, device=index.device)):
            raise ValueError("node_index names a node more than once; the sparse graph path needs distinct nodes")
        rows, cols = position[rows], position[cols]
        kept = (rows >= 0) & (cols >= 0)
        rows, cols, values = rows[kept], cols[kept], values[kept]
    # positions follow node_index's order, which need not be increasing: sort the entries row-major
    order = torch.argsort(rows * size + cols)
    rows, cols, values = rows[order], cols[order], values[order]
    crow = torch.zeros(size + 1, dtype=torch.int64, device=index.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=size), dim=0)
    return torch.sparse_csr_tensor(crow, cols, values, (size, size), check_invariants=False)


def over_nodes(operator: torch.Tensor, hidden: torch.Tensor, node_dim: int) -> torch.Tensor:
    """``out[..., n, ...] = sum_m operator[n, m] * hidden[..., m, ...]`` along axis ``node_dim``.

    Args:
        operator: sparse ``(n, n)``.
        hidden: any shape with ``n`` nodes on axis ``node_dim``.

    Returns:
        The shape and dtype of ``hidden``. Exact up to float rounding.
    """
    # torch's CPU sparse products have no half-precision kernels (bfloat16 models, autocast):
    # those multiply in float32, the dense path's accumulation precision
    dtype = torch.promote_types(operator.dtype, hidden.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    moved = hidden.movedim(node_dim, 0)
    with torch.autocast(hidden.device.type, enabled=False):
        product = operator.to(dtype) @ moved.reshape(moved.shape[0], -1).to(dtype)
    return product.view(moved.shape).movedim(0, node_dim).to(hidden.dtype)


__all__ = [
    "EIGENVALUE_TOLERANCE",
    "LANCZOS_MAX_STEPS",
    "SPARSE_GRAPH_MIN_NODES",
    "adjacency_values",
    "entries",
    "graph_index",
    "largest_laplacian_eigenvalue",
    "over_nodes",
    "register_sparse_graph",
    "scaled_laplacian_values",
    "sparse_operator",
    "transition_values",
    "uses_sparse_graph",
]
