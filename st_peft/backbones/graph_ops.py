"""Graph normalisations used by the graph backbones, and the buffers that hold a graph.

All functions take a validated, non-negative float64 ``(N, N)`` matrix (see
``checks.as_adjacency``) where ``adjacency[i, j]`` is the weight of the edge ``i -> j``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from st_peft.checks import AdjacencyLike, as_adjacency


def transition_matrix(adjacency: np.ndarray) -> np.ndarray:
    """Row-normalised random-walk transition matrix ``P = D^-1 A`` of shape ``(N, N)``.

    Rows of nodes without outgoing edges stay zero instead of dividing by zero.
    Graph WaveNet uses ``P_f = transition_matrix(A)`` and ``P_b = transition_matrix(A.T)``.
    """
    degree = adjacency.sum(axis=1, keepdims=True)
    inverse = np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)
    return adjacency * inverse


def scaled_laplacian(adjacency: np.ndarray) -> np.ndarray:
    """Rescaled normalised Laplacian ``2 L / lambda_max - I`` of shape ``(N, N)`` (STGCN, Chebyshev).

    ``L = I - D^-1/2 W D^-1/2`` with ``W = (A + A^T) / 2`` without self-loops: the Chebyshev
    expansion needs a symmetric operator, so directed graphs are symmetrised, and the paper's
    graphs have no self-loops (its ``T_0 = I`` term already carries each node's own signal).
    Isolated nodes get ``L_ii = 1``.

    Raises:
        ValueError: if the graph has no edge between distinct nodes.
    """
    weights = (adjacency + adjacency.T) / 2.0
    np.fill_diagonal(weights, 0.0)
    if not weights.any():
        raise ValueError(
            "adjacency has no edges between distinct nodes; a Chebyshev graph convolution needs a graph"
        )
    degree = weights.sum(axis=1)
    inv_sqrt = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
    laplacian = np.eye(len(weights)) - inv_sqrt[:, None] * weights * inv_sqrt[None, :]
    lambda_max = float(np.linalg.eigvalsh(laplacian)[-1])
    return 2.0 * laplacian / lambda_max - np.eye(len(weights))


def graph_buffer(matrix: np.ndarray) -> torch.Tensor:
    """A C-contiguous float32 tensor of ``matrix`` ``(N, N)``, fit to register as a buffer.

    Transposes and pandas arrays are column-major; safetensors refuses to save a buffer
    that is not contiguous.
    """
    return torch.tensor(np.ascontiguousarray(matrix), dtype=torch.float32)


def building_to_load() -> bool:
    """Whether the model being built is an empty shell that a checkpoint fills (transformers'
    ``from_pretrained`` builds models on the meta device); its graph then comes from the checkpoint."""
    return torch.empty(0).device.type == "meta"


def graph_matrix(adjacency: AdjacencyLike | None, use_graph: bool, *, model: str, num_nodes: int,
                 keep_float_dtype: bool = False) -> np.ndarray | None:
    """The validated float64 ``(N, N)`` graph a model is built with; None for a model built to be loaded.

    With ``keep_float_dtype`` a floating-point graph keeps its dtype (``checks.as_adjacency``).

    Raises:
        ValueError: a graph is given to a model configured without one, or a model configured
            with one is built without it (outside ``from_pretrained``).
    """
    if not use_graph:
        if adjacency is not None:
            raise ValueError(f"{model}: its config has use_graph=False but an adjacency was given")
        return None
    if adjacency is None:
        if building_to_load():
            return None
        raise ValueError(f"{model} needs an adjacency matrix of shape ({num_nodes}, {num_nodes}); got None")
    return as_adjacency(adjacency, model=model, num_nodes=num_nodes, keep_float_dtype=keep_float_dtype)


def register_graph(module: nn.Module, name: str, matrix: np.ndarray | None, num_nodes: int) -> None:
    """Register ``matrix`` ``(N, N)`` as the persistent buffer ``name`` of ``module``, saved with the weights.

    ``matrix`` is None only for a model built to be loaded (:func:`building_to_load`), whose
    checkpoint brings the values.
    """
    values = torch.zeros(num_nodes, num_nodes) if matrix is None else graph_buffer(matrix)
    module.register_buffer(name, values)
