"""FactoST on the shared forward path computes bit for bit what its own forward computed before.

A FactoST pretraining run resumes from its checkpoints, so moving FactoST onto
``STPreTrainedModel``'s check / scale / forecast path must not change one bit of its outputs, its
loss or its gradients. ``former_forward`` below is FactoST's own forward as it was (st-peft
commit 94de11d), written out over the model's layers; the model must match it with
``torch.equal`` on real data: the shipped checkpoint, sz-taxi windows with missing (zero)
entries, a history longer than ``max_context_length``, one pass and a rollout, both losses, and
with a FACTOST adapter in the token hook.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

import st_peft  # noqa: F401  (registers the Auto classes and the tuners)
from st_peft.checks import check_observed_mask
from st_peft.forecasting import forecast_loss
from st_peft.losses import get_loss
from st_peft.metrics import pinball_loss
from st_peft.models.factost import FactoSTModel
from st_peft.models.factost.configuration_factost import QUANTILE_LOSS
from st_peft.models.factost.modeling_factost import FactoSTTokenContext, masked_instance_norm
from st_peft.shipped import shipped_checkpoint
from st_peft.tuners.factost import FactoSTAdapterConfig

NODES = 12


def former_forward_once(model, values, mask, past_time, future_time, horizon, node_index, use_domain_prompts):
    """One encoder pass of FactoST's former forward: ``(normalised quantiles, loc, scale)``."""
    config = model.config
    values = values[:, -config.max_context_length:]
    mask = mask[:, -config.max_context_length:]
    if past_time is not None:
        past_time = past_time[:, -config.max_context_length:]
    batch, length, nodes, channels = values.shape
    series = values.permute(0, 2, 3, 1).reshape(-1, length)
    series_mask = mask.permute(0, 2, 3, 1).reshape(-1, length)
    normalised, loc, scale = masked_instance_norm(series, series_mask, config.norm_eps)
    pad = (-length) % config.patch_length
    normalised = F.pad(normalised, (pad, 0))
    series_mask = F.pad(series_mask, (pad, 0), value=False)
    num_context = normalised.shape[1] // config.patch_length
    num_future = -(-horizon // config.patch_length)
    patches = torch.cat((normalised.view(-1, num_context, config.patch_length),
                         series_mask.view(-1, num_context, config.patch_length).to(normalised.dtype)), dim=-1)
    context_tokens = model.patch_embedding(patches.to(model.future_token.dtype))
    tokens = torch.cat((context_tokens, model.future_token.expand(context_tokens.shape[0], num_future, -1)), dim=1)
    tokens = tokens.view(batch, nodes, channels, num_context + num_future, -1)
    patch_time = None
    if past_time is not None and future_time is not None:
        patch = config.patch_length
        context_ends = torch.arange(1, num_context + 1) * patch - 1 - pad
        future_ends = (torch.arange(1, num_future + 1) * patch - 1).clamp_max(future_time.shape[1] - 1)
        patch_time = torch.cat((past_time[:, context_ends], future_time[:, future_ends]), dim=1)
    hooked = model.token_hook(tokens, FactoSTTokenContext(num_context, patch_time, node_index, model.domain_prompts))
    width = tokens.shape[-1]
    tokens = hooked.tokens.reshape(-1, num_context + num_future, width)
    prefixes = [model.register_token.expand(tokens.shape[0], 1, -1)]
    if hooked.prefix_tokens is not None:
        prefixes.append(hooked.prefix_tokens.reshape(tokens.shape[0], -1, width))
    if use_domain_prompts:
        prefixes.append(model.match_domain_prompts(tokens[:, :num_context].mean(dim=1)))
    prefix = torch.cat(prefixes, dim=1)
    hidden = torch.cat((prefix, tokens), dim=1)
    positions = torch.cat((torch.zeros(prefix.shape[1]),
                           torch.arange(1, num_context + num_future + 1, dtype=torch.float32)))
    for layer in model.layers:
        hidden = layer(hidden, positions)
    quantiles = model.head(model.final_norm(hidden[:, -num_future:]))
    quantiles = quantiles.view(-1, num_future * config.patch_length, len(config.quantiles))
    quantiles = quantiles[:, :horizon].sort(dim=-1).values
    quantiles = quantiles.view(batch, nodes, channels, horizon, -1).permute(0, 3, 1, 2, 4)
    loc, scale = (statistic.view(batch, 1, nodes, channels) for statistic in (loc, scale))
    return quantiles, loc, scale


def former_forward(model, past_values, past_observed_mask=None, past_time_features=None, future_time_features=None,
                   future_values=None, future_observed_mask=None, node_index=None, horizon=None,
                   use_domain_prompts=False):
    """FactoST's former forward with its identity output seam: ``(prediction, quantiles, loc, scale, loss)``."""
    config = model.config
    mask = check_observed_mask(past_observed_mask, past_values, model="FactoSTModel", name="past_observed_mask",
                               values_name="past_values") & torch.isfinite(past_values)
    if past_observed_mask is None and config.missing_value is not None:
        mask = mask & (past_values != config.missing_value)
    values = torch.where(mask, past_values, torch.zeros_like(past_values))
    history_time, pieces, loc, scale, done = past_time_features, [], None, None, 0
    while done < horizon:
        step = min(horizon - done, config.max_horizon)
        step_time = None if future_time_features is None else future_time_features[:, done:done + step]
        normalised, pass_loc, pass_scale = former_forward_once(model, values, mask, history_time, step_time, step,
                                                               node_index, use_domain_prompts)
        if loc is None:
            loc, scale = pass_loc, pass_scale
        else:
            in_units = normalised * pass_scale[..., None] + pass_loc[..., None]
            normalised = (in_units - loc[..., None]) / scale[..., None]
        pieces.append(normalised)
        done += step
        if done < horizon:
            median = normalised[..., config.median_index] * scale + loc
            values = torch.cat((values, median), dim=1)
            mask = torch.cat((mask, torch.ones_like(median, dtype=torch.bool)), dim=1)
            history_time = None if history_time is None or step_time is None else torch.cat(
                (history_time, step_time), dim=1)
    scaled_quantiles = torch.cat(pieces, dim=1)
    prediction = scaled_quantiles[..., config.median_index] * scale + loc
    quantiles = scaled_quantiles * scale.unsqueeze(-1) + loc.unsqueeze(-1)
    loss = None
    if future_values is not None:
        if config.loss == QUANTILE_LOSS:
            levels = list(config.quantiles)
            loss = forecast_loss(quantiles, future_values, future_observed_mask,
                                 lambda q, target, m: pinball_loss(q, target, levels, mask=m), model="FactoSTModel")
        else:
            loss = forecast_loss(prediction, future_values, future_observed_mask, get_loss(config.loss),
                                 model="FactoSTModel")
    return prediction, quantiles, loc, scale, loss


@pytest.fixture(scope="module")
def taxi_batch() -> dict[str, torch.Tensor]:
    """Eight sz-taxi windows of 120 steps (longer than the checkpoint's 96-step context) and 60 ahead."""
    from st_peft.data import build_splits, load

    splits = build_splits(load("sz-taxi"), input_len=120, horizon=60)
    batch = splits.collator.gather(np.asarray(splits.test["start"])[::97][:8])
    nodes = slice(0, NODES)
    batch = {key: value[:, :, nodes] if value.dim() == 4 else value for key, value in batch.items()}
    assert (batch["past_values"] == 0).any(), "the pin needs missing (zero) entries"
    return batch


def shipped_model(loss: str) -> FactoSTModel:
    return FactoSTModel.from_pretrained(shipped_checkpoint("factost-cpu"), loss=loss)


def forward_and_gradients(model, call):
    """Outputs of ``call()`` and the gradient of its loss for every trainable parameter (dropout on, seeded)."""
    model.train()
    model.zero_grad()
    torch.manual_seed(7)
    prediction, quantiles, loc, scale, loss = call()
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return (prediction, quantiles, loc, scale, loss), gradients


def assert_bitwise(model, batch, horizon, **options):
    def new():
        output = model(**batch, horizon=horizon, **options)
        return output.prediction_outputs, output.quantile_outputs, output.loc, output.scale, output.loss

    def old():
        backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
        # the former forward rolled out whenever the horizon needed it (once rollout=True was given)
        return former_forward(backbone, **batch, horizon=horizon,
                              use_domain_prompts=options.get("use_domain_prompts", False))

    got, got_gradients = forward_and_gradients(model, new)
    expected, expected_gradients = forward_and_gradients(model, old)
    for name, a, b in zip(("prediction", "quantiles", "loc", "scale", "loss"), got, expected, strict=True):
        assert torch.equal(a, b), name
    assert got_gradients.keys() == expected_gradients.keys() and got_gradients
    for name in got_gradients:
        assert torch.equal(got_gradients[name], expected_gradients[name]), name


@pytest.mark.parametrize("loss", [QUANTILE_LOSS, "mae"])
def test_one_pass_matches_the_former_forward_bit_for_bit(taxi_batch, loss):
    batch = {**taxi_batch, "future_values": taxi_batch["future_values"][:, :12],
             "future_observed_mask": taxi_batch["future_observed_mask"][:, :12],
             "future_time_features": taxi_batch["future_time_features"][:, :12]}
    assert_bitwise(shipped_model(loss), batch, horizon=12)
    # no mask given: the checkpoint's missing_value (0) marks the missing entries; with domain prompts
    batch = {key: value for key, value in batch.items() if key != "past_observed_mask"}
    assert_bitwise(shipped_model(loss), batch, horizon=12, use_domain_prompts=True)


def test_rollout_matches_the_former_forward_bit_for_bit(taxi_batch):
    model = shipped_model(QUANTILE_LOSS)
    assert 60 > model.config.max_horizon
    assert_bitwise(model, taxi_batch, horizon=60, rollout=True)


def test_with_a_factost_adapter_matches_the_former_forward_bit_for_bit(taxi_batch):
    batch = {**taxi_batch, "future_values": taxi_batch["future_values"][:, :12],
             "future_observed_mask": taxi_batch["future_observed_mask"][:, :12],
             "future_time_features": taxi_batch["future_time_features"][:, :12]}
    torch.manual_seed(3)
    # metadata fusion and interaction filtering edit the tokens; the prompts are gated since the adapter
    # became an identity at init_weights=True, which the former forward did not know
    config = FactoSTAdapterConfig(num_nodes=NODES, steps_per_day=96, init_weights=False, use_prompts=False)
    model = get_peft_model(shipped_model(QUANTILE_LOSS), config)
    assert_bitwise(model, batch, horizon=12)
