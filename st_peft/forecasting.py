"""The one contract of every st-peft forecaster: check, scale, forecast, :class:`~st_peft.outputs.ForecastOutput`.

:class:`STPreTrainedModel` is the transformers ``PreTrainedModel`` base of every st-peft model
(STID, GWNet, STGCN, ST-LINK, FactoST). Its ``forward`` takes the batch by transformers'
time-series names and runs one path:

1. :meth:`STPreTrainedModel._check`: ``past_values`` ``(batch, time, nodes, channels)`` and its
   mask against the configuration;
2. :meth:`STPreTrainedModel._scale`: into the model's scaled space (the training span's
   :class:`~st_peft.scaling.STScaler` by default, instance normalisation where a model says so),
   giving ``loc`` / ``scale`` ``(batch, 1, nodes, C_out)`` back to original units;
3. :meth:`STPreTrainedModel._forecast`: the network, in the scaled space;
4. ``forecast_seam``: the identity, where an adapter refines the forecast;
5. :meth:`STPreTrainedModel._output`: back to original units (:func:`forecast_output`), plus
   ``loss`` whenever ``future_values`` is given.

A model with forward options of its own (FactoST's ``horizon``) passes them through
:meth:`STPreTrainedModel._forecast_path` to its ``_check`` and ``_forecast``.

Every model saves, pushes and loads through transformers' ``save_pretrained`` /
``push_to_hub`` / ``from_pretrained``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from st_peft.checks import check_future_values, check_observed_mask, check_past_values
from st_peft.losses import LossFn, get_loss
from st_peft.outputs import ForecastOutput
from st_peft.scaling import STScaler


def inputs_for(module: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` that ``module.forward`` accepts.

    A forward with ``**kwargs`` gets the whole batch; ``forward(self, past_values)`` gets
    ``past_values`` alone, so a user's module never breaks on the batch's other keys.

    Raises:
        TypeError: when the forward takes no ``past_values`` argument.
    """
    parameters = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(batch)
    if "past_values" not in parameters:
        raise TypeError(
            f"{type(module).__name__}.forward{inspect.signature(module.forward)} must take the history as "
            f"past_values (B, L, N, C_in); st-peft calls forecasters as model(past_values=..., **batch)"
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
    loss_fn: LossFn | None = None,
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
        loss_fn: the model's loss, used when ``future_values`` is given.
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
        if loss_fn is None:
            raise TypeError(f"{model}: forecast_output needs loss_fn to score future_values")
        batch, horizon, nodes, channels = prediction.shape
        check_future_values(future_values, model=model, batch_size=batch, horizon=horizon, nodes=nodes,
                            out_channels=channels)
        loss = forecast_loss(prediction, future_values, future_observed_mask, loss_fn, model=model,
                             aux_loss=aux_loss)
    return ForecastOutput(loss=loss, prediction_outputs=prediction, quantile_outputs=quantiles, loc=loc,
                          scale=scale, aux_loss=aux_loss)


@dataclass
class ScaledForecast:
    """What :meth:`STPreTrainedModel._forecast` may return instead of a bare prediction tensor.

    Attributes:
        prediction: ``(B, H, n, C_out)`` in the scaled space.
        quantiles: ``(B, H, n, C_out, Q)`` in the scaled space, or None.
        aux_loss: a scalar added to ``loss`` and reported as ``aux_loss`` (router balance), or None.
    """

    prediction: torch.Tensor
    quantiles: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class ForecastContext:
    """What the output seam may read besides the forecast, in the model's scaled space.

    Attributes:
        scaled_past: the history ``(B, L, n, C_in)`` as the network saw it (0 where not observed).
        past_observed_mask: bool ``(B, L, n, C_in)``, True where observed.
        node_index: int64 ``(n,)`` graph indices of the batch's nodes, or None for all of them.
    """

    scaled_past: torch.Tensor
    past_observed_mask: torch.Tensor
    node_index: torch.Tensor | None


class ForecastSeam(nn.Module):
    """The identity at every st-peft forecaster's output: where an adapter may refine the forecast.

    ``forward`` passes the scaled forecast through it before turning it into original units. A
    PEFT tuner (ST-LoRA's predictor) replaces this module by a tuner layer that wraps it, so the
    adapted path and the forecaster's own differ only by what the seam returns.
    """

    def forward(self, forecast: ScaledForecast, context: ForecastContext) -> ScaledForecast:
        """Return ``forecast`` unchanged."""
        return forecast


class STPreTrainedModel(PreTrainedModel):
    """Base of every st-peft forecaster ``(B, L, N, C_in) -> (B, H, N, C_out)``, in original units.

    A subclass implements :meth:`_forecast` on scaled tensors and may refine :meth:`_check`
    and :meth:`_scale`; ``forward`` is the one path through them. The default :meth:`_check`
    and :meth:`_scale` read ``num_nodes``, ``input_len``, ``in_channels`` from the config and
    use the model's ``scaler`` (:class:`~st_peft.scaling.STScaler`).

    The scaled forecast passes through ``forecast_seam`` (:class:`ForecastSeam`, an identity
    without parameters) before it is turned into original units; adapters that refine the
    forecast replace it.

    The reference backbones build their own layers as torch initialises them (so a seed gives
    the same weights as ever); models with transformers-style initialisation (ST-LINK, FactoST)
    override ``_init_weights``.
    """

    main_input_name = "past_values"
    # transformers.Trainer passes num_items_in_batch to models that take **kwargs unless told
    # not to; the loss here is a per-batch mean already
    accepts_loss_kwargs = False
    # False for a model that is a part of a forecaster (ST-LINK's token encoder), not one itself
    forecasts = True
    # True where each node's forecast reads that node's own inputs only (no graph, no attention across
    # nodes): evaluation may then run a few nodes at a time (st_peft.training.node_batches)
    forecasts_nodes_independently = False

    def __init__(self, config: PreTrainedConfig, *inputs: Any, **kwargs: Any) -> None:
        super().__init__(config, *inputs, **kwargs)
        if self.forecasts:
            self.forecast_seam = ForecastSeam()

    def _init_weights(self, module: nn.Module) -> None:
        """Leave the layers as their constructors initialised them."""

    @property
    def loss_fn(self) -> LossFn:
        """The training loss ``config.loss``, from :data:`st_peft.losses.LOSSES`."""
        return get_loss(self.config.loss)

    def _compute_dtype(self) -> torch.dtype:
        """The dtype of the network's first floating-point weight, in which it computes.

        Weights behind the seam are an adapter's, not the network's: with PEFT's
        ``autocast_adapter_dtype`` they are float32 on a bfloat16 forecaster (which is also why
        this is not ``PreTrainedModel.dtype``).
        """
        for name, parameter in self.named_parameters():
            if parameter.is_floating_point() and not name.startswith("forecast_seam."):
                return parameter.dtype
        return torch.float32

    def _check(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor | None,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        node_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """Refuse a history the model was not built for; return its observed mask, bool ``(B, L, n, C_in)``.

        The shared check reads the config's ``num_nodes``, ``input_len`` and ``in_channels``; a model
        with calendar inputs or forward options (FactoST's ``horizon``) refines it.
        """
        name = type(self).__name__
        config = self.config
        check_past_values(past_values, model=name, num_nodes=config.num_nodes, input_len=config.input_len,
                          in_channels=config.in_channels, node_index=node_index)
        return check_observed_mask(past_observed_mask, past_values, model=name, name="past_observed_mask",
                                   values_name="past_values")

    def _scale(
        self, past_values: torch.Tensor, mask: torch.Tensor, node_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The scaled history ``(B, L, n, C_in)`` and the forecast's ``loc``, ``scale`` ``(B, 1, n, C_out)``."""
        scaled = self.scaler.normalise_past(past_values, mask, node_index, dtype=self._compute_dtype())
        loc, scale = self.scaler.future_loc_scale(past_values.shape[0], node_index)
        return scaled, loc, scale

    def _forecast(
        self,
        scaled_past: torch.Tensor,
        past_observed_mask: torch.Tensor,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        node_index: torch.Tensor | None,
    ) -> torch.Tensor | ScaledForecast:
        """Forecast in the scaled space: ``(B, L, n, C_in) -> (B, H, n, C_out)`` (or a :class:`ScaledForecast`).

        ``past_observed_mask`` is the bool ``(B, L, n, C_in)`` of :meth:`_check`, for a network that
        reads which entries were observed (FactoST); ``scaled_past`` holds 0 where they were not.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _forecast")

    def _output(
        self,
        forecast: ScaledForecast,
        loc: torch.Tensor,
        scale: torch.Tensor,
        future_values: torch.Tensor | None,
        future_observed_mask: torch.Tensor | None,
    ) -> ForecastOutput:
        """The forecast in original units (``loc``, ``scale`` ``(B, 1, n, C_out)``), with ``config.loss`` when
        ``future_values`` ``(B, H, n, C_out)`` is given."""
        return forecast_output(forecast.prediction, loc, scale, model=type(self).__name__, loss_fn=self.loss_fn,
                               future_values=future_values, future_observed_mask=future_observed_mask,
                               scaled_quantiles=forecast.quantiles, aux_loss=forecast.aux_loss)

    def forward(
        self,
        past_values: torch.Tensor,
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
            past_values: history ``(B, L, N, C_in)`` in original units; entries that are not
                observed may hold anything (0, NaN).
            past_observed_mask: bool ``(B, L, N, C_in)``, True where observed; by default every
                finite entry.
            past_time_features: int64 ``(B, L, 2)``: time-of-day slot, day of week.
            future_time_features: int64 ``(B, H, 2)``.
            future_values: targets ``(B, H, N, C_out)`` in original units; when given the output
                holds ``loss``.
            future_observed_mask: bool ``(B, H, N, C_out)``, True where the target was observed.
            node_index: optional int64 ``(n,)``: the batch covers only these nodes of the graph.
            **kwargs: other keys of a batch (``num_items_in_batch``), ignored.

        Returns:
            :class:`~st_peft.outputs.ForecastOutput` with ``prediction_outputs`` ``(B, H, n, C_out)``,
            ``loc`` / ``scale`` ``(B, 1, n, C_out)``, ``quantile_outputs`` and ``aux_loss`` when the
            model has them, and ``loss`` when ``future_values`` is given.
        """
        return self._forecast_path(past_values, past_observed_mask, past_time_features, future_time_features,
                                   future_values, future_observed_mask, node_index)

    def _forecast_path(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor | None,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        future_values: torch.Tensor | None,
        future_observed_mask: torch.Tensor | None,
        node_index: torch.Tensor | None,
        **options: Any,
    ) -> ForecastOutput:
        """The one path of every forward: check, scale, forecast, the output seam, original units and loss.

        Takes the arguments of :meth:`forward` (shapes there). ``options`` are a model's own forward
        arguments (FactoST's ``horizon``, ``use_domain_prompts``), given to its :meth:`_check` and
        :meth:`_forecast`; the reference backbones and ST-LINK have none.
        """
        mask = self._check(past_values, past_observed_mask, past_time_features, future_time_features, node_index,
                           **options)
        scaled, loc, scale = self._scale(past_values, mask, node_index)
        forecast = self._forecast(scaled, mask, past_time_features, future_time_features, node_index, **options)
        if isinstance(forecast, torch.Tensor):
            forecast = ScaledForecast(forecast)
        forecast = self.forecast_seam(forecast, ForecastContext(scaled, mask, node_index))
        return self._output(forecast, loc, scale, future_values, future_observed_mask)

    @classmethod
    def from_pretrained(cls, *args: Any, output_loading_info: bool = False, ignore_mismatched_sizes: bool = False,
                        **kwargs: Any):
        """[`PreTrainedModel.from_pretrained`], refusing a scaler of another graph.

        A forecaster with another graph's statistics forecasts the wrong units, so a saved scaler
        whose shape differs from the model's is refused, naming both node counts, even with
        ``ignore_mismatched_sizes=True`` (transformers would then swap the saved statistics for
        the config's). transformers copies a checkpoint into the model itself
        (``STScaler._load_from_state_dict`` never runs), so it is asked to load with mismatches
        allowed and to report them; any other mismatch is refused as transformers refuses it
        unless ``ignore_mismatched_sizes`` is set.
        """
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True,
                                              **kwargs)
        mismatched = sorted(info["mismatched_keys"])
        for key, saved, expected in mismatched:
            if isinstance(model.get_submodule(key.rpartition(".")[0]), STScaler):
                raise ValueError(
                    f"{cls.__name__}: the checkpoint's scaler ({key}, shape {tuple(saved)}) describes "
                    f"{saved[0]} nodes but this model has {expected[0]} nodes (shape {tuple(expected)}); load it "
                    f"into a model of {saved[0]} nodes, or build one for the new graph with its data's splits"
                )
        if mismatched and not ignore_mismatched_sizes:
            shapes = ", ".join(f"{key} {tuple(saved)} vs {tuple(expected)}" for key, saved, expected in mismatched)
            raise RuntimeError(
                f"{cls.__name__}: the checkpoint's tensors differ in shape from the model's ({shapes}); pass "
                "ignore_mismatched_sizes=True to initialise them instead"
            )
        return (model, info) if output_loading_info else model
