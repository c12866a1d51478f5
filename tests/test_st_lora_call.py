"""One call of an ST-LoRA-adapted backbone equals its forward path written out, bit for bit.

``STLoraModel._enable_peft_forward_hooks`` prepares every call (node-adaptive layers, scaling
penalties, the frozen forecaster in evaluation mode). The tests here pin what a call computes,
without that mechanism: the backbone's own steps (``_check``, ``_scale``, ``_forecast``), the
predictor layer given the penalties by hand, ``_output``, with the forecaster's own modules in
evaluation mode and the adapter's (every module path holding ``stl_``) following the model's
mode. Outputs, loss and gradients must be ``torch.equal``: a running ST-LoRA study resumes with
this code, so a faster call may not change a bit.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import st_peft  # noqa: F401  (registers STLORA)
from st_peft.backbones import BACKBONES
from st_peft.data import build_splits, load
from st_peft.forecasting import ForecastContext, ScaledForecast
from st_peft.tuners.st_lora import STLoraConfig
from st_peft.tuners.st_lora.layer import NodeAdaptiveLayer

# each backbone with layers NALLs wrap (several of them), and their node axis
TARGETS = {"stid": ("fc1", -2), "gwnet": ("filter_conv", -2), "stgcn": ("theta", 1)}


@pytest.fixture(scope="module")
def sz_taxi():
    """Splits of sz-taxi (156 roads, 15-minute taxi speeds) and a training batch of 8 windows."""
    splits = build_splits(load("sz-taxi"), input_len=12, horizon=12)
    return splits, next(splits.iter_batches("train", batch_size=8))


def adapted(name: str, splits, **overrides) -> nn.Module:
    """A small backbone with dropout, wrapped by ST-LoRA (a NALL in the backbone, adapter dropout, the
    scaling penalty), its adapter weights moved off their initial values."""
    torch.manual_seed(0)
    kwargs = {**splits.model_kwargs(), "steps_per_day": splits.steps_per_day}
    if name == "stid":
        backbone = BACKBONES[name](**kwargs, embed_dim=8, node_dim=8, tod_dim=8, dow_dim=8, dropout=0.3)
    elif name == "gwnet":
        backbone = BACKBONES[name](**kwargs, adjacency=splits.adjacency, residual_channels=8, dilation_channels=8,
                                   skip_channels=16, end_channels=16, dropout=0.3)
    else:
        backbone = BACKBONES[name](**kwargs, adjacency=splits.adjacency, block_channels=(8, 4, 8), dropout=0.3)
    target, node_axis = TARGETS[name]
    config = STLoraConfig(**splits.size_kwargs(), target_modules=[target], node_axis=node_axis, dropout=0.2,
                          scaling_l2=0.01, **overrides)
    model = get_peft_model(backbone, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def written_out(model: nn.Module, batch: dict) -> tuple[ScaledForecast, object]:
    """The adapted forecaster's call without PEFT's per-call hooks: its steps one by one.

    Returns the forecast at the seam's output (scaled space) and the model's ``ForecastOutput``.
    """
    forecaster = model.base_model.model
    training = model.training
    for key, module in forecaster.named_modules():
        module.training = training and "stl_" in key
    try:
        past, observed, times, future_times = (batch[key] for key in ("past_values", "past_observed_mask",
                                                                      "past_time_features", "future_time_features"))
        mask = forecaster._check(past, observed, times, future_times, None)
        scaled, loc, scale = forecaster._scale(past, mask, None)
        forecast = forecaster._forecast(scaled, mask, times, future_times, None)
        layers = [module for module in forecaster.modules() if isinstance(module, NodeAdaptiveLayer)]
        penalties = {"default": torch.stack([layer.scaling_penalty("default") for layer in layers]).sum()}
        forecast = forecaster.forecast_seam(ScaledForecast(forecast), ForecastContext(scaled, mask, None),
                                            layer_penalties=penalties)
        output = forecaster._output(forecast, loc, scale, batch["future_values"], batch["future_observed_mask"])
    finally:
        model.train(training)
    return forecast, output


@pytest.mark.parametrize("name", ["stid", "gwnet", "stgcn"])
@pytest.mark.parametrize("training", [True, False], ids=["training step", "inference"])
def test_a_call_equals_the_written_out_forward_bit_for_bit(sz_taxi, name, training):
    splits, batch = sz_taxi
    model = adapted(name, splits)
    model.train(training)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    statistics = {key: value.clone() for key, value in model.state_dict().items() if "running" in key}

    torch.manual_seed(7)  # the adapter's dropout draws the same masks in both
    output = model(**batch)
    grads = torch.autograd.grad(output.loss, parameters)
    torch.manual_seed(7)
    forecast, expected = written_out(model, batch)
    expected_grads = torch.autograd.grad(expected.loss, parameters)

    assert expected.aux_loss is not None and forecast.prediction.requires_grad
    for key in ("prediction_outputs", "loc", "scale", "aux_loss", "loss"):
        assert torch.equal(getattr(output, key), getattr(expected, key)), key
    for parameter, grad, expected_grad in zip(parameters, grads, expected_grads, strict=True):
        assert torch.equal(grad, expected_grad), parameter.shape
    # the frozen forecaster's batch norms (GWNet) never moved, and every module is back in the model's mode
    for key, value in statistics.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(module.training is training for module in model.modules())


def test_the_dropout_of_a_training_adapter_draws_masks(sz_taxi):
    """The written-out call is not blind to the mode: the adapter's dropout makes two seeds differ
    in training, and only there."""
    splits, batch = sz_taxi
    model = adapted("gwnet", splits)
    for training, differ in ((True, True), (False, False)):
        model.train(training)
        outputs = []
        for seed in (7, 8):
            torch.manual_seed(seed)
            outputs.append(model(**batch).prediction_outputs)
        assert (not torch.equal(*outputs)) is differ
