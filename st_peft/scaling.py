"""Scaling inside the model: the training span's statistics travel with the weights.

A forecaster built from a data set's splits carries the ``loc`` / ``scale`` of the training
span, per node and channel, as buffers of an :class:`STScaler`; its forward takes
``past_values`` in original units, normalises them itself and returns forecasts in original
units. A forecaster built without statistics scales by the identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

STATISTIC_NAMES = ("past_loc", "past_scale", "future_loc", "future_scale")
"""Keys of a scaling mapping: ``(N, C_in)`` for the history, ``(N, C_out)`` for the forecast."""

ScalingStatistics = Mapping[str, Sequence[Sequence[float]] | np.ndarray | torch.Tensor]


class STScaler(nn.Module):
    """Per node and channel standard scaling of a forecaster's history and forecast.

    ``scaled = (value - loc) / scale`` for the history ``(B, L, N, C_in)``; forecasts made in
    the scaled space come back as ``scaled * scale + loc`` over ``(B, H, N, C_out)``. The four
    statistics are float32 buffers saved with the model (they stay float32 when the model is
    cast to another dtype: bfloat16 would round a speed of 65.3 to 65.0).

    Args:
        num_nodes: N.
        in_channels: C_in of the history.
        out_channels: C_out of the forecast.
        statistics: optional mapping of :data:`STATISTIC_NAMES` to ``(N, C)`` arrays, or ``(C,)``
            arrays shared by all nodes; None keeps the identity (``loc = 0``, ``scale = 1``).
        model: the owning model's name, for error messages.
    """

    def __init__(
        self,
        num_nodes: int,
        in_channels: int,
        out_channels: int,
        statistics: ScalingStatistics | None = None,
        model: str = "model",
    ) -> None:
        super().__init__()
        self.model = model
        shapes = {"past": (num_nodes, in_channels), "future": (num_nodes, out_channels)}
        for name in STATISTIC_NAMES:
            fill = torch.zeros if name.endswith("loc") else torch.ones
            self.register_buffer(name, fill(shapes[name.split("_")[0]], dtype=torch.float32))
        if statistics is not None:
            self.set_statistics(statistics)

    @property
    def num_nodes(self) -> int:
        """N, the nodes the statistics describe."""
        return self.past_loc.shape[0]

    def set_statistics(self, statistics: ScalingStatistics) -> None:
        """Replace the statistics; each must be ``(N, C)`` or ``(C,)`` with finite values, scales positive."""
        unknown = sorted(set(statistics) - set(STATISTIC_NAMES))
        missing = sorted(set(STATISTIC_NAMES) - set(statistics))
        if unknown or missing:
            raise ValueError(
                f"{self.model}: scaling statistics need exactly {list(STATISTIC_NAMES)}; "
                f"missing {missing}, unknown {unknown}"
            )
        for name in STATISTIC_NAMES:
            buffer = getattr(self, name)
            # on the CPU even under a meta-device context (transformers builds models there to load them)
            value = torch.as_tensor(np.asarray(statistics[name], dtype=np.float32), device="cpu")
            if value.dim() == 1 and value.shape[0] == buffer.shape[1]:
                value = value.expand_as(buffer)
            if value.shape != buffer.shape:
                raise ValueError(
                    f"{self.model}: scaling statistic {name} has shape {tuple(value.shape)} but the model has "
                    f"{buffer.shape[0]} nodes and {buffer.shape[1]} channels, so it must be {tuple(buffer.shape)}"
                )
            if not torch.isfinite(value).all() or (name.endswith("scale") and (value <= 0).any()):
                raise ValueError(f"{self.model}: scaling statistic {name} must be finite (and positive for a scale)")
            with torch.no_grad():
                buffer.copy_(value)

    def statistics(self) -> dict[str, list[list[float]]]:
        """The statistics as nested lists, the form a config stores."""
        return {name: getattr(self, name).tolist() for name in STATISTIC_NAMES}

    def _rows(self, name: str, node_index: torch.Tensor | None) -> torch.Tensor:
        table = getattr(self, name)
        return table if node_index is None else table[node_index]

    def normalise_past(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor,
        node_index: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``(past_values - loc) / scale`` ``(B, L, n, C_in)``, 0 where not observed, in ``dtype``."""
        loc, scale = self._rows("past_loc", node_index), self._rows("past_scale", node_index)
        scaled = (past_values.to(torch.float32) - loc) / scale
        scaled = torch.where(past_observed_mask, scaled, torch.zeros((), dtype=scaled.dtype, device=scaled.device))
        return scaled.to(dtype or past_values.dtype)

    def future_loc_scale(
        self, batch_size: int, node_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``loc`` and ``scale`` of the forecast, each ``(B, 1, n, C_out)`` float32."""
        loc, scale = self._rows("future_loc", node_index), self._rows("future_scale", node_index)
        shape = (batch_size, 1, *loc.shape)
        return loc.expand(shape), scale.expand(shape)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # a saved scaler of another graph would fail deep inside torch with a size mismatch; say it plainly
        for name in STATISTIC_NAMES:
            saved = state_dict.get(prefix + name)
            buffer = getattr(self, name)
            if saved is not None and tuple(saved.shape) != tuple(buffer.shape):
                raise ValueError(
                    f"{self.model}: the saved scaler ({prefix + name}) describes {saved.shape[0]} nodes x "
                    f"{saved.shape[-1]} channels but this model has {buffer.shape[0]} nodes x {buffer.shape[1]} "
                    f"channels"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> STScaler:
        super()._apply(fn, recurse)
        for name in STATISTIC_NAMES:
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return self
