"""ST-LINK: shapes, SE-Attention, MRFFN, partial freezing, GPT-2 loading, save/load, Auto classes, LoRA, trainer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForTimeSeriesPrediction,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
)

import st_peft  # noqa: F401  (registers st_link with the Auto classes)
from st_peft.data import build_splits, load
from st_peft.models.st_link import STLinkConfig, STLinkForForecasting, STLinkModel
from st_peft.models.st_link.modeling_st_link import STLinkMRFFN, STLinkRevIN, rotate_pairs
from st_peft.outputs import ForecastOutput
from st_peft.training import STTrainer, st_training_args

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
    generator = torch.Generator().manual_seed(seed)
    x_time = torch.stack(
        [
            torch.randint(0, 48, (size, LENGTH), generator=generator),
            torch.randint(0, 7, (size, LENGTH), generator=generator),
        ],
        dim=-1,
    )
    return {"x": torch.randn(size, LENGTH, num_nodes, CHANNELS, generator=generator), "x_time": x_time}



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
    output = model(**inputs, y_time=inputs["x_time"], y=torch.zeros(1))  # other batch keys are ignored
    assert isinstance(output, ForecastOutput)
    assert output.prediction.shape == (3, HORIZON, NODES, 1)
    assert output.aux_loss.ndim == 0 and output.aux_loss > 0
    encoded = model.st_link(**inputs, output_hidden_states=True)
    assert encoded.last_hidden_state.shape == (3, LENGTH // 3, NODES, 16)
    assert len(encoded.hidden_states) == 4 and encoded.hidden_states[0].shape == (3, 4, NODES, 16)
    # without the calendar the model still forecasts, and the calendar changes the forecast
    no_calendar = model(x=inputs["x"]).prediction
    assert no_calendar.shape == output.prediction.shape
    assert not torch.allclose(no_calendar, output.prediction)


def test_all_switches_off_is_plain_gpt2_with_positions():
    model = STLinkForForecasting(
        tiny_config(use_se_attention=False, use_mrffn=False, use_partial_freeze=False, use_revin=False)
    )
    backbone = model.st_link
    assert backbone.rotary is None and backbone.embeddings.wpe is not None
    assert not any(isinstance(m, STLinkMRFFN) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    output = model(**batch())
    assert output.aux_loss is None and output.prediction.shape == (3, HORIZON, NODES, 1)
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
    (output.prediction.square().mean() + output.aux_loss).backward()
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
    ],
)
def test_bad_configurations_are_refused(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**overrides)


def test_bad_inputs_are_refused():
    model = STLinkForForecasting(tiny_config())
    inputs = batch()
    with pytest.raises(ValueError, match=r"x has 7 nodes but the model was configured with num_nodes=6"):
        model(x=torch.zeros(1, LENGTH, 7, CHANNELS))
    with pytest.raises(
        ValueError, match=r"x has 9 time steps but the model was configured with input_len=12"
    ):
        model(x=torch.zeros(1, 9, NODES, CHANNELS))
    with pytest.raises(ValueError, match=r"x has 1 channels but the model was configured with in_channels=2"):
        model(x=torch.zeros(1, LENGTH, NODES, 1))
    with pytest.raises(ValueError, match=r"time-of-day slot 50 .* steps_per_day=48"):
        model(x=inputs["x"], x_time=torch.full_like(inputs["x_time"], 50))
    with pytest.raises(ValueError, match=r"node_index holds values outside \[0, 6\)"):
        model(x=torch.zeros(1, LENGTH, 2, CHANNELS), node_index=torch.tensor([0, 6]))


def test_node_subset_uses_the_embeddings_of_its_nodes():
    torch.manual_seed(0)
    model = STLinkForForecasting(tiny_config()).eval()
    x = batch()["x"][:, :, :2]
    as_nodes_4_1 = model(x=x, node_index=torch.tensor([4, 1])).prediction
    as_nodes_2_3 = model(x=x, node_index=torch.tensor([2, 3])).prediction
    assert as_nodes_4_1.shape == (3, HORIZON, 2, 1)
    assert not torch.allclose(as_nodes_4_1, as_nodes_2_3)
    # node_index = all nodes in order is the same as giving none
    full = batch()
    assert torch.equal(model(**full, node_index=torch.arange(NODES)).prediction, model(**full).prediction)


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


def test_save_load_reproduces_outputs_and_freezing(tmp_path):
    torch.manual_seed(0)
    model = STLinkForForecasting(tiny_config()).train()
    model(**batch(seed=3))  # one training-mode pass moves the memory keys
    model.eval()
    inputs = batch()
    expected = model(**inputs)
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "modeling_st_link.py", "configuration_st_link.py"} <= set(
        os.listdir(tmp_path)
    )
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForTimeSeriesPrediction"] == "modeling_st_link.STLinkForForecasting"
    for loaded in (
        STLinkForForecasting.from_pretrained(tmp_path),
        AutoModelForTimeSeriesPrediction.from_pretrained(tmp_path),
    ):
        assert type(loaded) is STLinkForForecasting
        output = loaded(**inputs)
        assert torch.equal(output.prediction, expected.prediction) and torch.equal(
            output.aux_loss, expected.aux_loss
        )
        frozen = {n for n, p in loaded.named_parameters() if not p.requires_grad}
        assert frozen == {n for n, p in model.named_parameters() if not p.requires_grad} and frozen


def test_auto_classes_resolve_st_link():
    config = AutoConfig.for_model(
        "st_link", gpt2_config=tiny_gpt2().to_dict(), num_nodes=NODES, in_channels=CHANNELS
    )
    assert isinstance(config, STLinkConfig)
    assert type(AutoModel.from_config(config)) is STLinkModel
    assert type(AutoModelForTimeSeriesPrediction.from_config(config)) is STLinkForForecasting


def test_saved_folder_loads_as_remote_code_without_st_peft_registration(tmp_path):
    torch.manual_seed(0)
    model = STLinkForForecasting(tiny_config()).eval()
    inputs = batch()
    model.save_pretrained(tmp_path / "model")
    torch.save({"inputs": inputs, "prediction": model(**inputs).prediction}, tmp_path / "io.pt")
    # a fresh interpreter that never imports st_peft.models first: only the copied files can build the model
    script = f"""
