"""ST-LoRA as a PEFT method: identity at init, loss of the refined forecast, the predictor's space,
adapters' life cycle, save/load, bad input, the reference backbones and training with Trainer."""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments

import st_peft  # noqa: F401  (registers STLORA)
from st_peft import loading_backbone_weights
from st_peft.backbones import BACKBONES
from st_peft.data import build_splits, load
from st_peft.forecasting import ForecastSeam, forecast_loss
from st_peft.losses import masked_mae
from st_peft.outputs import ForecastOutput
from st_peft.tuners.st_lora import STLoraConfig, STLoraModel
from st_peft.tuners.st_lora.layer import NodeAdaptiveLayer
from st_peft.tuners.st_lora.seamed import SeamedForecaster
from st_peft.tuners.st_lora.space import window_space

LENGTH, HORIZON = 12, 12


@pytest.fixture(scope="module")
def los_loop():
    """Splits of los-loop (207 road sensors, speeds in mph) and a validation batch of 4 windows."""
    splits = build_splits(load("los-loop"), input_len=LENGTH, horizon=HORIZON)
    return splits, next(splits.iter_batches("val", batch_size=4))


@pytest.fixture(scope="module")
def chickenpox():
    """Splits of chickenpox (20 counties, weekly) and a validation batch of 4 windows."""
    splits = build_splits(load("chickenpox"), input_len=LENGTH, horizon=HORIZON)
    return splits, next(splits.iter_batches("val", batch_size=4))


@pytest.fixture()
def batch(los_loop) -> dict[str, torch.Tensor]:
    return dict(los_loop[1])


NODES = 207  # los-loop's


class TinyForecaster(nn.Module):
    """A user's forecaster: a per-node MLP over the history ``(B, L, N, 1) -> (B, H, N, 1)``."""

    def __init__(self, num_nodes: int = NODES) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.fc1 = nn.Linear(LENGTH, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, HORIZON)

    def forward(self, past_values: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = self.fc2(self.act(self.fc1(past_values[..., 0].transpose(1, 2))))
        return hidden.transpose(1, 2).unsqueeze(-1)


class PastValuesOnly(nn.Module):
    """A user's module whose forward takes exactly ``past_values``: last value plus a learned per-step offset."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(HORIZON, 1, 1))

    def forward(self, past_values):
        return past_values[:, -1:] + self.offset


class ConvForecaster(nn.Module):
    """A user's forecaster with a convolution over ``(B, C, N, L)`` (time on the last axis)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=(1, 3), padding=(0, 1))
        self.head = nn.Linear(4 * LENGTH, HORIZON)

    def forward(self, past_values: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = self.conv(past_values.permute(0, 3, 2, 1))  # (B, 4, N, L)
        batch, channels, nodes, length = hidden.shape
        out = self.head(hidden.permute(0, 2, 1, 3).reshape(batch, nodes, channels * length))
        return out.transpose(1, 2).unsqueeze(-1)


def frozen_output(backbone: nn.Module, **inputs):
    """The backbone's output with its weights frozen, as they are under the adapter.

    torch picks its matmul kernel for batched inputs by whether the weight requires grad, so
    outputs are compared bit for bit only between weights in the same state.
    """
    backbone.requires_grad_(False)
    return backbone(**inputs)


def config(**overrides) -> STLoraConfig:
    return STLoraConfig(**{"num_nodes": NODES, "input_len": LENGTH, "horizon": HORIZON, **overrides})


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move the trainable adapter weights away from their initial values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "stl_" in name and parameter.requires_grad:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))


def mae(prediction: torch.Tensor, batch: dict) -> torch.Tensor:
    """The masked MAE of a forecast against the batch's targets (what a user's module is trained on)."""
    return forecast_loss(prediction, batch["future_values"], batch["future_observed_mask"], masked_mae, model="test")


def make_backbone(name: str, splits) -> nn.Module:
    """A tiny reference backbone carrying the training span's scaling statistics."""
    kwargs = splits.model_kwargs()
    if name == "stid":
        return BACKBONES[name](**kwargs, steps_per_day=splits.steps_per_day, embed_dim=8, node_dim=8, tod_dim=8,
                               dow_dim=8)
    if name == "gwnet":
        return BACKBONES[name](**kwargs, adjacency=splits.adjacency, residual_channels=8, dilation_channels=8,
                               skip_channels=16, end_channels=16)
    return BACKBONES[name](**kwargs, adjacency=splits.adjacency, block_channels=(8, 4, 8))


def test_registered_as_peft_type():
    assert PeftType.STLORA == "STLORA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.STLORA] is STLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.STLORA] is STLoraModel
    assert config().peft_type is PeftType.STLORA


def test_config_is_built_from_the_splits_sizes(los_loop):
    splits, _ = los_loop
    cfg = STLoraConfig(**splits.size_kwargs())
    assert (cfg.num_nodes, cfg.input_len, cfg.horizon, cfg.in_channels, cfg.out_channels) == (NODES, 12, 12, 1, 1)


