"""The one contract of every st-peft model: one base class, one output seam in the scaled space."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, PreTrainedModel

import st_peft.data as std
from st_peft.backbones import BACKBONES
from st_peft.forecasting import ForecastContext, ForecastSeam, ScaledForecast, STPreTrainedModel
from st_peft.models.factost import FactoSTModel
from st_peft.models.st_link import STLinkConfig, STLinkForForecasting
from st_peft.shipped import shipped_checkpoint

MODELS = ("stid", "gwnet", "stgcn", "st_link", "factost")


@pytest.fixture(scope="module")
def chickenpox():
    """Splits of chickenpox (20 counties, weekly) and a test batch of 3 windows, 12 steps in, 4 out."""
    splits = std.build_splits(std.load("chickenpox"), input_len=12, horizon=4)
    return splits, next(splits.iter_batches("test", batch_size=3))


def build(name: str, splits) -> STPreTrainedModel:
    """A small model of each kind for ``splits``, in evaluation mode."""
    torch.manual_seed(0)
    if name == "st_link":
        gpt2 = GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64)
        return STLinkForForecasting(STLinkConfig(**splits.model_kwargs(), steps_per_day=splits.steps_per_day,
                                                 gpt2_config=gpt2, patch_len=3, num_unfrozen_layers=1)).eval()
    if name == "factost":
        return FactoSTModel.from_pretrained(shipped_checkpoint("factost-cpu")).eval()
    kwargs = {**splits.model_kwargs(), "steps_per_day": splits.steps_per_day}
    if name != "stid":
        kwargs["adjacency"] = splits.adjacency
    return BACKBONES[name](**kwargs).eval()


class ShiftByOne(ForecastSeam):
    """A seam that adds one scaled unit to the forecast, and records the context it saw."""

    def forward(self, forecast: ScaledForecast, context: ForecastContext) -> ScaledForecast:
        self.context = context
        quantiles = None if forecast.quantiles is None else forecast.quantiles + 1
        return ScaledForecast(forecast.prediction + 1, quantiles, forecast.aux_loss)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_has_one_output_seam_in_its_scaled_space(name, chickenpox):
    splits, batch = chickenpox
    model = build(name, splits)
    assert isinstance(model, PreTrainedModel) and isinstance(model, STPreTrainedModel)
    assert [key for key, module in model.named_modules() if isinstance(module, ForecastSeam)] == ["forecast_seam"]
    with torch.no_grad():
        plain = model(**batch)
        model.forecast_seam = ShiftByOne()
        shifted = model(**batch)
    # one scaled unit at the seam is one `scale` in original units, on the point and every quantile forecast
    torch.testing.assert_close(shifted.prediction_outputs, plain.prediction_outputs + plain.scale)
    if plain.quantile_outputs is not None:
        torch.testing.assert_close(shifted.quantile_outputs, plain.quantile_outputs + plain.scale[..., None])
    context = model.forecast_seam.context
    assert context.scaled_past.shape == batch["past_values"].shape and context.node_index is None
    expected = (batch["past_values"] - plain.loc[:, :1]) / plain.scale[:, :1]
    observed = context.past_observed_mask
    torch.testing.assert_close(context.scaled_past[observed], expected[observed].to(context.scaled_past.dtype))
    # the loss is the refined forecast's
    assert not torch.equal(model(**batch).loss, plain.loss)