import torch
from transformers import AutoModelForTimeSeriesPrediction
model = AutoModelForTimeSeriesPrediction.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
io = torch.load({str(tmp_path / "io.pt")!r})
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert torch.equal(model(**io["inputs"]).prediction, io["prediction"])
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
    before = model(**inputs).prediction
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    )
    assert torch.allclose(peft_model(**inputs).prediction, before, atol=1e-6)  # LoRA's B starts at zero
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum("c_attn.lora_A" in n for n in trainable) == 3
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    adapted = peft_model(**inputs).prediction
    assert not torch.allclose(adapted, before)
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = STLinkForForecasting(tiny_config()).eval()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(reloaded(**inputs).prediction, adapted)


def test_trains_with_st_trainer_on_real_data(tmp_path):
    data = load("chickenpox")
    splits = build_splits(data, input_len=LENGTH, horizon=HORIZON, few_shot=0.5)
    torch.manual_seed(0)
    model = STLinkForForecasting.from_splits(
        splits, gpt2_config=tiny_gpt2().to_dict(), patch_len=6, num_memory_slots=8, memory_top_k=2
    )
    assert model.config.num_nodes == 20 and model.config.steps_per_day == splits.steps_per_day
    frozen_before = model.st_link.h[0].attn.c_attn.weight.detach().clone()
    args = st_training_args(
        str(tmp_path),
        epochs=4,
        batch_size=16,
        lr=5e-3,
        disable_tqdm=True,
        save_strategy="no",
        load_best_model_at_end=False,
    )
    trainer = STTrainer(model, args, splits.train, splits.val, splits.collator, splits.scaler)
    before = trainer.evaluate()["eval_mae"]
    trainer.train()
    after = trainer.evaluate()["eval_mae"]
    assert after < before
    assert torch.equal(model.st_link.h[0].attn.c_attn.weight, frozen_before)
    metrics = trainer.evaluate_test(splits.test)
    assert math.isfinite(metrics["mae"]) and metrics["mae"] > 0


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
