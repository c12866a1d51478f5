"""FACTOST adapter: a full PEFT citizen on a frozen FactoST backbone."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import PeftType
from transformers import AutoModelForTimeSeriesPrediction, Trainer, TrainingArguments

import st_peft  # noqa: F401  (registers FACTOST)
from st_peft.data import build_splits, load
from st_peft.models.factost import FactoSTConfig, FactoSTModel
from st_peft.models.factost.modeling_factost import FactoSTAttention, FactoSTTokenContext
from st_peft.shipped import shipped_checkpoint
from st_peft.training.samplers import MemoryReplaySampler
from st_peft.tuners.factost import (
    FactoSTAdapterConfig,
    FactoSTAdapterLayer,
    InteractionFilter,
    MetadataFusion,
)

NODES = 5
STEPS_PER_DAY = 96


def backbone() -> FactoSTModel:
    torch.manual_seed(0)
    config = FactoSTConfig(
        patch_length=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_context_length=24,
        max_horizon=12,
        dropout=0.0,
    )
    return FactoSTModel(config).eval()


def batch(batch_size: int = 2, nodes: int = NODES) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    steps = torch.randint(0, STEPS_PER_DAY - 24, (batch_size, 1), generator=generator) + torch.arange(24)
    calendar = torch.stack((steps, torch.full_like(steps, 3)), dim=-1)
    return {
        "past_values": torch.randn(batch_size, 12, nodes, 1, generator=generator),
        "past_time_features": calendar[:, :12],
        "future_time_features": calendar[:, 12:],
    }


def adapter_config(**overrides) -> FactoSTAdapterConfig:
    return FactoSTAdapterConfig(num_nodes=NODES, steps_per_day=STEPS_PER_DAY, **overrides)


def perturb_adapter(model: torch.nn.Module, scale: float = 0.2) -> None:
    """Move the adapter away from its initialisation, as training would."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "factost_" in name:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def test_peft_type_and_trainable_parameters():
    model = get_peft_model(backbone(), adapter_config())
    assert model.peft_config["default"].peft_type == PeftType.FACTOST
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".token_hook.factost_" in name for name in trainable)
    parts = {name.split(".token_hook.")[1].split(".")[0] for name in trainable}
    assert parts == {"factost_metadata", "factost_filter", "factost_prompts"}
    node_embedding = model.base_model.model.token_hook.factost_metadata["default"].node_embedding
    assert node_embedding.weight.shape == (NODES, 32)


def test_disabled_adapter_gives_exactly_the_backbone_output():
    base = backbone()
    inputs = batch()
    reference = base(**inputs).quantile_outputs
    model = get_peft_model(base, adapter_config())
    perturb_adapter(model)
    assert not torch.allclose(model(**inputs).quantile_outputs, reference)
    with model.disable_adapter():
        assert torch.equal(model(**inputs).quantile_outputs, reference)
    assert not torch.allclose(model(**inputs).quantile_outputs, reference)


@pytest.mark.parametrize("use_prompts", [False, True])
def test_new_adapter_starts_as_the_backbone(use_prompts):
    base = backbone()
    inputs = batch()
    reference = base(**inputs).quantile_outputs
    model = get_peft_model(base, adapter_config(use_prompts=use_prompts))
    assert torch.equal(model(**inputs).quantile_outputs, reference)


def test_training_moves_only_the_adapter():
    model = get_peft_model(backbone(), adapter_config())
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**batch(), future_values=torch.randn(2, 12, NODES, 1)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[name], value) for name, value in frozen.items())
    assert any(not torch.equal(parameters[name], value) for name, value in trainable.items())


def test_save_and_load_round_trip_is_exact(tmp_path):
    base = backbone()
    clean_state = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, adapter_config()).eval()
    perturb_adapter(model)
    inputs = batch()
    expected = model(**inputs).quantile_outputs
    model.save_pretrained(tmp_path)
    fresh = backbone()
    fresh.load_state_dict(clean_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], FactoSTAdapterConfig)
    assert torch.equal(loaded(**inputs).quantile_outputs, expected)


