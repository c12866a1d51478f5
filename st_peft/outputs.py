"""Output containers shared by every model in the project."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class ForecastOutput(ModelOutput):
    """What a forecaster returns when it returns more than a tensor.

    Attributes:
        prediction: scaled point forecast ``(B, H, N, C_out)``.
        quantiles: scaled quantile forecasts ``(B, H, N, C_out, Q)``, if the model has them.
        loss: training loss computed by the model itself, if targets were given.
        aux_loss: an extra loss the trainer adds to the forecasting loss (router balance, L2 penalties).
    """

    prediction: torch.Tensor | None = None
    quantiles: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def prediction_of(output: torch.Tensor | ForecastOutput) -> torch.Tensor:
    """Return the point forecast ``(B, H, N, C_out)`` of a model's output, whatever its form."""
    if isinstance(output, torch.Tensor):
        return output
    return output.prediction
