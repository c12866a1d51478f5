"""FactoST backbone: raw values in, original units and loss out; rollout, save/load, pretraining, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForTimeSeriesPrediction, GPT2Config

import st_peft  # noqa: F401  (registers the Auto classes)
from st_peft.models.factost import (
    FACTOST_SIZES,
    FactoSTConfig,
    FactoSTModel,
    FactoSTTokenHook,
    FactoSTTokenHookOutput,
)
from st_peft.models.factost.modeling_factost import FactoSTAttention, masked_instance_norm, rotate_half_pairs
from st_peft.outputs import ForecastOutput

CHECKPOINT = Path(st_peft.__file__).parent / "checkpoints" / "factost-cpu"


def tiny_config(**overrides) -> FactoSTConfig:
    settings = {
        "patch_length": 4,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_context_length": 24,
        "max_horizon": 8,
        "dropout": 0.0,
    }
    settings.update(overrides)
    return FactoSTConfig(**settings)


@pytest.fixture(scope="module")
def model() -> FactoSTModel:
    torch.manual_seed(0)
    return FactoSTModel(tiny_config()).eval()


def test_shapes_and_median_is_the_point_forecast(model):
    past_values = torch.randn(3, 12, 5, 2)
    output = model(past_values=past_values, horizon=6)
    assert isinstance(output, ForecastOutput)
    assert output.prediction_outputs.shape == (3, 6, 5, 2)
    assert output.quantile_outputs.shape == (3, 6, 5, 2, 9)
    assert output.loc.shape == output.scale.shape == (3, 1, 5, 2)
    assert output.loss is None and "loss" not in output
    assert torch.equal(output.prediction_outputs, output.quantile_outputs[..., model.config.median_index])
    assert (output.quantile_outputs.diff(dim=-1) >= 0).all()


def test_horizon_defaults_to_the_future_time_features_then_the_future_values(model):
    past_values = torch.randn(2, 12, 3, 1)
    future_time_features = torch.zeros(2, 7, 2, dtype=torch.long)
    assert model(past_values, future_time_features=future_time_features).prediction_outputs.shape == (2, 7, 3, 1)
    assert model(past_values, future_values=torch.randn(2, 5, 3, 1)).prediction_outputs.shape == (2, 5, 3, 1)
    assert model(past_values).prediction_outputs.shape == (2, model.config.max_horizon, 3, 1)


def test_every_series_is_forecast_on_its_own(model):
    past_values = torch.randn(2, 12, 4, 2)
    changed = past_values.clone()
    changed[:, :, 1:] = torch.randn_like(changed[:, :, 1:])
    changed[:, :, 0, 1] += 3.0
    before = model(past_values, horizon=4).prediction_outputs
    after = model(changed, horizon=4).prediction_outputs
    torch.testing.assert_close(before[:, :, 0, 0], after[:, :, 0, 0])
    assert not torch.allclose(before[:, :, 0, 1], after[:, :, 0, 1])


def test_masked_instance_norm_matches_hand_computation():
    values = torch.tensor([[1.0, 2.0, 100.0, 3.0]])
    mask = torch.tensor([[True, True, False, True]])
    normalised, loc, scale = masked_instance_norm(values, mask, eps=0.0)
    assert loc.item() == pytest.approx(2.0)
    assert scale.item() == pytest.approx(math.sqrt(2.0 / 3.0))
    expected = torch.tensor([[-1.0, 0.0, 0.0, 1.0]]) / math.sqrt(2.0 / 3.0)
    torch.testing.assert_close(normalised, expected)


def test_raw_values_in_original_units_out_with_the_instance_statistics(model):
    past_values = torch.randn(2, 12, 3, 1)
    base = model(past_values, horizon=8)
    moved = model(5.0 * past_values + 70.0, horizon=8)
    torch.testing.assert_close(moved.quantile_outputs, 5.0 * base.quantile_outputs + 70.0, rtol=1e-4, atol=1e-3)
    # loc / scale are each series' mean and spread over the history; prediction = scaled * scale + loc
    torch.testing.assert_close(moved.loc, (5.0 * past_values + 70.0).mean(dim=1, keepdim=True))
    spread = (5.0 * past_values).var(dim=1, unbiased=False, keepdim=True)
    torch.testing.assert_close(moved.scale, torch.sqrt(spread + model.config.norm_eps))


def test_missing_values_are_ignored(model):
    past_values = torch.randn(2, 12, 3, 1)
    mask = torch.rand(2, 12, 3, 1) > 0.3
    mask[:, -1] = True
    other = torch.where(mask, past_values, torch.randn_like(past_values) * 50)
    first = model(past_values, past_observed_mask=mask, horizon=4).prediction_outputs
    second = model(other, past_observed_mask=mask, horizon=4).prediction_outputs
    torch.testing.assert_close(first, second)
    with_nan = torch.where(mask, past_values, torch.full_like(past_values, float("nan")))
    torch.testing.assert_close(model(with_nan, horizon=4).prediction_outputs, first)
    # without a mask, entries equal to config.missing_value (0, as the built-in data sets hold) are missing
    with_zero = torch.where(mask, past_values, torch.zeros_like(past_values))
    torch.testing.assert_close(model(with_zero, horizon=4).prediction_outputs, first)


def test_missing_value_none_counts_zeros_as_observed():
    torch.manual_seed(0)
    model = FactoSTModel(tiny_config(missing_value=None)).eval()
    past_values = torch.randn(1, 12, 2, 1)
    past_values[:, 3] = 0.0
    observed = torch.ones_like(past_values, dtype=torch.bool)
    torch.testing.assert_close(
        model(past_values, horizon=4).prediction_outputs,
        model(past_values, past_observed_mask=observed, horizon=4).prediction_outputs,
    )


def test_history_that_is_not_whole_patches_is_left_padded_as_missing(model):
    past_values = torch.randn(1, 14, 2, 1)
    padded = torch.cat((torch.zeros(1, 2, 2, 1), past_values), dim=1)
    mask = torch.cat((torch.zeros(1, 2, 2, 1, dtype=torch.bool), torch.ones_like(past_values, dtype=torch.bool)), dim=1)
    torch.testing.assert_close(
        model(past_values, horizon=4).prediction_outputs,
        model(padded, past_observed_mask=mask, horizon=4).prediction_outputs,
    )


def test_long_history_keeps_its_last_steps(model):
    past_values = torch.randn(1, 40, 2, 1)
    torch.testing.assert_close(
        model(past_values, horizon=4).prediction_outputs, model(past_values[:, -24:], horizon=4).prediction_outputs
    )


def test_rollout_extends_the_horizon(model):
    past_values = torch.randn(2, 12, 3, 1)
    long = model(past_values, horizon=20, rollout=True)
    assert long.prediction_outputs.shape == (2, 20, 3, 1)
    first = model(past_values, horizon=8)
    torch.testing.assert_close(long.prediction_outputs[:, :8], first.prediction_outputs)
    torch.testing.assert_close(long.loc, first.loc)
    fed_back = torch.cat((past_values, first.prediction_outputs), dim=1)
    torch.testing.assert_close(long.quantile_outputs[:, 8:16], model(fed_back, horizon=8).quantile_outputs)
    assert torch.equal(long.prediction_outputs, long.quantile_outputs[..., model.config.median_index])


def test_loss_is_the_masked_mae_of_the_point_forecast_in_original_units(model):
    generator = torch.Generator().manual_seed(3)
    past_values = 50.0 + 10.0 * torch.randn(2, 12, 3, 1, generator=generator)
    future_values = 50.0 + 10.0 * torch.randn(2, 4, 3, 1, generator=generator)
    future_observed_mask = torch.rand(2, 4, 3, 1, generator=generator) > 0.3
    future_values[~future_observed_mask] = 1e6  # never counted
    output = model(past_values, future_values=future_values, future_observed_mask=future_observed_mask)
    error = (output.prediction_outputs - future_values).abs()[future_observed_mask]
    torch.testing.assert_close(output.loss, error.mean())
    assert output.aux_loss is None


def test_pinball_loss_scores_every_quantile():
    torch.manual_seed(0)
    model = FactoSTModel(tiny_config(loss="pinball")).eval()
    past_values = torch.randn(2, 12, 3, 1)
    future_values = torch.randn(2, 4, 3, 1)
    future_observed_mask = torch.ones_like(future_values, dtype=torch.bool)
    future_observed_mask[0, 0] = False
    output = model(past_values, future_values=future_values, future_observed_mask=future_observed_mask)
    levels = torch.tensor(model.config.quantiles)
    error = future_values[..., None] - output.quantile_outputs
    by_hand = torch.maximum(levels * error, (levels - 1) * error).mean(dim=-1)[future_observed_mask].mean()
    torch.testing.assert_close(output.loss, by_hand)


def test_unknown_loss_is_refused():
    with pytest.raises(Exception, match=r"loss must be one of \['huber', 'mae', 'mse', 'pinball'\], got 'crps'"):
        tiny_config(loss="crps")


def test_old_output_names_are_refused_with_the_new_ones(model):
    with pytest.raises(AttributeError, match="ForecastOutput.prediction is now ForecastOutput.prediction_outputs"):
        _ = model(torch.randn(1, 12, 2, 1), horizon=4).prediction


def test_other_keyword_arguments_are_ignored(model):
    past_values = torch.randn(1, 12, 2, 1)
    plain = model(past_values, horizon=4).prediction_outputs
    assert torch.equal(model(past_values, horizon=4, num_items_in_batch=7).prediction_outputs, plain)
    assert FactoSTModel.accepts_loss_kwargs is False


def test_rotary_scores_depend_only_on_relative_positions():
    torch.manual_seed(1)
    query, key = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(q_pos: float, k_pos: float) -> torch.Tensor:
        rq = rotate_half_pairs(query, torch.tensor([q_pos]), 10000.0)
        rk = rotate_half_pairs(key, torch.tensor([k_pos]), 10000.0)
        return (rq * rk).sum()

    torch.testing.assert_close(score(5.0, 2.0), score(13.0, 10.0))
    assert not torch.allclose(score(5.0, 2.0), score(5.0, 4.0))


class PrefixHook(FactoSTTokenHook):
    """A hook that prepends two zero tokens, as an adapter's prompts would."""

    def forward(self, tokens, context):
        prefix = torch.zeros(*tokens.shape[:3], 2, tokens.shape[-1])
        return FactoSTTokenHookOutput(tokens=tokens, prefix_tokens=prefix)