def test_loading_an_adapter_for_another_graph_is_refused(tmp_path):
    model = get_peft_model(backbone(), adapter_config())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained on 5 nodes"):
        PeftModel.from_pretrained(backbone(), tmp_path, config=FactoSTAdapterConfig(num_nodes=7))


def test_several_adapters_switch_and_delete():
    base = backbone()
    inputs = batch()
    reference = base(**inputs).prediction_outputs
    model = get_peft_model(base, adapter_config())
    perturb_adapter(model)
    first = model(**inputs).prediction_outputs
    model.add_adapter("second", adapter_config(use_prompts=False))
    model.set_adapter("second")
    torch.testing.assert_close(model(**inputs).prediction_outputs, reference)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in name for name in trainable)
    model.set_adapter("default")
    assert torch.equal(model(**inputs).prediction_outputs, first)
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    assert not any(".second." in name for name, _ in model.named_parameters())


def test_merge_is_refused_and_unload_returns_the_backbone():
    base = backbone()
    inputs = batch()
    reference = base(**inputs).prediction_outputs
    model = get_peft_model(base, adapter_config())
    with pytest.raises(ValueError, match="no weights to merge them into"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert not any(isinstance(m, FactoSTAdapterLayer) for m in unloaded.modules())
    assert torch.equal(unloaded(**inputs).prediction_outputs, reference)


@pytest.mark.parametrize(
    ("switch", "part"),
    [("use_metadata", "factost_metadata"), ("use_interaction", "factost_filter"), ("use_prompts", "factost_prompts")],
)
def test_each_part_can_be_switched_off(switch, part):
    model = get_peft_model(backbone(), adapter_config(**{switch: False}))
    layer = model.base_model.model.token_hook
    assert "default" not in getattr(layer, part)
    assert model(**batch()).prediction_outputs.shape == (2, 12, NODES, 1)


def test_adapter_without_parts_is_refused():
    with pytest.raises(ValueError, match="needs at least one of them"):
        adapter_config(use_metadata=False, use_interaction=False, use_prompts=False)
    with pytest.raises(ValueError, match="needs num_nodes"):
        get_peft_model(backbone(), FactoSTAdapterConfig())


def test_missing_calendar_is_refused_when_metadata_fusion_needs_it():
    model = get_peft_model(backbone(), adapter_config())
    inputs = batch()
    with pytest.raises(ValueError, match="metadata fusion needs calendar features: pass past_time_features"):
        model(past_values=inputs["past_values"], horizon=12)
    without_metadata = get_peft_model(backbone(), adapter_config(use_metadata=False))
    assert without_metadata(past_values=inputs["past_values"], horizon=12).prediction_outputs.shape == (2, 12, NODES, 1)


def test_calendar_out_of_range_and_wrong_node_count_are_refused():
    model = get_peft_model(backbone(), adapter_config())
    inputs = batch()
    inputs["past_time_features"] = inputs["past_time_features"] + STEPS_PER_DAY
    with pytest.raises(ValueError, match=r"past_time_features column 0 holds values from \d+ to \d+ but the FACTOST "
                       r"adapter allows 0 .. 95"):
        model(**inputs)
    inputs = batch()
    inputs["future_time_features"][..., 1] = 7
    with pytest.raises(ValueError, match=r"future_time_features column 1 holds values from 7 to 7 but the FACTOST "
                       r"adapter allows 0 .. 6"):
        model(**inputs)
    with pytest.raises(ValueError, match="past_values has 3 nodes but the FACTOST adapter was built for num_nodes=5"):
        model(**batch(nodes=3))
    subset = batch(nodes=3)
    assert model(**subset, node_index=torch.tensor([0, 2, 4])).prediction_outputs.shape == (2, 12, 3, 1)


def test_prompts_sit_at_position_zero_beside_the_context_positions(monkeypatch):
    model = get_peft_model(backbone(), adapter_config())
    attention = next(m for m in model.modules() if isinstance(m, FactoSTAttention))
    seen = []
    gated = attention.forward_with_prompts

    def record(hidden, positions, prompts, gate):
        seen.append((positions.tolist(), prompts.shape[1], gate.tolist()))
        return gated(hidden, positions, prompts, gate)

    monkeypatch.setattr(attention, "forward_with_prompts", record)
    model(**batch())
    # register at 0, then 3 context and 3 future patches at 1 .. 6 as in pretraining; 3 closed prompt gates
    assert seen == [([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, [0.0, 0.0, 0.0])]


def test_new_adapter_is_the_shipped_backbone_bit_for_bit_on_real_data_and_its_prompt_gates_learn():
    splits = build_splits(load("sz-taxi"), input_len=12, horizon=12)
    inputs = splits.collator([splits.test[i] for i in range(0, 96, 12)])
    backbone_model = AutoModelForTimeSeriesPrediction.from_pretrained(shipped_checkpoint("factost-cpu")).eval()
    with torch.no_grad():
        expected = backbone_model(**inputs)
    config = FactoSTAdapterConfig(**splits.size_kwargs(), steps_per_day=splits.steps_per_day)
    model = get_peft_model(backbone_model, config).eval()
    output = model(**inputs)
    assert torch.equal(output.quantile_outputs, expected.quantile_outputs)
    assert torch.equal(output.loss, expected.loss)
    output.loss.backward()
    prompts = model.base_model.model.token_hook.factost_prompts["default"]
    # the closed gates get a gradient, so training opens them; the prompts' learned part follows
    assert prompts.gate.grad.abs().min() > 0
    randomised = get_peft_model(
        AutoModelForTimeSeriesPrediction.from_pretrained(shipped_checkpoint("factost-cpu")).eval(),
        FactoSTAdapterConfig(**splits.size_kwargs(), steps_per_day=splits.steps_per_day, init_weights=False),
    ).eval()
    with torch.no_grad():
        assert not torch.allclose(randomised(**inputs).quantile_outputs, expected.quantile_outputs)


def test_metadata_fusion_adds_hand_computed_terms():
    fusion = MetadataFusion(num_nodes=2, calendar_sizes=[4, 7], node_dim=1, calendar_dim=1, hidden_size=2)
    with torch.no_grad():
        fusion.node_embedding.weight.copy_(torch.tensor([[1.0], [2.0]]))
        fusion.calendar_embeddings[0].weight.copy_(torch.arange(4.0)[:, None])
        fusion.calendar_embeddings[1].weight.copy_(10 * torch.arange(7.0)[:, None])
        fusion.node_projection.weight.copy_(torch.tensor([[1.0], [0.0]]))
        fusion.calendar_projection.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        fusion.calendar_projection.bias.zero_()
    tokens = torch.zeros(1, 2, 1, 1, 2)
    context = FactoSTTokenContext(
        num_context_patches=1, patch_time=torch.tensor([[[3, 5]]]), node_index=None, codebook=torch.zeros(3, 2)
    )
    out = fusion(tokens, context)
    # node n adds its embedding to width 0; time of day 3 plus day of week 5 (x10) go to width 1
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([[1.0, 53.0], [2.0, 53.0]]))


def test_interaction_scores_learn_through_more_than_one_key():
    torch.manual_seed(0)
    filter_ = InteractionFilter(hidden_size=8, rank=4, max_lag=3)
    tokens = torch.randn(2, 5, 1, 4, 8)
    context = FactoSTTokenContext(num_context_patches=2, patch_time=None, node_index=None, codebook=torch.zeros(3, 8))
    torch.testing.assert_close(filter_(tokens, context), tokens)
    with torch.no_grad():
        filter_.gate.weight.normal_()
    filter_(tokens, context).square().sum().backward()
    rank = filter_.rank
    for scores in (filter_.spatial, filter_.temporal, filter_.lagged):
        query_and_key_grad = scores.weight.grad[: 2 * rank]
        assert query_and_key_grad.abs().sum() > 0


def test_lagged_scores_look_only_back():
    torch.manual_seed(0)
    filter_ = InteractionFilter(hidden_size=4, rank=2, max_lag=1)
    query, key, value = torch.randn(3, 1, 3, 2).unbind(0)
    out = filter_._lagged(query, key, value)
    torch.testing.assert_close(out[:, 0], value[:, 0])
    scores = torch.stack([(query[:, 2] * key[:, 2]).sum(-1), (query[:, 2] * key[:, 1]).sum(-1)], -1) / np.sqrt(2)
    weights = scores.softmax(-1)
    torch.testing.assert_close(out[:, 2], weights[:, :1] * value[:, 2] + weights[:, 1:] * value[:, 1])


def test_memory_replay_sampler_follows_the_config():
    config = adapter_config()
    sampler = config.replay_sampler(list(range(100)), batch_size=10, seed=0)
    assert isinstance(sampler, MemoryReplaySampler)
    first_batch = next(iter(sampler))
    assert sum(index < 20 for index in first_batch) >= 3
    assert adapter_config(use_memory_replay=False).replay_sampler(list(range(100)), batch_size=10) is None


def test_adapter_on_a_real_few_shot_split_returns_the_loss_of_its_forecast():
    splits = build_splits(load("sz-taxi"), input_len=12, horizon=12, few_shot=0.1)
    inputs = splits.collator([splits.train[i] for i in range(4)])
    config = FactoSTAdapterConfig(**splits.size_kwargs(), steps_per_day=splits.steps_per_day)
    assert (config.input_len, config.horizon, config.in_channels) == (12, 12, 1)
    model = get_peft_model(backbone(), config)
    perturb_adapter(model)
    output = model(**inputs)
    assert output.prediction_outputs.shape == (4, 12, splits.num_nodes, 1)
    assert torch.isfinite(output.quantile_outputs).all()
    # the loss is the masked MAE, in original units, of the adapted forecast
    target, mask = inputs["future_values"], inputs["future_observed_mask"]
    by_hand = (output.prediction_outputs - target).abs()[mask].mean()
    torch.testing.assert_close(output.loss, by_hand)
    with model.disable_adapter():
        assert not torch.allclose(model(**inputs).loss, output.loss)


def test_plain_transformers_trainer_trains_the_adapter_on_real_data(tmp_path):
    splits = build_splits(load("chickenpox"), input_len=12, horizon=12, few_shot=0.5)
    train = splits.train.select(range(0, 16 * 2, 2))
    model = get_peft_model(
        AutoModelForTimeSeriesPrediction.from_pretrained(shipped_checkpoint("factost-cpu")),
        FactoSTAdapterConfig(**splits.size_kwargs(), steps_per_day=splits.steps_per_day),
    )
    windows = splits.collator(list(train))

    def training_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(**windows).loss)

    before = training_loss()
    args = TrainingArguments(
        output_dir=str(tmp_path), label_names=["future_values"], remove_unused_columns=False, use_cpu=True,
        report_to="none", per_device_train_batch_size=8, max_steps=10, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model, args, train_dataset=train, data_collator=splits.collator)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 10 and np.isfinite(logged).all()
    # 0.698 -> 0.663 on these windows
    assert training_loss() < 0.97 * before


