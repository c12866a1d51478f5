"""What every st-peft forecaster does around its network: check the batch, scale, loss, output.

:class:`STForecaster` is the base of the reference backbones (STID, GWNet, STGCN): its
``forward`` takes the batch by transformers' time-series names, normalises ``past_values``
with the model's :class:`~st_peft.scaling.STScaler`, calls the subclass's ``_forecast`` in the
scaled space and returns a :class:`~st_peft.outputs.ForecastOutput` in original units, with
``loss`` whenever ``future_values`` is given. :func:`forecast_output` is the shared last step,
also used by the transformers models and the ST-LoRA predictor.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from st_peft.checks import check_future_values, check_observed_mask, check_past_values
from st_peft.losses import LOSSES, LossFn, get_loss
from st_peft.outputs import RENAMED_INPUTS, ForecastOutput, require_past_values
from st_peft.scaling import ScalingStatistics, STScaler


def inputs_for(module: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` that ``module.forward`` accepts.

    A forward with ``**kwargs`` gets the whole batch; ``forward(self, past_values)`` gets
    ``past_values`` alone, so a user's module never breaks on the batch's other keys.

    Raises:
        TypeError: when the forward takes no ``past_values`` argument (naming the renamed
            arguments of st-peft 0.0 when it takes those).
    """
    parameters = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(batch)
    if "past_values" not in parameters:
        old = [name for name in parameters if name in RENAMED_INPUTS]
        hint = f" ({', '.join(f'{n!r} is now {RENAMED_INPUTS[n]!r}' for n in old)})" if old else ""
        raise TypeError(
            f"{type(module).__name__}.forward{inspect.signature(module.forward)} must take the history as "
            f"past_values (B, L, N, C_in){hint}; st-peft calls forecasters as model(past_values=..., **batch)"
        )
    return {key: value for key, value in batch.items() if key in parameters}


