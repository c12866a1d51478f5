"""A user's own forecaster with the output seam that every st-peft model has.

Adapters that refine a forecast (ST-LoRA's predictor) replace a forecaster's
``forecast_seam`` (:class:`~st_peft.forecasting.ForecastSeam`). The st-peft models have it; a
user's own ``nn.Module`` gets it by being wrapped, explicitly::

    model = get_peft_model(SeamedForecaster(my_module), STLoraConfig(**splits.size_kwargs()))

Nothing is added to ``my_module`` itself: no child, no hook.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from st_peft.checks import check_future_values, check_observed_mask
from st_peft.forecasting import ForecastContext, ForecastSeam, ScaledForecast, forecast_loss, inputs_for
from st_peft.losses import get_loss
from st_peft.outputs import TARGET_NAMES, ForecastOutput, prediction_of
from st_peft.tuners.st_lora.space import forecaster_scaler, history_channels_of, scaler_space, window_space


class SeamedForecaster(nn.Module):
    """Wrap a forecaster so that its forecast passes through an output seam in a scaled space.

    The forecast is scaled in the forecaster's own space when it has an
    :class:`~st_peft.scaling.STScaler` as its ``scaler`` attribute, else per window (each
    variable's observed history and forecast, see :mod:`st_peft.tuners.st_lora.space`). What the
    seam adds comes back in original units as ``prediction + scale * (seamed - scaled)``, so the
    identity seam returns the forecaster's forecast bit for bit.

    Args:
        forecaster: a module whose forward takes ``past_values`` ``(B, L, N, C_in)`` (and any other
            batch keys it names, or ``**kwargs``) and returns ``(B, H, N, C_out)`` or a
            ``ForecastOutput``, in original units. Its forward is given only the keys it names
            (:func:`~st_peft.forecasting.inputs_for`), and never the targets.
        output_history_channels: for each forecast channel, the history channel of the same
            variable; needed for the per-window space when ``C_in != C_out``.
    """

    def __init__(self, forecaster: nn.Module, output_history_channels: list[int] | None = None) -> None:
        super().__init__()
        self.forecaster = forecaster
        self.output_history_channels = output_history_channels
        self.forecast_seam = ForecastSeam()

    @property
    def scaler(self):
        """The forecaster's scaler, if it has one."""
        return forecaster_scaler(self.forecaster)

    def forward(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor | None = None,
        node_index: torch.Tensor | None = None,
        **batch: Any,
    ) -> ForecastOutput:
        """Forecast with the forecaster, through the seam, in original units.

        Args:
            past_values: history ``(B, L, n, C_in)`` in original units.
            past_observed_mask: bool like ``past_values``; by default every finite entry.
            node_index: int64 ``(n,)`` graph indices of the batch's nodes, or None.
            **batch: the batch's other keys; ``future_values`` / ``future_observed_mask`` give ``loss``
                (the forecaster's ``loss_fn``, else the masked MAE), the rest goes to the forecaster.

        Returns:
            :class:`~st_peft.outputs.ForecastOutput` with the seamed prediction and quantiles, the
            space's ``loc`` / ``scale``, ``aux_loss`` and ``loss`` when targets are given.
        """
        name = type(self.forecaster).__name__
        future_values, future_observed_mask = (batch.pop(key, None) for key in TARGET_NAMES)
        mask = check_observed_mask(past_observed_mask, past_values, model=name, name="past_observed_mask",
                                   values_name="past_values")
        given = {"past_values": past_values, "past_observed_mask": past_observed_mask, "node_index": node_index}
        call = {**{key: value for key, value in given.items() if value is not None}, **batch}
        output = self.forecaster(**inputs_for(self.forecaster, call))
        if not isinstance(output, (torch.Tensor, ForecastOutput)):
            raise TypeError(f"{name} must return a tensor (B, H, N, C_out) or a ForecastOutput; it returned "
                            f"{type(output).__name__}")
        prediction = prediction_of(output)
        quantiles = None if isinstance(output, torch.Tensor) else output.quantile_outputs
        aux_loss = None if isinstance(output, torch.Tensor) else output.aux_loss
        scaler = self.scaler
        if scaler is not None:
            space = scaler_space(scaler, past_values, mask, node_index, dtype=prediction.dtype)
        else:
            channels = history_channels_of(past_values.shape[-1], prediction.shape[-1], self.output_history_channels)
            space = window_space(past_values, mask, prediction, channels)
        scaled = space.normalise(prediction)
        scaled_quantiles = None if quantiles is None else (quantiles - space.loc[..., None]) / space.scale[..., None]
        seamed = self.forecast_seam(ScaledForecast(scaled, scaled_quantiles, aux_loss),
                                    ForecastContext(space.history, mask, node_index))
        shift = (space.scale * (seamed.prediction - scaled)).to(prediction.dtype)
        refined = prediction + shift
        if quantiles is not None:
            quantiles = quantiles + shift.unsqueeze(-1)
        loss = None
        if future_values is not None:
            batch_size, horizon, nodes, channels = refined.shape
            check_future_values(future_values, model=name, batch_size=batch_size, horizon=horizon, nodes=nodes,
                                out_channels=channels)
            loss_fn = getattr(self.forecaster, "loss_fn", None)
            loss = forecast_loss(refined, future_values, future_observed_mask,
                                 loss_fn if callable(loss_fn) else get_loss("mae"), model=name,
                                 aux_loss=seamed.aux_loss)
        return ForecastOutput(loss=loss, prediction_outputs=refined, quantile_outputs=quantiles, loc=space.loc,
                              scale=space.scale, aux_loss=seamed.aux_loss)
