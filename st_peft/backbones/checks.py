"""Input validation shared by every backbone, so all three fail the same way on bad input.

Each check raises a ``ValueError`` that names the model, the argument, what was expected
and what was received, with the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

AdjacencyLike = np.ndarray | torch.Tensor | Sequence[Sequence[float]]


def check_history(
    x: torch.Tensor,
    *,
    model: str,
    num_nodes: int,
    input_len: int,
    in_channels: int,
    node_index: torch.Tensor | None = None,
) -> int:
    """Check the history ``x`` of shape ``(B, L, N, C_in)`` against what the model was built for.

    Args:
        x: history ``(batch, input_len, nodes, in_channels)``.
        model: class name used in the error messages.
        num_nodes: number of nodes of the whole graph the model was built for.
        input_len: number of history steps ``L`` the model was built for.
        in_channels: number of input channels ``C_in`` the model was built for.
        node_index: optional int64 ``(N_sub,)``; when given, ``x`` covers only these nodes.

    Returns:
        The number of nodes in ``x`` (``num_nodes`` or ``len(node_index)``).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = (
            f"a {x.dim()}-d tensor of shape {tuple(x.shape)}"
            if isinstance(x, torch.Tensor)
            else type(x).__name__
        )
        raise ValueError(
            f"{model} expects x of shape (batch, input_len={input_len}, nodes={num_nodes}, "
            f"in_channels={in_channels}); got {got}"
        )
    _, length, nodes, channels = x.shape
    if length != input_len:
        raise ValueError(
            f"{model} was built for input_len={input_len} but x has {length} time steps (x.shape={tuple(x.shape)})"
        )
    if channels != in_channels:
        raise ValueError(
            f"{model} was built for in_channels={in_channels} but x has {channels} channels (x.shape={tuple(x.shape)})"
        )
    if node_index is None:
        if nodes != num_nodes:
            raise ValueError(
                f"{model} was built for num_nodes={num_nodes} but x has {nodes} nodes (x.shape={tuple(x.shape)})"
            )
        return nodes
    if node_index.dim() != 1 or node_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{model}: node_index must be a 1-d integer tensor; got dtype {node_index.dtype} and shape {tuple(node_index.shape)}"
        )
    if node_index.numel() != nodes:
        raise ValueError(f"{model}: node_index selects {node_index.numel()} nodes but x has {nodes} nodes")
    if nodes and (int(node_index.min()) < 0 or int(node_index.max()) >= num_nodes):
        raise ValueError(
            f"{model}: node_index values must lie in [0, {num_nodes}); got min {int(node_index.min())}, "
            f"max {int(node_index.max())}"
        )
    return nodes


def check_calendar(
    x_time: torch.Tensor | None,
    *,
    model: str,
    batch_size: int,
    input_len: int,
    steps_per_day: int,
    switch_off: str = "if_tod=False, if_dow=False",
) -> torch.Tensor:
    """Check the calendar features ``x_time`` of shape ``(B, L, 2)`` and return them.

    ``x_time[..., 0]`` is the time-of-day slot in ``[0, steps_per_day)`` and ``x_time[..., 1]``
    the day of week in ``[0, 7)``. ``switch_off`` names the constructor arguments that build
    the model without calendar features, for the message when ``x_time`` is missing.
    """
    if x_time is None:
        raise ValueError(
            f"{model} uses time-of-day / day-of-week features and needs x_time of shape "
            f"(batch, {input_len}, 2); got None (pass x_time, or build the model with {switch_off})"
        )
    expected = (batch_size, input_len, 2)
    if x_time.dim() != 3 or tuple(x_time.shape) != expected:
        raise ValueError(f"{model} expects x_time of shape {expected}; got {tuple(x_time.shape)}")
    if x_time.dtype.is_floating_point or x_time.dtype == torch.bool:
        raise ValueError(
            f"{model} expects integer x_time (time-of-day slot, day of week); got dtype {x_time.dtype}"
        )
    for column, name, limit in ((0, "time-of-day slot", steps_per_day), (1, "day of week", 7)):
        values = x_time[..., column]
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= limit:
            raise ValueError(
                f"{model}: x_time {name} must lie in [0, {limit}); got values from {low} to {high}"
            )
    return x_time


def as_adjacency(adjacency: AdjacencyLike, *, model: str, num_nodes: int) -> np.ndarray:
    """Validate a graph given as an array, tensor or nested list and return it as float64 ``(N, N)``.

    Binary and weighted graphs are both accepted; weights must be finite and non-negative
    because every normalisation used by the backbones divides by node degrees.
    """
    if isinstance(adjacency, torch.Tensor):
        adjacency = adjacency.detach().cpu().numpy()
    try:
        matrix = np.asarray(adjacency, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{model}: adjacency must be a numeric (num_nodes, num_nodes) matrix; {error}"
        ) from error
    if matrix.shape != (num_nodes, num_nodes):
        raise ValueError(
            f"{model} was built for num_nodes={num_nodes}, so adjacency must have shape "
            f"({num_nodes}, {num_nodes}); got {matrix.shape}"
        )
    bad = ~np.isfinite(matrix)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{model}: adjacency has {int(bad.sum())} non-finite entries (first at [{row}, {col}] = {matrix[row, col]})"
        )
    if (matrix < 0).any():
        row, col = np.argwhere(matrix < 0)[0]
        raise ValueError(
            f"{model}: adjacency weights must be non-negative; {int((matrix < 0).sum())} are negative "
            f"(first at [{row}, {col}] = {matrix[row, col]})"
        )
    return matrix


def with_calendar_channels(
    x: torch.Tensor, x_time: torch.Tensor | None, *, model: str, input_len: int, steps_per_day: int
) -> torch.Tensor:
    """Append time of day and day of week to the history as two input channels.

    The reference data pipelines of Graph WaveNet and DCRNN feed the time of day as a
    fraction of the day next to the signal; the day of week enters the same way (``/ 7``).

    Args:
        x: history ``(B, L, N, C)``.
        x_time: int64 ``(B, L, 2)`` time-of-day slot and day of week of each history step.
        model: class name used in error messages.
        input_len: ``L``.
        steps_per_day: time-of-day slots per day.

    Returns:
        ``(B, L, N, C + 2)``.
    """
    calendar = check_calendar(x_time, model=model, batch_size=x.shape[0], input_len=input_len,
                              steps_per_day=steps_per_day, switch_off="calendar_channels=False")
    fractions = calendar.to(x.dtype) / torch.tensor([steps_per_day, 7], dtype=x.dtype, device=x.device)
    return torch.cat([x, fractions.unsqueeze(2).expand(-1, -1, x.shape[2], -1)], dim=-1)
