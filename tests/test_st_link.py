"""ST-LINK: shapes, SE-Attention, MRFFN, partial freezing, GPT-2 loading, scaling inside the model,
save/load, Auto classes, LoRA, plain transformers.Trainer, CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForTimeSeriesPrediction,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    Trainer,
    TrainingArguments,
)

import st_peft  # noqa: F401  (registers st_link with the Auto classes)
from st_peft.data import build_splits, load
from st_peft.metrics import masked_mae
from st_peft.models.st_link import STLinkConfig, STLinkForForecasting, STLinkModel
from st_peft.models.st_link.modeling_st_link import STLinkMRFFN, STLinkRevIN, rotate_pairs
from st_peft.outputs import ForecastOutput
from st_peft.scaling import STATISTIC_NAMES

NODES, LENGTH, HORIZON, CHANNELS = 6, 12, 12, 2


def tiny_gpt2(**overrides) -> GPT2Config:
    """A random GPT-2 small enough for tests: width 16, 3 layers, 2 heads, no dropout."""
    settings = dict(
        n_embd=16, n_layer=3, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    settings.update(overrides)
    return GPT2Config(**settings)


def tiny_config(**overrides) -> STLinkConfig:
    settings = dict(
        gpt2_config=tiny_gpt2(),
        num_nodes=NODES,
        input_len=LENGTH,
        horizon=HORIZON,
        in_channels=CHANNELS,
        out_channels=1,
        steps_per_day=48,
        patch_len=3,
        num_unfrozen_layers=2,
        num_memory_slots=8,
        memory_top_k=2,
    )
    settings.update(overrides)
    return STLinkConfig(**settings)


def batch(num_nodes: int = NODES, size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs for the mechanics tests (shapes, rotations, freezing); forecasting claims use real data."""
    generator = torch.Generator().manual_seed(seed)
    past_time_features = torch.stack(
        [
            torch.randint(0, 48, (size, LENGTH), generator=generator),
            torch.randint(0, 7, (size, LENGTH), generator=generator),
        ],
        dim=-1,
    )
    return {
        "past_values": torch.randn(size, LENGTH, num_nodes, CHANNELS, generator=generator),
        "past_time_features": past_time_features,
    }


@pytest.fixture(scope="module")
def taxi():
    """sz-taxi (156 nodes, 15-minute counts with a mean near 17): statistics far from the identity."""
    return build_splits(load("sz-taxi"), input_len=LENGTH, horizon=HORIZON)


def taxi_model(splits, **overrides) -> STLinkForForecasting:
    """A tiny random-GPT-2 ST-LINK for ``splits``: two layers of width 16, two tokens per node."""
    torch.manual_seed(0)
    settings = dict(gpt2_config=tiny_gpt2(n_layer=2).to_dict(), patch_len=6, num_unfrozen_layers=1,
                    num_memory_slots=8, memory_top_k=2)
    settings.update(overrides)
    return STLinkForForecasting.from_splits(splits, **settings)