def forecast_loss(
    prediction: torch.Tensor,
    future_values: torch.Tensor,
    future_observed_mask: torch.Tensor | None,
    loss_fn: LossFn,
    *,
    model: str,
    aux_loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked loss of ``prediction`` against ``future_values`` (both ``(B, H, N, C_out)``, original units).

    Args:
        prediction: the forecast.
        future_values: the targets; non-finite entries never count.
        future_observed_mask: bool like ``future_values``, True where observed; None counts
            every finite target.
        loss_fn: ``(prediction, target, mask) -> 0-dim tensor``.
        model: the model's name, for error messages.
        aux_loss: added to the loss when given.
    """
    mask = check_observed_mask(future_observed_mask, future_values, model=model, name="future_observed_mask",
                               values_name="future_values")
    loss = loss_fn(prediction, future_values.to(prediction.dtype), mask)
    return loss if aux_loss is None else loss + aux_loss


def forecast_output(
    scaled_prediction: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    *,
    model: str,
    loss_fn: LossFn,
    future_values: torch.Tensor | None = None,
    future_observed_mask: torch.Tensor | None = None,
    scaled_quantiles: torch.Tensor | None = None,
    aux_loss: torch.Tensor | None = None,
) -> ForecastOutput:
    """Bring a scaled forecast back to original units and add the loss.

    Args:
        scaled_prediction: ``(B, H, N, C_out)`` in the model's scaled space.
        loc, scale: ``(B, 1, N, C_out)``; ``prediction = scaled * scale + loc``.
        model: the model's name, for error messages.
        loss_fn: the model's loss.
        future_values: targets ``(B, H, N, C_out)`` in original units, or None (no loss).
        future_observed_mask: bool like ``future_values``.
        scaled_quantiles: ``(B, H, N, C_out, Q)`` in the scaled space, or None.
        aux_loss: a scalar added to ``loss`` and reported on its own.
    """
    prediction = scaled_prediction * scale + loc
    quantiles = None
    if scaled_quantiles is not None:
        quantiles = scaled_quantiles * scale.unsqueeze(-1) + loc.unsqueeze(-1)
    loss = None
    if future_values is not None:
        batch, horizon, nodes, channels = prediction.shape
        check_future_values(future_values, model=model, batch_size=batch, horizon=horizon, nodes=nodes,
                            out_channels=channels)
        loss = forecast_loss(prediction, future_values, future_observed_mask, loss_fn, model=model,
                             aux_loss=aux_loss)
    return ForecastOutput(loss=loss, prediction_outputs=prediction, quantile_outputs=quantiles, loc=loc,
                          scale=scale, aux_loss=aux_loss)


class STForecaster(nn.Module, metaclass=abc.ABCMeta):
    """Base of a forecaster ``(B, L, N, C_in) -> (B, H, N, C_out)`` with scaling inside.

    A subclass calls :meth:`_init_forecaster` first in its ``__init__`` and implements
    :meth:`_forecast` on scaled tensors; ``forward`` does the rest.

    Attributes:
        scaler: the training span's statistics (identity when built without them).
        loss_fn: the training loss, picked by name from :data:`st_peft.losses.LOSSES`.
    """

    # transformers.Trainer passes num_items_in_batch to models that take **kwargs unless told
    # not to; the loss here is a per-batch mean already
    accepts_loss_kwargs = False

    def _init_forecaster(
        self,
        num_nodes: int,
        input_len: int,
        horizon: int,
        in_channels: int,
        out_channels: int,
        scaling: ScalingStatistics | None,
        loss: str,
    ) -> None:
        self.num_nodes = num_nodes
        self.input_len = input_len
        self.horizon = horizon
        self.in_channels = in_channels
        self.out_channels = out_channels
        if loss not in LOSSES:
            raise ValueError(f"{type(self).__name__}: unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
        self.loss_name = loss
        self.loss_fn: LossFn = get_loss(loss)
        # registered first, so a saved scaler of another graph is reported before any other mismatch
        self.scaler = STScaler(num_nodes, in_channels, out_channels, scaling, model=type(self).__name__)

    @abc.abstractmethod
    def _forecast(
        self,
        scaled_past: torch.Tensor,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        node_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """Forecast in the scaled space: ``(B, L, n, C_in) -> (B, H, n, C_out)``."""

    def _compute_dtype(self) -> torch.dtype:
        for parameter in self.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.float32

    def forward(
        self,
        past_values: torch.Tensor | None = None,
        past_observed_mask: torch.Tensor | None = None,
        past_time_features: torch.Tensor | None = None,
        future_time_features: torch.Tensor | None = None,
        future_values: torch.Tensor | None = None,
        future_observed_mask: torch.Tensor | None = None,
        node_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ForecastOutput:
        """Forecast the next ``horizon`` steps in original units.

        Args:
            past_values: history ``(B, L, N, C_in)`` in original units (required; a keyword
                default only so that a call with an old name is told the new one); entries that
                are not observed may hold anything (0, NaN).
            past_observed_mask: bool ``(B, L, N, C_in)``, True where observed; by default every
                finite entry.
            past_time_features: int64 ``(B, L, 2)``: time-of-day slot, day of week.
            future_time_features: int64 ``(B, H, 2)``.
            future_values: targets ``(B, H, N, C_out)`` in original units; when given the output
                holds ``loss``.
            future_observed_mask: bool ``(B, H, N, C_out)``, True where the target was observed.
            node_index: optional int64 ``(n,)``: the batch covers only these nodes of the graph.
            **kwargs: other keys of a batch (``num_items_in_batch``), ignored; the argument names
                of st-peft 0.0 (``x``, ``y``, ...) are refused with their new names.

        Returns:
            :class:`~st_peft.outputs.ForecastOutput` with ``prediction_outputs`` ``(B, H, n, C_out)``,
            ``loc`` / ``scale`` ``(B, 1, n, C_out)`` and ``loss`` when ``future_values`` is given.
        """
        name = type(self).__name__
        require_past_values(past_values, kwargs, name)
        check_past_values(past_values, model=name, num_nodes=self.num_nodes, input_len=self.input_len,
                          in_channels=self.in_channels, node_index=node_index)
        mask = check_observed_mask(past_observed_mask, past_values, model=name, name="past_observed_mask",
                                   values_name="past_values")
        scaled = self.scaler.normalise_past(past_values, mask, node_index, dtype=self._compute_dtype())
        scaled_prediction = self._forecast(scaled, past_time_features, future_time_features, node_index)
        loc, scale = self.scaler.future_loc_scale(past_values.shape[0], node_index)
        return forecast_output(scaled_prediction, loc, scale, model=name, loss_fn=self.loss_fn,
                               future_values=future_values, future_observed_mask=future_observed_mask)