def attention_positions(model: FactoSTModel, **kwargs) -> list[float]:
    seen = []
    attention = next(m for m in model.modules() if isinstance(m, FactoSTAttention))
    handle = attention.register_forward_hook(lambda module, args, output: seen.append(args[1].tolist()))
    try:
        model(**kwargs)
    finally:
        handle.remove()
    return seen[0]


def test_prefix_and_prompt_tokens_keep_the_context_positions():
    torch.manual_seed(0)
    model = FactoSTModel(tiny_config()).eval()
    past_values = torch.randn(1, 12, 2, 1)
    plain = attention_positions(model, past_values=past_values, horizon=8)
    assert plain == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    model.token_hook = PrefixHook()
    prompted = attention_positions(model, past_values=past_values, horizon=8, use_domain_prompts=True)
    # register, 2 hook prefixes and 3 matched prompts at 0; context and future unchanged
    assert prompted == [0.0] * 6 + [1.0, 2.0, 3.0, 4.0, 5.0]


def test_domain_prompts_are_the_closest_codebook_entries(model):
    codebook = model.domain_prompts.detach()
    query = codebook[[5, 2]] * 3.0
    matched = model.match_domain_prompts(query, top_k=1)
    torch.testing.assert_close(matched[:, 0], codebook[[5, 2]])