def windows(splits, split: str, count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` windows of a split as one batch."""
    return next(splits.iter_batches(split, count))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    """A tiny random GPT-2 saved the way the Hub stores ``GPT2Model`` checkpoints."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2Model(tiny_gpt2()).save_pretrained(folder)
    return str(folder)


def test_shapes_outputs_and_aux_loss():
    torch.manual_seed(0)
    model = STLinkForForecasting(tiny_config()).eval()
    inputs = batch()
    output = model(**inputs, future_time_features=inputs["past_time_features"], num_items_in_batch=7)
    assert isinstance(output, ForecastOutput) and output.loss is None  # no future_values, no loss
    assert output.prediction_outputs.shape == (3, HORIZON, NODES, 1)
    assert output.loc.shape == output.scale.shape == (3, 1, NODES, 1)
    assert output.aux_loss.ndim == 0 and output.aux_loss > 0
    target = torch.randn(3, HORIZON, NODES, 1)
    with_target = model(**inputs, future_values=target)
    expected = masked_mae(output.prediction_outputs, target, torch.ones_like(target, dtype=torch.bool))
    assert torch.allclose(with_target.loss, expected + output.aux_loss)
    encoded = model.st_link(scaled_past_values=inputs["past_values"], past_time_features=inputs["past_time_features"],
                            output_hidden_states=True)
    assert encoded.last_hidden_state.shape == (3, LENGTH // 3, NODES, 16)
    assert len(encoded.hidden_states) == 4 and encoded.hidden_states[0].shape == (3, 4, NODES, 16)
    # without the calendar the model still forecasts, and the calendar changes the forecast
    no_calendar = model(past_values=inputs["past_values"]).prediction_outputs
    assert no_calendar.shape == output.prediction_outputs.shape
    assert not torch.allclose(no_calendar, output.prediction_outputs)


def test_all_switches_off_is_plain_gpt2_with_positions():
    model = STLinkForForecasting(
        tiny_config(use_se_attention=False, use_mrffn=False, use_partial_freeze=False, use_revin=False)
    )
    backbone = model.st_link
    assert backbone.rotary is None and backbone.embeddings.wpe is not None
    assert not any(isinstance(m, STLinkMRFFN) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    output = model(**batch())
    assert output.aux_loss is None and output.prediction_outputs.shape == (3, HORIZON, NODES, 1)
    se_model = STLinkForForecasting(tiny_config())
    assert se_model.st_link.embeddings.wpe is None and se_model.st_link.rotary is not None


def test_rotation_by_hand_and_relative_scores():
    pair = torch.tensor([[[1.0, 2.0]]])  # one token, one head, one pair
    quarter = torch.tensor([[math.pi / 2]])
    expected = torch.tensor([[[-2.0, 1.0]]])
    assert torch.allclose(rotate_pairs(pair, quarter, quarter[:, :0]), expected, atol=1e-6)
    assert torch.allclose(rotate_pairs(pair, quarter[:, :0], quarter), expected, atol=1e-6)
    # scores of rotated queries and keys depend only on the difference of their angles
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 1, 1, 8, generator=generator)
    a, b, shift = torch.rand(3, 1, 4, generator=generator) * 6

    def rotated(v, angles):
        return rotate_pairs(v, angles[:, :1], angles[:, 1:]).flatten()

    assert torch.allclose(
        rotated(query, a) @ rotated(key, b), rotated(query, a + shift) @ rotated(key, b + shift), atol=1e-5
    )
    with pytest.raises(ValueError, match="rotate_pairs expects x"):
        rotate_pairs(torch.zeros(2, 8), a[:, :1], a[:, 1:])


def test_rotation_backward_matches_autograd_of_the_formula():
    """The hand-written backward against autograd through ``x * cos + rotate_half(x) * sin``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    fixed = torch.randn(5, 1, generator=generator, dtype=torch.float64, requires_grad=True)
    learned = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rotate_pairs, (x, fixed, learned))

    def by_formula(x, fixed, learned):
        angles = torch.cat((fixed, learned), dim=-1)
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        first, second = x.chunk(2, dim=-1)
        return x * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()

    weights = torch.randn(2, 5, 3, 8, generator=generator, dtype=torch.float64)

    def outputs_and_gradients(function):
        x.grad, learned.grad = None, None
        out = function(x, fixed.detach(), learned)  # no gradient asked of the fixed angles
        (out * weights).sum().backward()
        return out.detach(), x.grad, learned.grad

    ours, reference = outputs_and_gradients(rotate_pairs), outputs_and_gradients(by_formula)
    for mine, wanted in zip(ours, reference, strict=True):
        assert torch.allclose(mine, wanted, atol=1e-12)


def test_node_rotation_frequencies_and_token_angles():
    config = tiny_config(rope_theta=100.0)
    model = STLinkModel(config)
    rotary = model.rotary
    temporal_dims, spatial_dims = config.rotary_dims
    assert (temporal_dims, spatial_dims) == (4, 4)
    # starts as RoPE over the node index: node n, frequency i -> n * theta ** (-2i / spatial_dims)
    expected = torch.arange(NODES, dtype=torch.float32)[:, None] * torch.tensor([1.0, 100.0**-0.5])
    assert torch.allclose(rotary.node_frequencies(), expected)
    temporal, spatial = rotary(num_patches=4, node_index=torch.arange(NODES))
    assert temporal.shape == spatial.shape == (4 * NODES, 2)
    assert not temporal.requires_grad and spatial.requires_grad
    token = 2 * NODES + 5  # patch 2 of node 5, patch-major
    # temporal pairs turn with patch 2, spatial with node 5
    assert torch.allclose(temporal[token], torch.tensor([2.0, 2.0 * 100**-0.5]))
    assert torch.allclose(spatial[token], torch.tensor([5.0, 5.0 * 100**-0.5]))


def test_partial_freezing_keeps_lower_layers_frozen_but_layernorms():
    torch.manual_seed(0)
    model = STLinkForForecasting(tiny_config(num_unfrozen_layers=1)).train()
    lower = model.st_link.h[:2]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        f"st_link.h.{i}.{part}.{kind}"
        for i in range(2)
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        for kind in ("weight", "bias")
    }
    before = {n: p.detach().clone() for n, p in lower.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    output = model(**batch())
    (output.prediction_outputs.square().mean() + output.aux_loss).backward()
    optimizer.step()
    for name, parameter in lower.named_parameters():
        changed = not torch.equal(before[name], parameter)
        assert changed == name.startswith(("0.ln_", "1.ln_")), name
    assert all(
        p.requires_grad for p in STLinkForForecasting(tiny_config(use_partial_freeze=False)).parameters()
    )


def test_mrffn_from_gpt2_computes_the_pretrained_mlp(gpt2_dir):
    gpt2 = GPT2Model.from_pretrained(gpt2_dir)
    model = STLinkForForecasting.from_gpt2(gpt2_dir, **_shape_kwargs())
    mrffn = model.st_link.h[2].mlp
    assert isinstance(mrffn, STLinkMRFFN) and len(mrffn.experts) == 4
    tokens = torch.randn(2, 10, 16)
    attention_output = torch.randn(2, 10, 16)
    output, balance = mrffn(tokens, attention_output)
    assert torch.allclose(output, gpt2.h[2].mlp(tokens), atol=1e-6)
    assert balance >= 1.0 - 1e-6  # the product of shares and probabilities is smallest for even routing
    # identical experts and one expert per token still give the router a gradient from the output
    output.square().sum().backward()
    assert mrffn.router.weight.grad.abs().sum() > 0
    assert mrffn.memory_values.grad.abs().sum() > 0


def test_mrffn_matches_token_by_token_retrieval_and_routing():
    """Dense retrieval and sorted dispatch against the definition: gather k values, loop over tokens and experts."""
    torch.manual_seed(0)
    mrffn = STLinkMRFFN(tiny_config(num_experts=3, experts_per_token=2, num_memory_slots=8, memory_top_k=3)).eval()
    with torch.no_grad():
        mrffn.memory_keys.normal_()
        mrffn.memory_values.normal_()
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    attention_output = torch.randn(2, 7, 16)
    parameters = [hidden, *mrffn.parameters()]
    output, balance = mrffn(hidden, attention_output)
    fast = torch.autograd.grad(output.square().sum() + balance, parameters)

    tokens = hidden.reshape(-1, 16)
    similarity = F.normalize(tokens, dim=-1) @ F.normalize(mrffn.memory_keys, dim=-1).T
    top, slots = similarity.topk(3, dim=-1)
    weights = torch.softmax(top * mrffn.retrieval_scale, dim=-1)
    retrieved = torch.einsum("tk,tkd->td", weights, mrffn.memory_values[slots])
    router_input = torch.cat((tokens, retrieved, attention_output.reshape(-1, 16)), dim=-1)
    probabilities = torch.softmax(mrffn.router(router_input), dim=-1)
    gates, chosen = probabilities.topk(2, dim=-1)
    gates = gates / gates.sum(dim=-1, keepdim=True).detach()
    rows = []
    for token in range(tokens.shape[0]):
        mixed = retrieved[token]
        for rank in range(2):
            mixed = mixed + gates[token, rank] * mrffn.experts[int(chosen[token, rank])](tokens[token : token + 1])[0]
        rows.append(mixed)
    reference = torch.stack(rows).reshape(2, 7, 16)
    share = torch.bincount(chosen.flatten(), minlength=3).float() / chosen.numel()
    reference_balance = 3 * (share * probabilities.mean(dim=0)).sum()
    slow = torch.autograd.grad(reference.square().sum() + reference_balance, parameters)

    assert torch.allclose(output, reference, atol=1e-5) and torch.allclose(balance, reference_balance)
    for mine, wanted in zip(fast, slow, strict=True):
        assert torch.allclose(mine, wanted, atol=1e-5)


def test_balance_loss_by_hand():
    mrffn = STLinkMRFFN(tiny_config(num_experts=4, experts_per_token=2))
    with torch.no_grad():
        mrffn.router.weight.zero_()
        mrffn.router.bias.copy_(torch.tensor([2.0, 1.0, 0.0, -1.0]))
        mrffn.memory_keys.normal_()
        mrffn.memory_values.zero_()
    mrffn.eval()
    _, balance = mrffn(torch.randn(1, 5, 16), torch.randn(1, 5, 16))
    probabilities = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), dim=0)
    # every token picks experts 0 and 1: each gets half of the routing slots
    expected = 4 * (0.5 * probabilities[0] + 0.5 * probabilities[1])
    assert balance.item() == pytest.approx(expected.item(), rel=1e-6)


def test_memory_keys_follow_ema_of_assigned_tokens_only_in_training():
    mrffn = STLinkMRFFN(tiny_config(memory_ema_decay=0.75, num_memory_slots=3, memory_top_k=1))
    keys = torch.eye(3, 16)
    with torch.no_grad():
        mrffn.memory_keys.copy_(keys)
        mrffn.memory_values.zero_()
    tokens = torch.zeros(1, 3, 16)
    tokens[0, 0, 0], tokens[0, 1, 0], tokens[0, 2, 1] = 2.0, 4.0, 8.0  # two tokens for slot 0, one for slot 1
    mrffn.eval()
    mrffn(tokens, torch.zeros_like(tokens))
    assert torch.equal(mrffn.memory_keys, keys)
    mrffn.train()
    mrffn(tokens, torch.zeros_like(tokens))
    expected = keys.clone()
    expected[0, 0] = 0.75 * 1.0 + 0.25 * 3.0  # mean of 2 and 4
    expected[1, 1] = 0.75 * 1.0 + 0.25 * 8.0
    assert torch.allclose(mrffn.memory_keys, expected)
    assert not mrffn.memory_keys.requires_grad


def test_revin_round_trip():
    revin = STLinkRevIN(tiny_config(out_channels=CHANNELS))
    with torch.no_grad():
        revin.weight.copy_(torch.tensor([2.0, 0.5]))
        revin.bias.copy_(torch.tensor([1.0, -1.0]))
    x = torch.randn(2, LENGTH, NODES, CHANNELS) * 5 + 3
    normed, stats = revin.normalize(x)
    assert torch.allclose(
        ((normed - revin.bias) / revin.weight).mean(dim=1), torch.zeros(2, NODES, CHANNELS), atol=1e-5
    )
    assert torch.allclose(revin.denormalize(normed, stats), x, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_unfrozen_layers": 4}, r"U=4 must lie between 0 and the number of GPT-2 layers \(3\)"),
        ({"input_len": 10}, r"`input_len` \(10\) must be a multiple of `patch_len` \(3\)"),
        (
            {"use_se_attention": False, "num_nodes": 30},
            r"30 nodes x 4 patches = 120 tokens exceed n_positions=64",
        ),
        ({"out_channels": 3}, r"out_channels \(3\) cannot exceed in_channels \(2\)"),
        ({"experts_per_token": 5}, r"`experts_per_token` \(5\) must lie between 1 and `num_experts` \(4\)"),
        ({"loss": "mape"}, r"`loss` must be one of \['huber', 'mae', 'mse'\], got 'mape'"),
    ],
)
def test_bad_configurations_are_refused(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**overrides)


def test_bad_inputs_name_the_tensor_and_both_shapes():
    model = STLinkForForecasting(tiny_config())
    inputs = batch()
    bad_calls = [
        ({"past_values": torch.zeros(LENGTH, NODES, CHANNELS)},
         r"expects past_values of shape \(batch, input_len=12, nodes=6, in_channels=2\); got a 3-d tensor of shape "
         r"\(12, 6, 2\)"),
        ({"past_values": torch.zeros(1, LENGTH, 7, CHANNELS)},
         r"num_nodes=6 but past_values has 7 nodes \(past_values.shape=\(1, 12, 7, 2\)"),
        ({"past_values": torch.zeros(1, 9, NODES, CHANNELS)}, r"input_len=12 but past_values has 9 time steps"),
        ({"past_values": torch.zeros(1, LENGTH, NODES, 1)}, r"in_channels=2 but past_values has 1 channels"),
        ({**inputs, "past_observed_mask": torch.ones(3, LENGTH, NODES, 1, dtype=torch.bool)},
         r"past_observed_mask has shape \(3, 12, 6, 1\) but past_values has shape \(3, 12, 6, 2\)"),
        ({**inputs, "future_values": torch.zeros(3, 6, NODES, 1)},
         r"forecasts shape .*\(3, 12, 6, 1\) but future_values has shape \(3, 6, 6, 1\): its horizon is 6 steps"),
        ({**inputs, "future_values": torch.zeros(3, HORIZON, NODES, 1),
          "future_observed_mask": torch.ones(3, HORIZON, NODES, 2, dtype=torch.bool)},
         r"future_observed_mask has shape \(3, 12, 6, 2\) but future_values has shape \(3, 12, 6, 1\)"),
        ({**inputs, "past_time_features": torch.full_like(inputs["past_time_features"], 50)},
         r"past_time_features time-of-day slot must lie in \[0, 48\); got values from 50 to 50"),
        ({**inputs, "past_time_features": inputs["past_time_features"][:, :6]},
         r"expects past_time_features of shape \(3, 12, 2\); got \(3, 6, 2\)"),
        ({"past_values": torch.zeros(1, LENGTH, 2, CHANNELS), "node_index": torch.tensor([0, 6])},
         r"node_index values must lie in \[0, 6\); got min 0, max 6"),
    ]
    for kwargs, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            model(**kwargs)
    with pytest.raises(ValueError, match=r"STLinkModel expects scaled_past_values of shape .* got \(1, 12, 7, 2\)"):
        model.st_link(scaled_past_values=torch.zeros(1, LENGTH, 7, CHANNELS))
    with pytest.raises(TypeError, match="STLinkForForecasting takes past_values in original units"):
        model.st_link(**inputs)


def test_node_subset_uses_the_embeddings_of_its_nodes():
    torch.manual_seed(0)
    model = STLinkForForecasting(tiny_config()).eval()
    past_values = batch()["past_values"][:, :, :2]
    as_nodes_4_1 = model(past_values=past_values, node_index=torch.tensor([4, 1])).prediction_outputs
    as_nodes_2_3 = model(past_values=past_values, node_index=torch.tensor([2, 3])).prediction_outputs
    assert as_nodes_4_1.shape == (3, HORIZON, 2, 1)
    assert not torch.allclose(as_nodes_4_1, as_nodes_2_3)
    # node_index = all nodes in order is the same as giving none
    full = batch()
    assert torch.equal(
        model(**full, node_index=torch.arange(NODES)).prediction_outputs, model(**full).prediction_outputs
    )


def _shape_kwargs() -> dict:
    return dict(num_nodes=NODES, in_channels=CHANNELS, out_channels=1, steps_per_day=48, num_memory_slots=8)


def test_from_gpt2_copies_weights_and_skips_wte(gpt2_dir):
    gpt2 = GPT2Model.from_pretrained(gpt2_dir)
    model = STLinkForForecasting.from_gpt2(
        gpt2_dir, use_se_attention=False, use_mrffn=False, **_shape_kwargs()
    )
    backbone = model.st_link
    assert not any("wte" in name for name, _ in model.named_parameters())
    assert torch.equal(backbone.embeddings.wpe.weight, gpt2.wpe.weight)
    assert torch.equal(backbone.ln_f.weight, gpt2.ln_f.weight)
    for ours, theirs in zip(backbone.h, gpt2.h, strict=True):
        for name, parameter in theirs.named_parameters():
            assert torch.equal(ours.get_parameter(name), parameter), name
    # the frozen lower layer keeps the pretrained weights frozen; its LayerNorms train
    assert not backbone.h[0].attn.c_attn.weight.requires_grad and backbone.h[0].ln_1.weight.requires_grad


def test_from_gpt2_lm_head_checkpoint_first_layers_and_experts(tmp_path):
    torch.manual_seed(2)
    lm = GPT2LMHeadModel(tiny_gpt2())
    lm.save_pretrained(tmp_path)
    model = STLinkModel.from_gpt2(
        str(tmp_path), gpt2_config={"n_layer": 2}, num_unfrozen_layers=1, **_shape_kwargs()
    )
    assert len(model.h) == 2
    for expert in model.h[1].mlp.experts:
        assert torch.equal(expert.c_fc.weight, lm.transformer.h[1].mlp.c_fc.weight)
    assert torch.equal(model.h[0].attn.c_attn.weight, lm.transformer.h[0].attn.c_attn.weight)


def test_from_gpt2_refuses_mismatched_checkpoints(gpt2_dir):
    with pytest.raises(ValueError, match=r"has n_embd=16 but the ST-LINK configuration asks for n_embd=32"):
        STLinkForForecasting.from_gpt2(gpt2_dir, gpt2_config={"n_embd": 32}, **_shape_kwargs())
    with pytest.raises(ValueError, match=r"asks for 5 GPT-2 layers but checkpoint .* has only 3"):
        STLinkForForecasting.from_gpt2(gpt2_dir, gpt2_config={"n_layer": 5}, **_shape_kwargs())
    with pytest.raises(Exception, match=r"U=7 must lie between 0 and the number of GPT-2 layers \(3\)"):
        STLinkForForecasting.from_gpt2(gpt2_dir, num_unfrozen_layers=7, **_shape_kwargs())


def test_built_from_splits_it_scales_inside_and_forecasts_original_units(taxi):
    model = taxi_model(taxi).eval()
    statistics = taxi.scaling_statistics()
    assert model.config.scaling == statistics and model.config.steps_per_day == taxi.steps_per_day == 96
    inputs = windows(taxi, "val", 8)
    output = model(**inputs)

    # the same weights without statistics, fed a history normalised by hand
    twin_config = copy.deepcopy(model.config)
    twin_config.scaling = None
    twin = STLinkForForecasting(twin_config).eval()
    weights = {key: value for key, value in model.state_dict().items() if not key.startswith("scaler.")}
    assert not twin.load_state_dict(weights, strict=False).unexpected_keys
    assert torch.equal(twin.scaler.past_loc, torch.zeros(taxi.num_nodes, 1))
    past_loc, past_scale, future_loc, future_scale = (torch.tensor(statistics[name]) for name in STATISTIC_NAMES)
    mask = inputs["past_observed_mask"]
    by_hand = torch.where(mask, (inputs["past_values"] - past_loc) / past_scale, 0.0)
    scaled = twin(past_values=by_hand, past_time_features=inputs["past_time_features"]).prediction_outputs
    expected = scaled * future_scale + future_loc
    assert torch.allclose(output.prediction_outputs, expected, atol=1e-4)
    assert torch.equal(output.loc, future_loc.expand(8, 1, -1, -1))
    assert torch.equal(output.scale, future_scale.expand(8, 1, -1, -1))
    # the loss: masked MAE in original units over the observed targets, plus the router balance
    target, target_mask = inputs["future_values"], inputs["future_observed_mask"]
    assert not target_mask.all()  # sz-taxi has missing counts; they must not count
    assert torch.allclose(output.loss, masked_mae(expected, target, target_mask) + output.aux_loss, atol=1e-4)
    # the forecast lives on the data's scale (a mean near 17 vehicles), not the unit scale
    assert output.prediction_outputs[target_mask].mean() > 5 * scaled[target_mask].abs().mean()


def test_save_load_round_trip_is_a_whole_forecaster(taxi, tmp_path):
    model = taxi_model(taxi).train()
    model(**windows(taxi, "train", 8))  # one training-mode pass moves the memory keys
    model.eval()
    inputs = windows(taxi, "test", 8)
    expected = model(**inputs)
    model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == {
        "config.json", "model.safetensors", "modeling_st_link.py", "configuration_st_link.py"
    }  # no scaler file: the statistics travel in the weights and the config
    with safe_open(tmp_path / "model.safetensors", framework="pt") as saved:
        assert saved.get_tensor("scaler.past_loc").dtype == torch.float32
        assert torch.equal(saved.get_tensor("scaler.future_scale"), model.scaler.future_scale)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForTimeSeriesPrediction"] == "modeling_st_link.STLinkForForecasting"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for loaded in (
        STLinkForForecasting.from_pretrained(tmp_path),
        AutoModelForTimeSeriesPrediction.from_pretrained(tmp_path),
    ):
        assert type(loaded) is STLinkForForecasting
        output = loaded(**inputs)
        for field in ("loss", "prediction_outputs", "loc", "scale", "aux_loss"):
            assert torch.equal(output[field], expected[field]), field
        assert frozen and {n for n, p in loaded.named_parameters() if not p.requires_grad} == frozen
    # a cast to bfloat16 keeps the statistics exact
    assert loaded.to(torch.bfloat16).scaler.past_loc.dtype == torch.float32


def test_checkpoint_of_another_node_count_is_refused_with_both_counts(taxi, tmp_path):
    model = taxi_model(taxi)
    model.save_pretrained(tmp_path)
    # a model built for 20 nodes: transformers' own loader copies the weights (never through
    # nn.Module._load_from_state_dict), so the refusal must come from the model class
    other = copy.deepcopy(model.config)
    other.num_nodes, other.scaling = 20, None
    message = r"checkpoint's scaler \(scaler\.\w+, shape \(156, 1\)\) describes 156 nodes but this model has 20 nodes"
    for ignore in (False, True):
        with pytest.raises(ValueError, match=message):
            STLinkForForecasting.from_pretrained(tmp_path, config=other, ignore_mismatched_sizes=ignore)
    # asking for another node count keeps the saved statistics in the config: refused when building
    with pytest.raises(ValueError, match=r"past_loc has shape \(156, 1\) but the model has 20 nodes"):
        STLinkForForecasting.from_pretrained(tmp_path, num_nodes=20)
    # torch's loader (safetensors.torch.load_model, load_state_dict) goes through the scaler itself
    with pytest.raises(ValueError, match=r"describes 156 nodes x 1 channels but this model has 20 nodes x 1"):
        STLinkForForecasting(other).load_state_dict(model.state_dict())


def test_checkpoint_without_scaler_takes_the_config_statistics(taxi, tmp_path):
    """Buffers start on the meta device under from_pretrained: a missing scaler is rebuilt from the config."""
    model = taxi_model(taxi).eval()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as saved:
        tensors = {key: saved.get_tensor(key) for key in saved.keys() if not key.startswith("scaler.")}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = STLinkForForecasting.from_pretrained(tmp_path)
    for name in STATISTIC_NAMES:
        assert torch.equal(getattr(loaded.scaler, name), getattr(model.scaler, name)), name


def test_auto_classes_resolve_st_link():
    config = AutoConfig.for_model(
        "st_link", gpt2_config=tiny_gpt2().to_dict(), num_nodes=NODES, in_channels=CHANNELS
    )
    assert isinstance(config, STLinkConfig)
    assert type(AutoModel.from_config(config)) is STLinkModel
    assert type(AutoModelForTimeSeriesPrediction.from_config(config)) is STLinkForForecasting


def test_saved_folder_loads_as_remote_code_without_st_peft_registration(taxi, tmp_path):
    model = taxi_model(taxi).eval()
    inputs = windows(taxi, "test", 4)
    model.save_pretrained(tmp_path / "model")
    torch.save({"inputs": inputs, "prediction": model(**inputs).prediction_outputs}, tmp_path / "io.pt")
    # a fresh interpreter that never imports st_peft.models first: only the copied files can build the model
    script = f"""
import torch
from transformers import AutoModelForTimeSeriesPrediction
model = AutoModelForTimeSeriesPrediction.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
io = torch.load({str(tmp_path / "io.pt")!r})
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert torch.equal(model(**io["inputs"]).prediction_outputs, io["prediction"])
print("remote ok")
"""
    env = dict(
        os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0 and "remote ok" in result.stdout, result.stderr[-2000:]


def test_peft_lora_on_c_attn_round_trips(tmp_path):
    torch.manual_seed(0)
    model = STLinkForForecasting(tiny_config()).eval()
    inputs = batch()
    before = model(**inputs).prediction_outputs
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    )
    assert torch.allclose(peft_model(**inputs).prediction_outputs, before, atol=1e-6)  # LoRA's B starts at zero
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum("c_attn.lora_A" in n for n in trainable) == 3
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    adapted = peft_model(**inputs).prediction_outputs
    assert not torch.allclose(adapted, before)
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = STLinkForForecasting(tiny_config()).eval()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(reloaded(**inputs).prediction_outputs, adapted)


def test_plain_transformers_trainer_trains_st_link_on_real_data(taxi, tmp_path):
    """No st-peft glue: Trainer reads the model's own loss (original units) and the held-out loss falls."""
    model = taxi_model(taxi)
    frozen_before = model.st_link.h[0].attn.c_attn.weight.detach().clone()
    held_out = windows(taxi, "val", 32)

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**held_out).loss.item()

    before = held_out_loss()
    args = TrainingArguments(str(tmp_path), max_steps=40, per_device_train_batch_size=16, learning_rate=1e-2,
                             label_names=["future_values"], remove_unused_columns=False, use_cpu=True,
                             report_to="none", disable_tqdm=True, save_strategy="no")
    Trainer(model, args, train_dataset=taxi.train, data_collator=taxi.collator).train()
    after = held_out_loss()
    # at initialisation RevIN makes the forecast the window's mean, already a fair guess (MAE 4.2)
    assert after < 0.9 * before, (before, after)
    assert torch.equal(model.st_link.h[0].attn.c_attn.weight, frozen_before)  # partially frozen attention


def test_cli_trains_and_evaluates_st_link(tmp_path):
    from st_peft import cli

    out = tmp_path / "run"
    model_args = "{gpt2_config: {n_embd: 16, n_layer: 2, n_head: 2, attn_pdrop: 0.0}, patch_len: 6, num_unfrozen_layers: 1}"
    argv = [
        "train",
        "--dataset",
        "chickenpox",
        "--model",
        "st_link",
        "--model-args",
        model_args,
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--output-dir",
        str(out),
    ]
    assert cli.main(argv) == 0
    trained = json.loads((out / "metrics.json").read_text())
    assert cli.main(["evaluate", "--model-dir", str(out)]) == 0
    evaluated = json.loads((out / "metrics-test.json").read_text())
    assert evaluated["mae"] == pytest.approx(trained["mae"], rel=1e-6)
