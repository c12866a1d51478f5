"""Graph normalisations used by the graph backbones, and the config coders for adjacency.

All functions take a validated, non-negative float64 ``(N, N)`` matrix (see
``checks.as_adjacency``) where ``adjacency[i, j]`` is the weight of the edge ``i -> j``.
"""

from __future__ import annotations

import numpy as np
import torch


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


def adjacency_to_list(adjacency: np.ndarray | torch.Tensor) -> list[list[float]]:
    """Encode an ``(N, N)`` array or tensor as a nested list of floats for ``config.json``.

    Python floats print with ``repr`` precision in JSON, so float32 and float64 values come
    back bit for bit.
    """
    if isinstance(adjacency, torch.Tensor):
        adjacency = adjacency.detach().cpu().numpy()
    return np.asarray(adjacency, dtype=np.float64).tolist()


# ``PyTorchModelHubMixin`` only writes JSON-serialisable init arguments to config.json; these
# coders let an adjacency passed as an array or tensor be saved too. Decoding returns the
# nested list, which the graph backbones accept directly.
ADJACENCY_CODERS = {
    np.ndarray: (adjacency_to_list, list),
    torch.Tensor: (adjacency_to_list, list),
}


def graph_buffer(matrix: np.ndarray) -> torch.Tensor:
    """A C-contiguous float32 tensor of ``matrix`` ``(N, N)``, fit to register as a buffer.

    Transposes and pandas arrays are column-major; safetensors refuses to save a buffer
    that is not contiguous.
    """
    return torch.tensor(np.ascontiguousarray(matrix), dtype=torch.float32)
