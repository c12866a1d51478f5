"""Input validation shared by every st-peft model, so all of them fail the same way on bad input.

Each check raises a ``ValueError`` that names the model, the tensor, what was expected and
what was received, with both shapes. Tensors are ``(batch, time, nodes, channels)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

AdjacencyLike = np.ndarray | torch.Tensor | Sequence[Sequence[float]]


def check_past_values(
    past_values: torch.Tensor,
    *,
    model: str,
    num_nodes: int,
    input_len: int | None,
    in_channels: int,
    node_index: torch.Tensor | None = None,
) -> int:
    """Check the history ``past_values`` ``(B, L, N, C_in)`` against what the model was built for.

    Args:
        past_values: history ``(batch, input_len, nodes, in_channels)``.
        model: class name used in the error messages.
        num_nodes: number of nodes of the whole graph the model was built for.
        input_len: number of history steps ``L`` the model was built for, or None when any length works.
        in_channels: number of input channels ``C_in`` the model was built for.
        node_index: optional int64 ``(N_sub,)``; when given, ``past_values`` covers only these nodes.

    Returns:
        The number of nodes in ``past_values`` (``num_nodes`` or ``len(node_index)``).
    """
    expected = f"(batch, input_len={input_len if input_len is not None else 'L'}, nodes={num_nodes}, in_channels={in_channels})"
    if not isinstance(past_values, torch.Tensor) or past_values.dim() != 4:
        got = (
            f"a {past_values.dim()}-d tensor of shape {tuple(past_values.shape)}"
            if isinstance(past_values, torch.Tensor)
            else type(past_values).__name__
        )
        raise ValueError(f"{model} expects past_values of shape {expected}; got {got}")
    _, length, nodes, channels = past_values.shape
    shape = tuple(past_values.shape)
    if input_len is not None and length != input_len:
        raise ValueError(
            f"{model} was built for input_len={input_len} but past_values has {length} time steps "
            f"(past_values.shape={shape}, expected {expected})"
        )
    if channels != in_channels:
        raise ValueError(
            f"{model} was built for in_channels={in_channels} but past_values has {channels} channels "
            f"(past_values.shape={shape}, expected {expected})"
        )
    if node_index is None:
        if nodes != num_nodes:
            raise ValueError(
                f"{model} was built for num_nodes={num_nodes} but past_values has {nodes} nodes "
                f"(past_values.shape={shape}, expected {expected}); pass node_index for a subset of the graph"
            )
        return nodes
    check_node_index(node_index, nodes, num_nodes, model=model)
    return nodes


def check_node_index(node_index: torch.Tensor, nodes: int, num_nodes: int, *, model: str) -> None:
    """Check that ``node_index`` ``(n,)`` picks ``nodes`` distinct-or-not nodes of ``[0, num_nodes)``."""
    if not isinstance(node_index, torch.Tensor) or node_index.dim() != 1 or node_index.dtype not in (
        torch.int64,
        torch.int32,
    ):
        got = f"dtype {node_index.dtype} and shape {tuple(node_index.shape)}" if isinstance(
            node_index, torch.Tensor) else type(node_index).__name__
        raise ValueError(f"{model}: node_index must be a 1-d integer tensor; got {got}")
    if node_index.numel() != nodes:
        raise ValueError(
            f"{model}: node_index selects {node_index.numel()} nodes but past_values has {nodes} nodes"
        )
    if nodes and (int(node_index.min()) < 0 or int(node_index.max()) >= num_nodes):
        raise ValueError(
            f"{model}: node_index values must lie in [0, {num_nodes}); got min {int(node_index.min())}, "
            f"max {int(node_index.max())}"
        )


def check_observed_mask(mask: torch.Tensor | None, values: torch.Tensor, *, model: str, name: str,
                        values_name: str) -> torch.Tensor:
    """Return ``mask`` as bool, or ``isfinite(values)`` when it is None.

    Args:
        mask: bool (or 0/1) tensor shaped like ``values``, True where observed.
        values: the tensor the mask describes.
        model: class name for the message.
        name: the mask's argument name (``past_observed_mask``).
        values_name: the values' argument name (``past_values``).
    """
    if mask is None:
        return torch.isfinite(values)
    if not isinstance(mask, torch.Tensor) or mask.shape != values.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"{model}: {name} has shape {got} but {values_name} has shape {tuple(values.shape)}; they must match"
        )
    return mask.to(torch.bool)


def check_future_values(
    future_values: torch.Tensor,
    *,
    model: str,
    batch_size: int,
    horizon: int,
    nodes: int,
    out_channels: int,
) -> None:
    """Check the targets ``future_values`` ``(B, H, N, C_out)`` against the forecast the model makes."""
    expected = (batch_size, horizon, nodes, out_channels)
    if not isinstance(future_values, torch.Tensor) or tuple(future_values.shape) != expected:
        got = tuple(future_values.shape) if isinstance(future_values, torch.Tensor) else type(future_values).__name__
        detail = ""
        if isinstance(future_values, torch.Tensor) and future_values.dim() == 4 and future_values.shape[1] != horizon:
            detail = f": its horizon is {future_values.shape[1]} steps, the model forecasts horizon={horizon}"
        raise ValueError(
            f"{model} forecasts shape (batch, horizon, nodes, out_channels)={expected} but future_values has "
            f"shape {got}{detail}"
        )


def check_time_features(
    time_features: torch.Tensor | None,
    *,
    model: str,
    name: str,
    batch_size: int,
    steps: int,
    steps_per_day: int | None,
    switch_off: str = "if_tod=False, if_dow=False",
) -> torch.Tensor:
    """Check calendar features ``(B, steps, 2)`` and return them.

    ``[..., 0]`` is the time-of-day slot in ``[0, steps_per_day)`` and ``[..., 1]`` the day of
    week in ``[0, 7)``. ``switch_off`` names the constructor arguments that build the model
    without calendar features, for the message when the features are missing.

    Args:
        time_features: int64 ``(B, steps, 2)`` or None.
        model: class name used in the message.
        name: the argument's name (``past_time_features`` or ``future_time_features``).
        batch_size: B.
        steps: L or H.
        steps_per_day: time-of-day slots per day; None when the model reads only the day of week.
        switch_off: how to build the model without calendar features.
    """
    expected = (batch_size, steps, 2)
    if time_features is None:
        raise ValueError(
            f"{model} uses time-of-day / day-of-week features and needs {name} of shape {expected}; got None "
            f"(pass {name}, or build the model with {switch_off})"
        )
    if not isinstance(time_features, torch.Tensor) or tuple(time_features.shape) != expected:
        got = tuple(time_features.shape) if isinstance(time_features, torch.Tensor) else type(time_features).__name__
        raise ValueError(f"{model} expects {name} of shape {expected}; got {got}")
    if time_features.dtype.is_floating_point or time_features.dtype == torch.bool:
        raise ValueError(
            f"{model} expects integer {name} (time-of-day slot, day of week); got dtype {time_features.dtype}"
        )
    for column, label, limit in ((0, "time-of-day slot", steps_per_day), (1, "day of week", 7)):
        if limit is None:
            continue
        values = time_features[..., column]
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= limit:
            raise ValueError(f"{model}: {name} {label} must lie in [0, {limit}); got values from {low} to {high}")
    return time_features


def as_adjacency(adjacency: AdjacencyLike, *, model: str, num_nodes: int, keep_float_dtype: bool = False) -> np.ndarray:
    """Validate a graph given as an array, tensor or nested list and return it as float64 ``(N, N)``.

    Binary and weighted graphs are both accepted; weights must be finite and non-negative
    because every normalisation used by the backbones divides by node degrees. With
    ``keep_float_dtype`` a floating-point array keeps its dtype, without a copy (a sparse graph
    path reads only its non-zero entries, so an ``(N, N)`` float64 copy would be waste).
    """
    if isinstance(adjacency, torch.Tensor):
        adjacency = adjacency.detach().cpu().numpy()
    floating = keep_float_dtype and isinstance(adjacency, np.ndarray) and np.issubdtype(adjacency.dtype, np.floating)
    try:
        matrix = np.asarray(adjacency, dtype=None if floating else np.float64)
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
    values: torch.Tensor, past_time_features: torch.Tensor | None, *, model: str, input_len: int, steps_per_day: int
) -> torch.Tensor:
    """Append time of day and day of week to the scaled history as two input channels.

    The reference data pipelines of Graph WaveNet and DCRNN feed the time of day as a
    fraction of the day next to the signal; the day of week enters the same way (``/ 7``).

    Args:
        values: scaled history ``(B, L, N, C)``.
        past_time_features: int64 ``(B, L, 2)`` time-of-day slot and day of week of each history step.
        model: class name used in error messages.
        input_len: ``L``.
        steps_per_day: time-of-day slots per day.

    Returns:
        ``(B, L, N, C + 2)``.
    """
    calendar = check_time_features(past_time_features, model=model, name="past_time_features",
                                   batch_size=values.shape[0], steps=input_len, steps_per_day=steps_per_day,
                                   switch_off="calendar_channels=False")
    fractions = calendar.to(values.dtype) / torch.tensor([steps_per_day, 7], dtype=values.dtype, device=values.device)
    return torch.cat([values, fractions.unsqueeze(2).expand(-1, -1, values.shape[2], -1)], dim=-1)