# identity at initialisation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"target_modules": ["fc1", "fc2"]}, {"num_blocks": 2, "dropout": 0.1},
     {"num_blocks": 0, "target_modules": ["fc1"]}, {"scaling_l2": 0.5}],
)
def test_users_module_output_and_loss_equal_the_backbone_exactly_at_init(batch, overrides):
    torch.manual_seed(0)
    backbone = TinyForecaster()
    expected = frozen_output(backbone, **batch)
    model = get_peft_model(SeamedForecaster(backbone), config(**overrides))
    model.train()  # dropout on the low-rank path must not matter while B is zero
    output = model(**batch)
    assert isinstance(output, ForecastOutput)
    assert torch.equal(output.prediction_outputs, expected)
    assert torch.equal(output.loss, mae(expected, batch))


@pytest.mark.parametrize(
    ("name", "targets", "node_axis"),
    [("stid", None, -2), ("stid", ["fc1"], -2), ("gwnet", None, -2), ("gwnet", ["filter_conv"], -2),
     ("stgcn", None, -2), ("stgcn", ["theta"], 1)],
)
def test_reference_backbone_output_and_loss_equal_exactly_at_init(chickenpox, name, targets, node_axis):
    splits, batch = chickenpox
    torch.manual_seed(0)
    backbone = make_backbone(name, splits).eval()
    expected = frozen_output(backbone, **batch)
    model = get_peft_model(backbone, STLoraConfig(**splits.size_kwargs(), target_modules=targets,
                                                  node_axis=node_axis)).eval()
    output = model(**batch)
    with model.disable_adapter():
        disabled = model(**batch)
    assert torch.equal(disabled.prediction_outputs, expected.prediction_outputs)
    assert torch.equal(output.loc, expected.loc) and torch.equal(output.scale, expected.scale)
    if name == "stgcn" and targets:
        # an enabled wrapped theta is called on the paper's Chebyshev terms, the plain one (and a disabled
        # wrapper's base layer) sums them by Clenshaw's recurrence: equal up to rounding
        torch.testing.assert_close(output.prediction_outputs, expected.prediction_outputs, rtol=1e-5, atol=1e-5)
        return
    assert torch.equal(output.prediction_outputs, expected.prediction_outputs)
    assert torch.equal(output.loss, expected.loss)


# a user's own module --------------------------------------------------------------------------------------