def test_save_and_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = FactoSTModel(tiny_config(loss="pinball")).eval()
    model.save_pretrained(tmp_path)
    for auto_class in (AutoModel, AutoModelForTimeSeriesPrediction):
        loaded = auto_class.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, FactoSTModel) and loaded.config.loss == "pinball"
        past_values, future_values = torch.randn(2, 12, 3, 1), torch.randn(2, 8, 3, 1)
        expected, got = model(past_values, future_values=future_values), loaded(past_values, future_values=future_values)
        assert torch.equal(expected.quantile_outputs, got.quantile_outputs)
        assert torch.equal(expected.loss, got.loss)
    assert isinstance(AutoConfig.for_model("factost"), FactoSTConfig)


def test_named_sizes():
    tiny = FactoSTModel(FactoSTConfig.from_size("tiny"))
    assert abs(tiny.num_parameters() - 4.4e6) / 4.4e6 < 0.05
    assert set(FACTOST_SIZES) == {"cpu", "small", "medium", "tiny-long", "tiny", "base"}
    with pytest.raises(ValueError, match="unknown FactoST size 'huge'"):
        FactoSTConfig.from_size("huge")


def test_series_shorter_than_one_patch_is_refused(model):
    with pytest.raises(ValueError, match=r"past_values has shape \(1, 3, 2, 1\): its history of 3 steps is shorter "
                       r"than one patch \(4 steps\)"):
        model(torch.randn(1, 3, 2, 1), horizon=2)


def test_horizon_above_the_maximum_needs_rollout(model):
    with pytest.raises(ValueError, match=r"horizon 9 exceeds the model's max_horizon \(8\); pass rollout=True"):
        model(torch.randn(1, 12, 2, 1), horizon=9)


