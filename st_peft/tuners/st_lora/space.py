"""The well-conditioned space in which the ST-LoRA predictor refines a forecast.

Forecasters return forecasts in original units (a speed of 65, a count of 3,000). The
predictor reads the history and the forecast normalised, ``(value - loc) / scale``, and returns
a correction in that space; the refined forecast is ``prediction + scale * correction``, so a
zero correction returns the forecaster's forecast bit for bit. Two spaces:

- **the forecaster's own**, when it carries an :class:`~st_peft.scaling.STScaler` as its
  ``scaler`` attribute (every reference backbone, any :class:`~st_peft.forecasting.STPreTrainedModel` with an ``STScaler``):
  the history is scaled as the forecaster scales it and the forecast with the scaler's
  ``future_loc`` / ``future_scale``;
- **per window** otherwise (a user's own module): for every sample, node and variable, ``loc``
  and ``scale`` are the mean and standard deviation of what the predictor sees of that variable,
  its observed history steps together with the forecaster's forecast of it, the standard
  deviation floored at :data:`MIN_SCALE`. Including the forecast keeps every normalised value
  within ``sqrt(L + H - 1)`` of zero: a history that is flat (a road at night, a region
  without bikes) would otherwise divide the forecast by a near-zero spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from st_peft.scaling import STScaler

MIN_SCALE = 1e-5
"""Floor of the per-window standard deviation, in the data's units."""


@dataclass
class PredictorSpace:
    """The space of one forward pass.

    Attributes:
        history: the normalised history ``(B, L, n, C_in)``, 0 where not observed.
        loc: ``(B, 1, n, C_out)``; a forecast ``y`` in original units is ``(y - loc) / scale``
            in this space.
        scale: ``(B, 1, n, C_out)``, positive.
    """

    history: torch.Tensor
    loc: torch.Tensor
    scale: torch.Tensor

    def normalise(self, prediction: torch.Tensor) -> torch.Tensor:
        """``(prediction - loc) / scale`` for a forecast ``(B, H, n, C_out)`` in original units.

        In the wider of the forecast's and the statistics' dtypes (float32 at least for the
        forecaster's scaler, whose statistics are float32).
        """
        return (prediction - self.loc) / self.scale


def forecaster_scaler(forecaster: nn.Module) -> STScaler | None:
    """The forecaster's :class:`STScaler` (its ``scaler`` attribute), or None when it has none."""
    scaler = getattr(forecaster, "scaler", None)
    return scaler if isinstance(scaler, STScaler) else None


def history_channels_of(in_channels: int, out_channels: int, output_history_channels: list[int] | None) -> list[int]:
    """For each forecast channel, the history channel holding the same variable.

    Raises:
        ValueError: when ``in_channels != out_channels`` and no mapping was given.
    """
    if output_history_channels is not None:
        return list(output_history_channels)
    if in_channels != out_channels:
        raise ValueError(
            f"The ST-LoRA predictor normalises each forecast channel with the statistics of the history channel "
            f"that holds the same variable, but the forecaster has no STScaler (a `scaler` attribute) and "
            f"in_channels={in_channels} != out_channels={out_channels}, so that channel is unknown. Set "
            f"STLoraConfig.output_history_channels (for each of the {out_channels} forecast channels, a history "
            f"channel in [0, {in_channels}); with splits: [splits.input_channels.index(c) for c in "
            f"splits.target_channels]), or give the forecaster an st_peft.scaling.STScaler as `scaler`"
        )
    return list(range(out_channels))


def scaler_space(
    scaler: STScaler,
    past_values: torch.Tensor,
    past_observed_mask: torch.Tensor,
    node_index: torch.Tensor | None,
    dtype: torch.dtype,
) -> PredictorSpace:
    """The forecaster's scaled space: its scaler's history and forecast statistics.

    Args:
        scaler: the forecaster's scaler.
        past_values: history ``(B, L, n, C_in)`` in original units.
        past_observed_mask: bool like ``past_values``.
        node_index: int64 ``(n,)`` or None (all nodes).
        dtype: dtype of the normalised history.
    """
    history = scaler.normalise_past(past_values, past_observed_mask, node_index, dtype=dtype)
    loc, scale = scaler.future_loc_scale(past_values.shape[0], node_index)
    return PredictorSpace(history=history, loc=loc, scale=scale)


def window_space(
    past_values: torch.Tensor,
    past_observed_mask: torch.Tensor,
    prediction: torch.Tensor,
    history_channels: list[int],
) -> PredictorSpace:
    """Per-window masked instance normalisation of each variable over its history and forecast.

    Args:
        past_values: history ``(B, L, n, C_in)`` in original units (anything where not observed).
        past_observed_mask: bool like ``past_values``.
        prediction: the forecaster's forecast ``(B, H, n, C_out)`` in original units.
        history_channels: for each forecast channel, its history channel.

    Returns:
        The space, in float32 or the forecast's dtype when wider (a bfloat16 forecast would round
        the statistics); history channels with no forecast channel are normalised over their
        history alone.
    """
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    prediction = prediction.to(dtype)
    # statistics, not a network: autocast would run the one-hot products in bfloat16
    with torch.autocast(prediction.device.type, enabled=False):
        zero = torch.zeros((), dtype=dtype, device=prediction.device)
        history = torch.where(past_observed_mask, past_values.to(dtype), zero)
        observed = past_observed_mask.to(dtype)
        # (C_out, C_in): row j is one-hot at the history channel of forecast channel j
        channel_of = F.one_hot(torch.tensor(history_channels, device=prediction.device),
                               past_values.shape[-1]).to(dtype)
        count = (observed.sum(1, keepdim=True) + prediction.shape[1] * channel_of.sum(0)).clamp_min(1)
        loc = (history.sum(1, keepdim=True) + prediction.sum(1, keepdim=True) @ channel_of) / count
        forecast_loc = loc[..., history_channels]
        squares = ((history - loc) * observed).pow(2).sum(1, keepdim=True)
        squares = squares + (prediction - forecast_loc).pow(2).sum(1, keepdim=True) @ channel_of
        scale = (squares / count).sqrt().clamp_min(MIN_SCALE)
        return PredictorSpace(history=(history - loc) / scale * observed, loc=forecast_loc,
                              scale=scale[..., history_channels])