def test_module_taking_exactly_past_values_trains_and_returns_loss(los_loop):
    splits, batch = los_loop
    backbone = PastValuesOnly()
    expected = frozen_output(backbone, past_values=batch["past_values"])
    model = get_peft_model(SeamedForecaster(backbone), config())
    output = model(**batch)
    assert torch.equal(output.prediction_outputs, expected)
    start = output.loss.item()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for train_batch in itertools.islice(splits.iter_batches("train", batch_size=32), 15):
        loss = model(**train_batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model(**batch).loss.item() < start
    with model.disable_adapter():  # the module's own output: it sees past_values only
        assert torch.equal(model(**batch).prediction_outputs, batch["past_values"][:, -1:] + backbone.offset)


def test_module_without_past_values_is_told_the_contract(batch):
    class OtherNames(nn.Module):
        def forward(self, x):
            return x

    model = get_peft_model(SeamedForecaster(OtherNames()), config())
    with pytest.raises(TypeError, match="must take the history as past_values"):
        model(**batch)


def test_past_values_may_be_positional(batch):
    model = get_peft_model(SeamedForecaster(TinyForecaster()), config())
    perturb(model)
    positional = model(batch["past_values"], future_values=batch["future_values"])
    keyword = model(past_values=batch["past_values"], future_values=batch["future_values"])
    assert torch.equal(positional.prediction_outputs, keyword.prediction_outputs)
    assert torch.equal(positional.loss, keyword.loss)



# the predictor's space ------------------------------------------------------------------------------------


def test_scaled_space_of_a_backbone_with_a_scaler(los_loop):
    """The predictor sees the history as the backbone scales it, and refines in the backbone's scaled space."""
    splits, batch = los_loop
    backbone = make_backbone("stid", splits).eval()
    model = get_peft_model(backbone, STLoraConfig(**splits.size_kwargs()))
    perturb(model)
    head = model.base_model.model.forecast_seam.stl_heads["default"]
    seen = {}
    head.register_forward_pre_hook(lambda module, args: seen.update(history=args[0], prediction=args[1]))
    output = model(**batch)
    with model.disable_adapter():
        plain = model(**batch)
    scaler = backbone.scaler
    torch.testing.assert_close(seen["history"], scaler.normalise_past(batch["past_values"], batch["past_observed_mask"]),
                               rtol=0, atol=0)
    loc, scale = scaler.future_loc_scale(4)
    assert torch.equal(output.loc, loc) and torch.equal(output.scale, scale)
    torch.testing.assert_close(seen["prediction"], (plain.prediction_outputs - loc) / scale)
    correction = head(seen["history"], seen["prediction"], None)
    torch.testing.assert_close(output.prediction_outputs, plain.prediction_outputs + scale * correction)


def test_own_space_normalises_each_window_over_its_history_and_forecast(batch):
    """A module without a scaler: per window, node and variable, mean and std of history and forecast."""
    backbone = TinyForecaster()
    past = batch["past_values"].clone()
    past[:, :, 0] = 0.0  # a flat history: its forecast must still come out well scaled
    mask = batch["past_observed_mask"].clone()
    mask[:, :4, 1] = False  # unobserved steps do not count
    past[:, :4, 1] = float("nan")
    prediction = frozen_output(backbone, past_values=torch.where(mask, past, 0.0))
    model = get_peft_model(SeamedForecaster(backbone), config())
    output = model(past_values=torch.where(mask, past, 0.0), past_observed_mask=mask)
    assert torch.equal(output.prediction_outputs, prediction)
    seen = torch.cat([past[0, 4:, 1, 0], prediction[0, :, 1, 0]])
    torch.testing.assert_close(output.loc[0, 0, 1, 0], seen.mean())
    torch.testing.assert_close(output.scale[0, 0, 1, 0], seen.std(unbiased=False))
    space = window_space(past, mask, prediction, [0])
    bound = math.sqrt(LENGTH + HORIZON - 1) + 1e-4
    assert space.history.abs().max() <= bound and space.normalise(prediction).abs().max() <= bound
    assert not space.history.isnan().any() and torch.equal(space.history[:, :4, 1], torch.zeros(4, 4, 1))


class TwoChannelsInOneOut(nn.Module):
    """A user's module reading two channels and forecasting one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * LENGTH, HORIZON)

    def forward(self, past_values: torch.Tensor, **kwargs) -> torch.Tensor:
        batch, length, nodes, channels = past_values.shape
        flat = past_values.permute(0, 2, 1, 3).reshape(batch, nodes, length * channels)
        return self.fc(flat).transpose(1, 2).unsqueeze(-1)


def test_forecast_channel_of_another_history_channel_needs_the_mapping():
    splits = build_splits(load("nyc-bike"), input_len=LENGTH, horizon=HORIZON, target_channels=[1])
    sizes = splits.size_kwargs()
    with pytest.raises(ValueError, match="in_channels=2 != out_channels=1.*output_history_channels"):
        get_peft_model(SeamedForecaster(TwoChannelsInOneOut()), STLoraConfig(**sizes))
    with pytest.raises(ValueError, match=r"output_history_channels must list.*got \[2\]"):
        STLoraConfig(**sizes, output_history_channels=[2])
    channels = [splits.input_channels.index(c) for c in splits.target_channels]
    batch = next(splits.iter_batches("val", batch_size=2))
    backbone = TwoChannelsInOneOut()
    expected = frozen_output(backbone, **batch)
    model = get_peft_model(SeamedForecaster(backbone), STLoraConfig(**sizes, output_history_channels=channels))
    output = model(**batch)
    assert torch.equal(output.prediction_outputs, expected)
    outflow = torch.cat([batch["past_values"][0, :, 5, 1], expected[0, :, 5, 0]])
    torch.testing.assert_close(output.loc[0, 0, 5, 0], outflow.mean())


# the output and its loss ----------------------------------------------------------------------------------


def test_loss_is_the_backbones_loss_of_the_refined_forecast(chickenpox):
    splits, batch = chickenpox
    backbone = BACKBONES["stid"](**splits.model_kwargs(), steps_per_day=1, embed_dim=8, node_dim=8, tod_dim=8,
                                 dow_dim=8, loss="huber")
    model = get_peft_model(backbone, STLoraConfig(**splits.size_kwargs()))
    perturb(model)
    output = model(**batch)
    with model.disable_adapter():
        plain = model(**batch)
    assert not torch.equal(output.prediction_outputs, plain.prediction_outputs)
    expected = forecast_loss(output.prediction_outputs, batch["future_values"], batch["future_observed_mask"],
                             backbone.loss_fn, model="STID")
    assert torch.equal(output.loss, expected)
    assert output.aux_loss is None
    assert model(**{k: v for k, v in batch.items() if not k.startswith("future_values")}).loss is None


def test_targets_of_the_wrong_horizon_are_refused_with_both_shapes(batch):
    model = get_peft_model(SeamedForecaster(TinyForecaster()), config())
    with pytest.raises(ValueError, match=r"\(4, 12, 207, 1\) but future_values has shape \(4, 6, 207, 1\)"):
        model(past_values=batch["past_values"], future_values=batch["future_values"][:, :6])


def test_adapter_changes_only_what_it_should_and_disable_restores_backbone(chickenpox):
    splits, batch = chickenpox
    backbone = make_backbone("stid", splits).eval()
    expected = frozen_output(backbone, **batch)
    model = get_peft_model(backbone, STLoraConfig(**splits.size_kwargs(), target_modules=["fc1"]))
    perturb(model)
    adapted = model(**batch)
    assert adapted.prediction_outputs.shape == (4, HORIZON, 20, 1)
    assert not torch.allclose(adapted.prediction_outputs, expected.prediction_outputs)
    with model.disable_adapter():
        plain = model(**batch)
    assert torch.equal(plain.prediction_outputs, expected.prediction_outputs)
    assert torch.equal(plain.loss, expected.loss)
    assert torch.equal(model(**batch).prediction_outputs, adapted.prediction_outputs)


def test_scaling_penalty_is_aux_loss_and_part_of_loss(batch):
    backbone = TinyForecaster()
    expected = frozen_output(backbone, **batch)
    model = get_peft_model(SeamedForecaster(backbone), config(target_modules=["fc1"], scaling_l2=0.5))
    output = model(**batch)
    assert torch.equal(output.prediction_outputs, expected) and output.aux_loss.item() == 0.0
    perturb(model)
    output = model(**batch)
    layer = model.base_model.model.forecaster.fc1
    head = model.base_model.model.forecast_seam.stl_heads["default"]
    by_hand = (layer.stl_node_scale["default"] - 1).pow(2).sum()
    for nall in head.blocks[0].layers:
        by_hand = by_hand + (head.node_embedding @ nall.generator).pow(2).sum()
    torch.testing.assert_close(output.aux_loss, 0.5 * by_hand)
    torch.testing.assert_close(output.loss, mae(output.prediction_outputs, batch) + output.aux_loss)


class QuantileForecaster(TinyForecaster):
    """A forecaster returning a ``ForecastOutput`` with quantiles ``(B, H, N, 1, 3)`` and an aux_loss."""

    def forward(self, past_values: torch.Tensor, **kwargs) -> ForecastOutput:
        median = super().forward(past_values)
        spread = torch.tensor([-1.0, 0.0, 1.0])
        return ForecastOutput(prediction_outputs=median, quantile_outputs=median.unsqueeze(-1) + spread,
                              aux_loss=torch.tensor(0.25), loss=median.sum())


def test_forecast_output_prediction_and_quantiles_are_refined_together(batch):
    backbone = QuantileForecaster()
    expected = frozen_output(backbone, **batch)
    model = get_peft_model(SeamedForecaster(backbone), config())
    perturb(model)
    output = model(**batch)
    shift = output.prediction_outputs - expected.prediction_outputs
    assert shift.abs().max() > 0
    torch.testing.assert_close(output.quantile_outputs, expected.quantile_outputs + shift.unsqueeze(-1))
    # the forecaster's own loss described the unrefined forecast: the loss is that of the refined one
    torch.testing.assert_close(output.loss, mae(output.prediction_outputs, batch) + 0.25)
    assert output.aux_loss.item() == 0.25


# NALLs ----------------------------------------------------------------------------------------------------


def test_nall_matches_hand_computed_per_node_formula():
    torch.manual_seed(0)
    layer = NodeAdaptiveLayer(nn.Linear(6, 3), "fc")
    layer.update_layer("default", config(num_nodes=5, r=2, alpha=4.0))
    perturb(layer)
    x = torch.randn(2, 5, 6)  # nodes on axis -2
    out = layer(x)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A = layer.stl_down["default"].weight
    B = layer.stl_up["default"].weight
    s = layer.stl_node_scale["default"]
    for i in range(5):
        A_i = torch.diag(s[i]) @ A
        expected = x[:, i] @ W.T + b + (4.0 / 2) * x[:, i] @ (B @ A_i).T
        torch.testing.assert_close(out[:, i], expected)


def test_conv_nall_is_node_specific(batch):
    model = get_peft_model(SeamedForecaster(ConvForecaster()), config(num_blocks=0, target_modules=["conv"], node_axis=2))
    perturb(model)
    before = model(**batch).prediction_outputs
    with torch.no_grad():
        model.base_model.model.forecaster.conv.stl_node_scale["default"][0] += 1.0
    after = model(**batch).prediction_outputs
    assert not torch.allclose(after[:, :, 0], before[:, :, 0])
    assert torch.equal(after[:, :, 1:], before[:, :, 1:])


def test_node_index_selects_rows_of_the_node_factors(batch):
    model = get_peft_model(SeamedForecaster(TinyForecaster()), config(target_modules=["fc1"]))
    perturb(model)
    index = torch.tensor([3, 1])
    full = model(**batch)
    subset = model(**{key: value[:, :, index] if value.dim() == 4 else value for key, value in batch.items()},
                   node_index=index)
    torch.testing.assert_close(subset.prediction_outputs, full.prediction_outputs[:, :, index])


def test_stgcn_calls_a_wrapped_theta(chickenpox):
    """STGCN reads theta's weight only while theta is the plain nn.Linear; wrapped, theta is called on the
    paper's Chebyshev terms, so the NALL changes the forecast and trains."""
    splits, batch = chickenpox
    torch.manual_seed(0)
    backbone = make_backbone("stgcn", splits).eval()
    expected = frozen_output(backbone, **batch).prediction_outputs
    model = get_peft_model(backbone, STLoraConfig(**splits.size_kwargs(), num_blocks=0, target_modules=["theta"],
                                                  node_axis=1))
    output = model(**batch)
    torch.testing.assert_close(output.prediction_outputs, expected, rtol=1e-5, atol=1e-5)  # Clenshaw = recurrence
    output.loss.backward()
    for name, parameter in model.named_parameters():
        if "stl_up" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    perturb(model)
    assert not torch.allclose(model(**batch).prediction_outputs, expected)


def test_stgcn_with_peft_lora_on_theta_disables_bit_for_bit(chickenpox):
    """A disabled, unmerged LoRA on theta gives the plain forecaster's output bit for bit (its base layer is
    summed the same way); merged, the LoRA's update is in the weight and the adapter changes the forecast."""
    splits, batch = chickenpox
    torch.manual_seed(0)
    backbone = make_backbone("stgcn", splits).eval()
    expected = frozen_output(backbone, **batch).prediction_outputs
    model = get_peft_model(backbone, LoraConfig(r=2, target_modules=["theta"], init_lora_weights=False)).eval()
    adapted = model(**batch).prediction_outputs
    assert not torch.allclose(adapted, expected)
    with model.disable_adapter():
        assert torch.equal(model(**batch).prediction_outputs, expected)
    model.merge_adapter()
    torch.testing.assert_close(model(**batch).prediction_outputs, adapted, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():  # a merged layer is called, so peft unmerges it first
        torch.testing.assert_close(model(**batch).prediction_outputs, expected, rtol=1e-5, atol=1e-5)


def test_layers_to_transform_on_a_layer_named_in_full_is_refused():
    with pytest.raises(ValueError, match=r"target_modules names \['forecaster.fc1'\] in full"):
        get_peft_model(SeamedForecaster(TinyForecaster()),
                       config(target_modules=["forecaster.fc1"], layers_to_transform=[0]))


def test_adapters_of_other_sizes_on_one_forecaster_are_refused():
    model = get_peft_model(SeamedForecaster(TinyForecaster()), config())
    with pytest.raises(ValueError, match="has horizon=6 but adapter 'default' on the same forecaster has horizon=12"):
        model.add_adapter("short", config(horizon=6))


# adapters' life cycle -------------------------------------------------------------------------------------


def test_backbone_frozen_and_unchanged_by_training(batch):
    backbone = TinyForecaster()
    original = copy.deepcopy(backbone.state_dict())
    model = get_peft_model(SeamedForecaster(backbone), config(target_modules=["fc1"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("stl_" in name for name in trainable)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unloaded = model.unload()
    for key, value in unloaded.forecaster.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_train_backbone_makes_backbone_trainable_and_saves_it(tmp_path, batch):
    backbone = TinyForecaster()
    model = get_peft_model(SeamedForecaster(backbone), config(train_backbone=True))
    assert model.base_model.model.forecaster.fc1.weight.requires_grad
    with torch.no_grad():
        model.base_model.model.forecaster.fc2.bias.add_(1.0)
    perturb(model)
    expected = model(**batch)
    model.save_pretrained(tmp_path)
    # the file's own train_backbone=True is not enough: the caller allows the backbone's weights at load time
    fresh = TinyForecaster()
    state = {key: value.clone() for key, value in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"carries the forecaster's own weights .*loading_backbone_weights"):
        PeftModel.from_pretrained(SeamedForecaster(fresh), tmp_path, is_trainable=True)
    assert all(torch.equal(value, state[key]) for key, value in fresh.state_dict().items())
    with loading_backbone_weights():
        reloaded = PeftModel.from_pretrained(SeamedForecaster(fresh), tmp_path, is_trainable=True)
    assert torch.equal(reloaded(**batch).prediction_outputs, expected.prediction_outputs)


def test_no_parameter_or_saved_key_is_named_like_lora(tmp_path, chickenpox):
    """peft's LoRA-FA optimizer freezes every parameter whose name contains ``lora_A``; LoRA's own
    helpers match ``lora_``. ST-LoRA's names contain neither, in the model or in its checkpoint."""
    splits, _ = chickenpox
    model = get_peft_model(make_backbone("gwnet", splits), STLoraConfig(**splits.size_kwargs(),
                                                                        target_modules=["filter_conv"]))
    names = [name for name, _ in model.named_parameters()]
    assert any("stl_" in name for name in names)
    assert not any("lora_" in name for name in names)
    model.save_pretrained(tmp_path)
    assert not any("lora_" in key for key in load_file(tmp_path / "adapter_model.safetensors"))


def test_a_wrapped_layer_that_stops_running_later_is_refused(batch):
    """The check that every wrapped layer ran is made in every call, not only the first."""

    class SometimesSkips(TinyForecaster):
        skip = False

        def forward(self, past_values: torch.Tensor, **kwargs) -> torch.Tensor:
            if not self.skip:
                return super().forward(past_values)
            return past_values[:, -1:].expand(-1, HORIZON, -1, -1)

    backbone = SometimesSkips()
    model = get_peft_model(SeamedForecaster(backbone), config(target_modules=["fc1"]))
    model(**batch)
    backbone.skip = True
    with pytest.raises(RuntimeError, match=r"wrapped \['forecaster.fc1'\] of SeamedForecaster, but its forward never"):
        model(**batch)


def test_print_trainable_parameters_counts_hand_computed(capsys):
    cfg = config(r=2, hidden_dim=8, node_embedding_dim=3, num_nall_layers=4, num_blocks=1)
    model = get_peft_model(SeamedForecaster(TinyForecaster()), cfg)
    # node embedding 207*3; input 24->8; 4 NALLs of (8*8+8) + 8*2 + 2*8 + 3*2; output 8->12; gate 13->12
    predictor = NODES * 3 + (24 * 8 + 8) + 4 * (72 + 16 + 16 + 6) + (8 * 12 + 12) + (13 * 12 + 12)
    backbone = 12 * 16 + 16 + 16 * 12 + 12
    trainable, total = model.get_nb_trainable_parameters()
    assert (trainable, total) == (predictor, predictor + backbone)
    model.print_trainable_parameters()
    assert f"trainable params: {predictor:,}" in capsys.readouterr().out


def test_save_and_load_reproduce_outputs_exactly(tmp_path, batch):
    torch.manual_seed(0)
    backbone = TinyForecaster()
    fresh, fresh_frozen = SeamedForecaster(copy.deepcopy(backbone)), SeamedForecaster(copy.deepcopy(backbone))
    model = get_peft_model(SeamedForecaster(backbone), config(target_modules=["fc1"], num_blocks=2))
    perturb(model)
    model.eval()
    expected = model(**batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "STLORA" and saved["num_nodes"] == NODES
    # is_trainable: the adapter's weights require grad, as in the saved model (see frozen_output)
    output = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)(**batch)
    assert torch.equal(output.prediction_outputs, expected.prediction_outputs)
    assert torch.equal(output.loss, expected.loss)
    # frozen weights take another kernel: about 1e-6 of the inputs' scale (speeds of about 60 mph) apart
    output = PeftModel.from_pretrained(fresh_frozen, tmp_path)(**batch)
    torch.testing.assert_close(output.prediction_outputs, expected.prediction_outputs, rtol=1e-5, atol=1e-4)


def test_named_adapters_each_own_predictor(tmp_path, batch):
    backbone = TinyForecaster()
    expected = frozen_output(backbone, **batch)
    fresh = SeamedForecaster(copy.deepcopy(backbone))
    model = get_peft_model(SeamedForecaster(backbone), config(), adapter_name="city_a")

    def predict(peft_model):
        return peft_model(**batch).prediction_outputs

    perturb(model, seed=1)
    out_a = predict(model)
    model.add_adapter("city_b", config(target_modules=["fc2"]))
    assert torch.equal(predict(model), out_a)  # adding does not activate
    model.set_adapter("city_b")
    assert torch.equal(predict(model), expected)  # a new adapter starts at the backbone
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("city_b" in name for name in trainable)
    perturb(model, seed=2)
    out_b = predict(model)
    assert not torch.allclose(out_a, out_b)
    with model.disable_adapter():
        assert torch.equal(model(**batch).prediction_outputs, expected)
    model.save_pretrained(tmp_path)

    # PEFT saves adapters not named "default" in sub-folders named after them
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "city_a", adapter_name="city_a", is_trainable=True)
    reloaded.load_adapter(tmp_path / "city_b", adapter_name="city_b", is_trainable=True)
    assert torch.equal(predict(reloaded), out_a)
    reloaded.set_adapter("city_b")
    assert torch.equal(predict(reloaded), out_b)

    model.set_adapter("city_a")
    model.delete_adapter("city_b")
    assert list(model.peft_config) == ["city_a"]
    assert not any("city_b" in name for name, _ in model.named_parameters())
    assert torch.equal(predict(model), out_a)


def test_unload_returns_the_untouched_backbone(batch):
    backbone = TinyForecaster()
    expected = frozen_output(backbone, **batch)
    model = get_peft_model(SeamedForecaster(backbone), config(target_modules=["fc1"]))
    perturb(model)
    unloaded = model.unload()
    assert unloaded.forecaster is backbone and type(backbone.fc1) is nn.Linear
    assert type(unloaded.forecast_seam) is ForecastSeam
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in unloaded.modules())
    assert torch.equal(unloaded(**batch).prediction_outputs, expected)


def test_merge_is_refused_with_reason():
    model = get_peft_model(SeamedForecaster(TinyForecaster()), config(target_modules=["fc1"]))
    with pytest.raises(ValueError, match="cannot be merged.*different s_i for every node"):
        model.merge_and_unload()


# bad input ------------------------------------------------------------------------------------------------


def test_num_nodes_differs_from_data(batch):
    model = get_peft_model(SeamedForecaster(TinyForecaster()), config())
    wrong = torch.cat([batch["past_values"], batch["past_values"][:, :, :1]], dim=2)
    with pytest.raises(ValueError, match=rf"built for num_nodes={NODES} but past_values has {NODES + 1} nodes"):
        model(past_values=wrong)


def test_num_nodes_differs_from_backbone(chickenpox):
    with pytest.raises(ValueError, match=r"num_nodes=7 but the forecaster TinyForecaster has num_nodes=207"):
        get_peft_model(SeamedForecaster(TinyForecaster()), STLoraConfig(num_nodes=7))
    splits, _ = chickenpox
    with pytest.raises(ValueError, match=r"num_nodes=7 but the forecaster STID has num_nodes=20"):
        get_peft_model(make_backbone("stid", splits), STLoraConfig(**{**splits.size_kwargs(), "num_nodes": 7}))


def test_a_refused_adapter_leaves_the_backbone_bit_for_bit(tmp_path, chickenpox):
    """A checkpoint that trained the backbone along, with one backbone tensor changed and one adapter
    tensor of the wrong shape: refused before any write, and the backbone keeps its modules, its
    weights, no hooks and its forward."""
    splits, batch = chickenpox
    torch.manual_seed(0)
    model = get_peft_model(make_backbone("stid", splits).eval(),
                           STLoraConfig(**splits.size_kwargs(), target_modules=["fc1"], train_backbone=True))
    perturb(model)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    bias = next(key for key in weights if key.endswith("regression.bias"))
    weights[bias] = weights[bias] + 1.0
    misshapen = next(key for key in weights if "stl_heads" in key and weights[key].dim() == 2)
    weights[misshapen] = torch.zeros(1, 1)
    save_file(weights, tmp_path / "adapter_model.safetensors")

    torch.manual_seed(0)
    backbone = make_backbone("stid", splits).eval()
    modules = [(name, type(module)) for name, module in backbone.named_modules()]
    state = {key: value.clone() for key, value in backbone.state_dict().items()}
    with torch.no_grad():
        expected = backbone(**batch).prediction_outputs
    with loading_backbone_weights(), pytest.raises(ValueError, match=r"tensors of other shapes than the model's .*\(1, 1\)"):
        PeftModel.from_pretrained(backbone, tmp_path)
    assert [(name, type(module)) for name, module in backbone.named_modules()] == modules
    assert backbone.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in backbone.state_dict().items())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in backbone.modules())
    with torch.no_grad():
        assert torch.equal(backbone(**batch).prediction_outputs, expected)


def test_num_nodes_differs_from_saved_adapter(tmp_path):
    get_peft_model(SeamedForecaster(TinyForecaster()), config()).save_pretrained(tmp_path)
    other = STLoraConfig(num_nodes=6, input_len=LENGTH, horizon=HORIZON)
    with pytest.raises(ValueError, match=rf"trained on {NODES} nodes .* num_nodes=6"):
        PeftModel.from_pretrained(SeamedForecaster(TinyForecaster(num_nodes=6)), tmp_path, config=other)


def test_unknown_target_module_is_named():
    with pytest.raises(ValueError, match="target_modules entry 'fc9' matches no module of TinyForecaster"):
        get_peft_model(SeamedForecaster(TinyForecaster()), config(target_modules=["fc1", "fc9"]))


def test_layer_type_nall_cannot_wrap_is_named():
    with pytest.raises(TypeError, match="cannot wrap target module 'forecaster.act' of type ReLU"):
        get_peft_model(SeamedForecaster(TinyForecaster()), config(target_modules=["act"]))
    with pytest.raises(TypeError, match="'forecaster.conv'.*node_axis=1"):
        get_peft_model(SeamedForecaster(ConvForecaster()), config(target_modules=["conv"], node_axis=1))


# reference backbones and training -------------------------------------------------------------------------


def train_two_steps(model: nn.Module, batch: dict) -> None:
    """Two Adam steps of the trainable parameters on the model's own loss of one real batch."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    ("name", "targets", "node_axis"),
    [("stid", ["fc1"], -2), ("gwnet", ["filter_conv"], -2), ("stgcn", ["theta"], 1)],
)
def test_backbones_train_and_round_trip(tmp_path, chickenpox, name, targets, node_axis):
    splits, batch = chickenpox
    torch.manual_seed(0)
    backbone = make_backbone(name, splits).eval()
    fresh = copy.deepcopy(backbone)
    expected = frozen_output(backbone, **batch)
    cfg = STLoraConfig(**splits.size_kwargs(), target_modules=targets, node_axis=node_axis)
    model = get_peft_model(backbone, cfg).eval()
    train_two_steps(model, batch)
    adapted = model(**batch)
    assert not torch.equal(adapted.prediction_outputs, expected.prediction_outputs)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True).eval()(**batch)
    assert torch.equal(reloaded.prediction_outputs, adapted.prediction_outputs)
    assert torch.equal(reloaded.loss, adapted.loss)


def test_frozen_backbone_keeps_eval_behaviour_while_the_adapter_trains(chickenpox):
    """GWNet's batch norms and dropout run in evaluation mode in every call of a training adapter: the
    running statistics never move. Nothing stays attached to the forecaster between calls."""
    splits, batch = chickenpox
    torch.manual_seed(0)
    backbone = make_backbone("gwnet", splits)  # dropout and batch norm: both depend on the mode
    expected = frozen_output(copy.deepcopy(backbone).eval(), **batch)
    statistics = {key: value.clone() for key, value in backbone.state_dict().items() if "running" in key}
    model = get_peft_model(backbone, STLoraConfig(**splits.size_kwargs(), dropout=0.5))
    model.train()
    norms = [module for module in backbone.modules() if isinstance(module, nn.BatchNorm2d)]
    modes = []
    norms[0].register_forward_pre_hook(lambda module, args: modes.append(module.training))
    # the zero-initialised correction, on the eval-mode backbone
    assert torch.equal(model(**batch).prediction_outputs, expected.prediction_outputs)
    assert modes == [False]
    heads = model.base_model.model.forecast_seam.stl_heads["default"]
    assert all(module.training for module in heads.modules())
    # between calls the forecaster is in the mode its user set, with no hook of ST-LoRA's
    assert all(module.training for module in backbone.layers.modules())
    assert not backbone._forward_hooks and not backbone._forward_pre_hooks
    train_two_steps(model, batch)
    for key, value in statistics.items():
        assert torch.equal(backbone.state_dict()[key], value), key
    model.eval()
    with model.disable_adapter():
        assert torch.equal(model(**batch).prediction_outputs, expected.prediction_outputs)
    assert model.unload().training is False


def test_modules_to_save_copies_train_while_the_frozen_forecaster_stays_in_eval_mode():
    class DropoutHead(TinyForecaster):
        def __init__(self) -> None:
            super().__init__()
            self.fc2 = nn.Sequential(nn.Linear(16, HORIZON), nn.Dropout(0.5))

    model = get_peft_model(SeamedForecaster(DropoutHead()), config(modules_to_save=["fc2"]))
    model.train()
    wrapper = model.base_model.model.forecaster.fc2
    modes = {}
    for name, module in (("copy", wrapper.modules_to_save["default"][1]), ("fc1", model.base_model.model.forecaster.fc1)):
        module.register_forward_pre_hook(lambda module, args, name=name: modes.update({name: module.training}))
    model(past_values=torch.randn(2, LENGTH, NODES, 1))
    assert modes == {"copy": True, "fc1": False}


def test_backbone_trained_along_is_in_training_mode(chickenpox):
    splits, _ = chickenpox
    model = get_peft_model(make_backbone("gwnet", splits), STLoraConfig(**splits.size_kwargs(), train_backbone=True))
    model.train()
    assert all(module.training for module in model.base_model.model.modules())
    model.eval()
    assert not any(module.training for module in model.base_model.model.modules())


def test_plain_transformers_trainer_trains_st_lora_wrapped_gwnet(tmp_path, los_loop):
    splits, _ = los_loop
    torch.manual_seed(0)
    model = get_peft_model(make_backbone("gwnet", splits), STLoraConfig(**splits.size_kwargs()))
    held_out = next(splits.iter_batches("val", batch_size=64))
    with torch.no_grad():
        before = model(**held_out).loss.item()
    args = TrainingArguments(str(tmp_path), max_steps=20, per_device_train_batch_size=16, learning_rate=1e-2,
                             label_names=["future_values"], remove_unused_columns=False, report_to="none",
                             use_cpu=True, save_strategy="no", logging_steps=5, disable_tqdm=True)
    Trainer(model, args, train_dataset=splits.train, data_collator=splits.collator).train()
    with torch.no_grad():
        after = model(**held_out).loss.item()
    assert after < 0.9 * before, (before, after)


def test_trains_with_sttrainer(tmp_path, chickenpox):
    from st_peft.training import STTrainer, st_training_args

    splits, _ = chickenpox
    backbone = make_backbone("stid", splits)
    frozen = copy.deepcopy(backbone.state_dict())
    model = get_peft_model(backbone, STLoraConfig(**splits.size_kwargs()))
    args = st_training_args(str(tmp_path), epochs=1, batch_size=32, save_strategy="no", load_best_model_at_end=False,
                            disable_tqdm=True)
    trainer = STTrainer(model, args, train_dataset=splits.train, eval_dataset=splits.val,
                        data_collator=splits.collator)
    trainer.train()
    metrics = trainer.evaluate_test(splits.test)
    assert np.isfinite(metrics["mae"])
    for key, value in model.unload().state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_cli_trains_st_lora(tmp_path):
    from st_peft.cli import main

    output = tmp_path / "run"
    main(["train", "--dataset", "chickenpox", "--model", "stid", "--model-args", "{embed_dim: 8, num_layers: 1}",
          "--adapter", "st_lora", "--adapter-args", "{r: 2, target_modules: [regression]}", "--epochs", "1",
          "--output-dir", str(output)])
    saved = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["r"], saved["num_nodes"], saved["target_modules"]) == (
        "STLORA", 2, 20, ["regression"]
    )
    assert np.isfinite(json.loads((output / "metrics.json").read_text())["mae"])