def test_sizes_of_the_splits_are_accepted_and_checked():
    with pytest.raises(ValueError, match="in_channels=2 but out_channels=1"):
        FactoSTAdapterConfig(num_nodes=NODES, in_channels=2, out_channels=1)
    with pytest.raises(ValueError, match="horizon must be a positive integer; got 0"):
        FactoSTAdapterConfig(num_nodes=NODES, horizon=0)


def test_non_factost_backbone_is_refused():
    with pytest.raises(TypeError, match="FACTOST adapters need a FactoSTModel backbone"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), adapter_config(target_modules=["0"]))


def test_cli_trains_and_reloads_a_factost_adapter(tmp_path):
    from st_peft import cli

    out = tmp_path / "run"
    common = ["--dataset", "chickenpox", "--input-len", "12", "--horizon", "4", "--batch-size", "16", "--few-shot", "0.2"]
    assert cli.main(["train", *common, "--adapter", "factost", "--epochs", "1", "--output-dir", str(out)]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FACTOST" and saved["num_nodes"] == 20 and saved["steps_per_day"] == 1
    assert cli.main(["evaluate", "--model-dir", str(out), "--output", str(tmp_path / "again.json")]) == 0
    first = json.loads((out / "metrics.json").read_text())
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["mae"] == pytest.approx(first["mae"], rel=1e-5)