def test_bad_shapes_are_refused_naming_the_tensor_and_both_shapes(model):
    past_values = torch.randn(1, 12, 2, 1)
    with pytest.raises(ValueError, match=r"expects past_values of shape \(batch, time, nodes, channels\); got a 3-d"):
        model(torch.randn(12, 2, 1), horizon=2)
    with pytest.raises(ValueError, match=r"past_observed_mask has shape \(1, 12, 3, 1\) but past_values has shape "
                       r"\(1, 12, 2, 1\)"):
        model(past_values, past_observed_mask=torch.ones(1, 12, 3, 1, dtype=torch.bool), horizon=2)
    with pytest.raises(ValueError, match=r"future_values has shape \(1, 6, 2, 1\): its horizon is 6 steps, the "
                       r"model forecasts horizon=4"):
        model(past_values, future_values=torch.randn(1, 6, 2, 1), horizon=4)
    with pytest.raises(ValueError, match=r"future_observed_mask has shape \(1, 4, 2\) but future_values has shape "
                       r"\(1, 4, 2, 1\)"):
        model(past_values, future_values=torch.randn(1, 4, 2, 1), future_observed_mask=torch.ones(1, 4, 2).bool())
    with pytest.raises(ValueError, match=r"future_time_features has shape \(1, 3, 2\) but past_values has shape "
                       r"\(1, 12, 2, 1\) and the horizon is 4, so it must be \(1, H >= 4, F\)"):
        model(past_values, future_time_features=torch.zeros(1, 3, 2, dtype=torch.long), horizon=4)
    with pytest.raises(ValueError, match=r"past_time_features has shape \(1, 10, 2\) but past_values has shape "
                       r"\(1, 12, 2, 1\) and the horizon is 4, so it must be \(1, 12, F\)"):
        model(past_values, past_time_features=torch.zeros(1, 10, 2, dtype=torch.long), horizon=4)
    with pytest.raises(ValueError, match="expects integer past_time_features"):
        model(past_values, past_time_features=torch.zeros(1, 12, 2), horizon=4)


def test_checkpoint_of_another_model_type_is_refused(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model type 'gpt2', not 'factost'"):
        FactoSTModel.from_pretrained(tmp_path)


def test_bad_configs_are_refused():
    with pytest.raises(Exception, match="must be increasing and contain 0.5"):
        tiny_config(quantiles=[0.1, 0.9])
    with pytest.raises(Exception, match="is not a multiple of num_attention_heads"):
        tiny_config(hidden_size=18, num_attention_heads=4)


def test_shipped_checkpoint_loads_as_a_time_series_prediction_model_and_is_small():
    weights = CHECKPOINT / "model.safetensors"
    assert weights.stat().st_size <= 20 * 1024 * 1024
    assert json.loads((CHECKPOINT / "config.json").read_text())["model_type"] == "factost"
    model = AutoModelForTimeSeriesPrediction.from_pretrained(CHECKPOINT).eval()
    assert isinstance(model, FactoSTModel) and model.config.loss == "mae"
    output = model(torch.randn(2, 12, 3, 1), horizon=12)
    assert torch.isfinite(output.quantile_outputs).all()


@pytest.fixture(scope="module")
def sz_taxi_test_batch():
    from st_peft.data import build_splits, load

    splits = build_splits(load("sz-taxi"), input_len=12, horizon=12)
    starts = np.asarray(splits.test["start"])[::24]
    return splits, starts, splits.collator.gather(starts)


def test_shipped_checkpoint_beats_seasonal_naive_zero_shot_on_held_out_sz_taxi_from_raw_values(sz_taxi_test_batch):
    from st_peft.baselines import seasonal_naive_forecast
    from st_peft.metrics import masked_mae

    splits, _, batch = sz_taxi_test_batch
    model = AutoModelForTimeSeriesPrediction.from_pretrained(CHECKPOINT).eval()
    with torch.no_grad():
        output = model(**batch)
    target, mask = batch["future_values"], batch["future_observed_mask"]
    zero_shot = float(masked_mae(output.prediction_outputs, target, mask))
    assert float(output.loss) == pytest.approx(zero_shot, rel=1e-6)
    naive = float(masked_mae(torch.from_numpy(seasonal_naive_forecast(splits)[::24]), target, mask))
    assert zero_shot < 0.95 * naive
    assert zero_shot == pytest.approx(3.608, abs=0.01)


def test_shipped_checkpoint_forecasts_the_same_from_raw_and_from_standardised_values(sz_taxi_test_batch):
    splits, _, batch = sz_taxi_test_batch
    model = AutoModelForTimeSeriesPrediction.from_pretrained(CHECKPOINT).eval()
    mean, std = float(splits.scaler.mean[0]), float(splits.scaler.std[0])
    mask = batch["past_observed_mask"]
    standardised = torch.where(mask, (batch["past_values"] - mean) / std, torch.zeros(()))
    with torch.no_grad():
        raw = model(past_values=batch["past_values"], past_observed_mask=mask, horizon=12).prediction_outputs
        scaled = model(past_values=standardised, past_observed_mask=mask, horizon=12).prediction_outputs
    # a history with no observed step has no statistics to map back; and the normalisation's epsilon
    # (added to the variance) weighs differently in the two units on nearly constant histories
    seen = mask.any(dim=1, keepdim=True).expand_as(raw)
    difference = (raw - (scaled * std + mean))[seen].abs()
    assert difference.max() < 0.05 and difference.mean() < 1e-3
