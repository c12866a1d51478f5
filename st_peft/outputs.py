"""The one output class of every st-peft model, and the names of the batch it reads.

Names follow transformers' time-series models (PatchTST, TimesFM): ``past_values`` in,
``loss`` / ``prediction_outputs`` / ``loc`` / ``scale`` out, with a node axis added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

INPUT_NAMES = (
    "past_values",
    "past_observed_mask",
    "past_time_features",
    "future_time_features",
    "future_values",
    "future_observed_mask",
    "node_index",
)
"""Keyword arguments of every st-peft model's ``forward`` (the keys of a batch)."""

TARGET_NAMES = ("future_values", "future_observed_mask")
"""Batch keys that hold the targets; a model computes ``loss`` from them."""

RENAMED_OUTPUTS = {"prediction": "prediction_outputs", "quantiles": "quantile_outputs"}


@dataclass
class ForecastOutput(ModelOutput):
    """What every st-peft forecaster returns.

    Attributes:
        loss: masked loss in original units over the observed ``future_values`` (plus
            ``aux_loss``), when ``future_values`` was given.
        prediction_outputs: point forecast in original units ``(B, H, N, C_out)``.
        quantile_outputs: quantile forecasts in original units ``(B, H, N, C_out, Q)``, if the
            model has them.
        loc: the shift that maps the model's scaled space to original units ``(B, 1, N, C_out)``.
        scale: the matching factor ``(B, 1, N, C_out)``; ``prediction = scaled * scale + loc``.
        aux_loss: an extra loss already included in ``loss`` (router balance, L2 penalties).
    """

    loss: torch.Tensor | None = None
    prediction_outputs: torch.Tensor | None = None
    quantile_outputs: torch.Tensor | None = None
    loc: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        if name in RENAMED_OUTPUTS:
            raise AttributeError(f"ForecastOutput.{name} is now ForecastOutput.{RENAMED_OUTPUTS[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def prediction_of(output: torch.Tensor | ForecastOutput) -> torch.Tensor:
    """Return the point forecast ``(B, H, N, C_out)`` of a model's output, whatever its form."""
    if isinstance(output, torch.Tensor):
        return output
    return output.prediction_outputs
