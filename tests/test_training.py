"""Training on real data: plain transformers.Trainer and STTrainer with st-peft, PEFT, transformers and user models."""

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments

import st_peft.data as std
from st_peft.backbones import STID
from st_peft.losses import get_loss, masked_huber
from st_peft.metrics import masked_mae
from st_peft.outputs import ForecastOutput
from st_peft.training import MemoryReplaySampler, STTrainer, default_horizons, st_training_args

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def splits():
    # 16 Shenzhen roads, a quarter of them missing at any time: masking matters here
    data = std.load("sz-taxi").select_nodes(np.arange(16))
    return std.build_splits(data, input_len=12, horizon=12)


@pytest.fixture(scope="module")
def small(splits):
    """Small train / val / test subsets so that a full epoch takes a fraction of a second."""
    return splits.train.select(range(0, 2000, 4)), splits.val.select(range(96)), splits.test.select(range(96))


def tiny_stid(splits, **kwargs) -> STID:
    torch.manual_seed(0)
    return STID(**splits.model_kwargs(), steps_per_day=splits.steps_per_day, embed_dim=16, node_dim=8,
                tod_dim=8, dow_dim=8, num_layers=1, **kwargs)


class NodeLinear(nn.Module):
    """History ``(B, L, N, C)`` -> horizon ``(B, H, N, C)`` by a Linear over the time axis, in original units."""

    def __init__(self, input_len: int = 12, horizon: int = 12) -> None:
        super().__init__()
        self.proj = nn.Linear(input_len, horizon)

    def forward(self, past_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.proj(past_values.transpose(1, 3)).transpose(1, 3)


class PastValuesOnly(nn.Module):
    """A user's module whose forward takes exactly ``past_values`` and returns a bare tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 12)

    def forward(self, past_values):
        return self.proj(past_values.transpose(1, 3)).transpose(1, 3)


class ConstantWithAux(nn.Module):
    """Predicts 0 everywhere and reports a fixed auxiliary loss (no loss of its own)."""

    def __init__(self, horizon: int, aux: float) -> None:
        super().__init__()
        self.horizon = horizon
        self.bias = nn.Parameter(torch.zeros(()))
        self.aux = aux

    def forward(self, past_values: torch.Tensor, **kwargs) -> ForecastOutput:
        batch, _, nodes, channels = past_values.shape
        prediction = self.bias.expand(batch, self.horizon, nodes, channels)
        return ForecastOutput(prediction_outputs=prediction, aux_loss=torch.tensor(self.aux))


@dataclass
class TinyConfig(PretrainedConfig):
    model_type = "st_peft_test_tiny"
    input_len: int = 12
    horizon: int = 12


class TinyPretrained(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.input_len, config.horizon)
        self.post_init()

    def forward(self, past_values: torch.Tensor, **kwargs) -> ForecastOutput:
        return ForecastOutput(prediction_outputs=self.proj(past_values.transpose(1, 3)).transpose(1, 3))


def make_trainer(model, splits, small, tmp_path, epochs=2, **kwargs):
    train, val, _ = small
    args = st_training_args(str(tmp_path), epochs=epochs, batch_size=32, lr=1e-2, disable_tqdm=True)
    return STTrainer(model, args, train, val, splits.collator, **kwargs)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def loss_on(model: nn.Module, batch: dict) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def test_plain_transformers_trainer_trains_stid(splits, small, tmp_path):
    """No st-peft glue: Trainer reads the model's own loss (original units) and the loss falls."""
    model = tiny_stid(splits)
    batch = splits.collator(list(small[1]))
    before = loss_on(model, batch)
    args = TrainingArguments(str(tmp_path), max_steps=40, per_device_train_batch_size=32, learning_rate=1e-2,
                             label_names=["future_values"], remove_unused_columns=False, use_cpu=True,
                             report_to="none", disable_tqdm=True, logging_steps=5, save_strategy="no")
    Trainer(model, args, train_dataset=small[0], data_collator=splits.collator).train()
    after = loss_on(model, batch)
    assert after < 0.8 * before, (before, after)


def test_sttrainer_uses_the_models_loss(splits, small, tmp_path):
    model = tiny_stid(splits, loss="mse").eval()
    trainer = make_trainer(model, splits, small, tmp_path)
    batch = splits.collator([small[0][i] for i in range(8)])
    with torch.no_grad():
        expected = model(**batch).loss
        loss = trainer.compute_loss(model, batch)
    assert torch.equal(loss, expected)
    # the model's mse, not the masked MAE the trainer would use for a bare tensor
    assert not torch.isclose(loss, masked_mae(model(**batch).prediction_outputs, batch["future_values"],
                                              batch["future_observed_mask"]))


def test_module_taking_only_past_values_trains(splits, small, tmp_path):
    """``forward(self, past_values)``: STTrainer passes only the keys its signature names."""
    model = PastValuesOnly()
    before = params_of(model)
    trainer = make_trainer(model, splits, small, tmp_path, epochs=1)
    trainer.train()
    assert not torch.equal(params_of(model)["proj.weight"], before["proj.weight"])
    history = [log["eval_mae"] for log in trainer.state.log_history if "eval_mae" in log]
    assert len(history) == 1 and np.isfinite(history[0])


def test_loss_of_a_bare_forecast_is_masked_mae_in_original_units_plus_aux(splits, small, tmp_path):
    trainer = make_trainer(ConstantWithAux(12, aux=0.5), splits, small, tmp_path)
    batch = splits.collator([small[0][i] for i in range(8)])
    loss = trainer.compute_loss(trainer.model, batch)
    y, observed = batch["future_values"].numpy(), batch["future_observed_mask"].numpy()
    expected = np.abs(y)[observed].mean() + 0.5
    assert observed.mean() < 0.95  # the batch really has missing targets
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_bad_batches_are_named(splits, small, tmp_path):
    trainer = make_trainer(NodeLinear(12, 6), splits, small, tmp_path)
    batch = splits.collator([small[0][0], small[0][1]])
    with pytest.raises(ValueError, match=r"future_values has shape \(2, 12, 16, 1\): its horizon is 12 steps, "
                                         r"the model forecasts horizon=6"):
        trainer.compute_loss(trainer.model, batch)
    batch.pop("future_observed_mask")
    with pytest.raises(KeyError, match="future_observed_mask"):
        trainer.compute_loss(trainer.model, batch)

    class OtherNames(nn.Module):
        def forward(self, history, history_mask=None):
            return history

    with pytest.raises(TypeError, match="must take the history as past_values"):
        trainer.compute_loss(OtherNames(), splits.collator([small[0][0]]))


def test_stid_trains_keeps_best_safetensors_checkpoint(splits, small, tmp_path):
    model = tiny_stid(splits)
    trainer = make_trainer(model, splits, small, tmp_path, epochs=3)
    before = trainer.evaluate()["eval_mae"]
    trainer.train()
    history = [log["eval_mae"] for log in trainer.state.log_history if "eval_mae" in log]
    assert len(history) == 3 and min(history) < 0.9 * before
    # the best checkpoint is reloaded at the end
    assert trainer.state.best_metric == pytest.approx(min(history))
    assert trainer.evaluate()["eval_mae"] == pytest.approx(min(history), rel=1e-5)
    best = trainer.state.best_model_checkpoint
    assert "model.safetensors" in os.listdir(best) and "scaler.json" not in os.listdir(best)
    saved = load_file(os.path.join(best, "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    test = trainer.evaluate_test(small[2])
    assert {"mae@3", "rmse@6", "mape@12", "wape", "mae", "loss"} <= set(test)
    assert not any(k.startswith("test_") for k in test)
    # the same number by hand: forecast the whole test subset at once, pool observed errors
    batch = splits.collator(list(small[2]))
    model.eval()
    with torch.no_grad():
        forecast = model(**batch).prediction_outputs
    expected = float(masked_mae(forecast, batch["future_values"], batch["future_observed_mask"]))
    assert test["mae"] == pytest.approx(expected, rel=1e-5)


def test_peft_model_trains_adapter_only_and_resumes(splits, small, tmp_path):
    torch.manual_seed(0)
    base = NodeLinear()
    frozen = params_of(base)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["proj"], init_lora_weights=False))
    initial_lora_b = model.base_model.model.proj.lora_B["default"].weight.detach().clone()
    trainer = make_trainer(model, splits, small, tmp_path / "full", epochs=2)
    trainer.train()
    checkpoints = sorted(p for p in os.listdir(tmp_path / "full") if p.startswith("checkpoint-"))
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "full" / checkpoints[0])
    after = params_of(model)
    base_layer = model.get_base_model().proj.base_layer
    assert torch.equal(base_layer.weight, frozen["proj.weight"]) and torch.equal(base_layer.bias, frozen["proj.bias"])
    assert not base_layer.weight.requires_grad
    assert not torch.equal(after["base_model.model.proj.lora_B.default.weight"], initial_lora_b)

    # resuming from the first epoch's checkpoint lands on the same adapter as the straight run
    torch.manual_seed(0)
    resumed = get_peft_model(NodeLinear(), LoraConfig(r=2, lora_alpha=2, target_modules=["proj"],
                                                      init_lora_weights=False))
    first = tmp_path / "full" / min(checkpoints, key=lambda p: int(p.split("-")[1]))
    make_trainer(resumed, splits, small, tmp_path / "resumed", epochs=2).train(resume_from_checkpoint=str(first))
    for name, value in params_of(resumed).items():
        torch.testing.assert_close(value, after[name])
    assert isinstance(resumed, PeftModel)


def test_pretrained_model_trains_and_resumes_exactly(splits, small, tmp_path):
    torch.manual_seed(0)
    model = TinyPretrained(TinyConfig())
    trainer = make_trainer(model, splits, small, tmp_path / "full", epochs=2)
    initial = params_of(model)
    trainer.train()
    final = params_of(model)
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    first = tmp_path / "full" / f"checkpoint-{trainer.state.global_step // 2}"
    assert {"config.json", "model.safetensors"} <= set(os.listdir(first))

    torch.manual_seed(0)
    again = TinyPretrained(TinyConfig())
    make_trainer(again, splits, small, tmp_path / "resumed", epochs=2).train(resume_from_checkpoint=str(first))
    for name, value in params_of(again).items():
        torch.testing.assert_close(value, final[name])


def test_early_stopping_on_validation_mae(splits, small, tmp_path):
    train, val, _ = small
    args = st_training_args(str(tmp_path), epochs=10, batch_size=64, lr=0.0, disable_tqdm=True)
    trainer = STTrainer(NodeLinear(), args, train, val, splits.collator, early_stopping_patience=2)
    trainer.train()
    steps_per_epoch = -(-len(train) // 64)
    # epoch 1 sets the best MAE, epochs 2 and 3 do not beat it (lr 0): stop after 3 of 10
    assert trainer.state.global_step == 3 * steps_per_epoch


def test_memory_replay_sampler_proportions_exactly():
    starts = np.arange(100)[::-1].copy()  # rows stored newest first: memory is by start, not by row
    sampler = MemoryReplaySampler(starts, batch_size=10, memory_fraction=0.2, replay_fraction=0.3, seed=1)
    memory_rows = set(range(80, 100))  # the rows holding starts 0..19
    batches = list(sampler)
    assert len(batches) == len(sampler) == 12  # 80 stream windows, 7 per batch -> 11 full + 1 of 3
    for batch in batches[:-1]:
        assert len(batch) == 10 and len(set(batch)) == 10
        assert sum(i in memory_rows for i in batch) == 3
    assert len(batches[-1]) == 3 + 1  # 3 stream windows, round(3 * 3 / 7) = 1 replayed
    stream_seen = [i for b in batches for i in b if i not in memory_rows]
    assert sorted(stream_seen) == list(range(80))  # every stream window exactly once per epoch
    assert list(sampler) == batches  # same epoch, same batches (every DDP rank agrees)
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(ValueError, match="replays 3 windows but the memory holds only 2"):
        MemoryReplaySampler(np.arange(10), batch_size=10, memory_fraction=0.2, replay_fraction=0.3)


def test_trainer_uses_memory_replay_batches(splits, small, tmp_path):
    train = small[0]
    starts = np.asarray(train["start"])
    sampler = MemoryReplaySampler(starts, batch_size=20, replay_fraction=0.25)
    seen: list[list[int]] = []

    def recording_collator(rows):
        seen.append([row["start"] for row in rows])
        return splits.collator(rows)

    train_, val, _ = small
    args = st_training_args(str(tmp_path), epochs=1, batch_size=20, disable_tqdm=True)
    trainer = STTrainer(NodeLinear(), args, train_, val, recording_collator, train_sampler=sampler)
    loader = trainer.get_train_dataloader()
    assert len(loader) == len(sampler)
    batch = next(iter(loader))
    assert batch["past_values"].shape == (20, 12, 16, 1)
    memory_starts = set(starts[sampler.memory])
    assert max(memory_starts) < min(set(starts) - memory_starts)  # the memory is the earliest windows
    assert len(seen[0]) == 20 and sum(s in memory_starts for s in seen[0]) == 5


def test_default_report_steps_fit_the_horizon():
    assert default_horizons(12) == (3, 6, 12)
    assert default_horizons(4) == (3,)
    assert default_horizons(2) == (2,)


def test_huber_loss_by_hand_and_loss_lookup():
    pred = torch.tensor([0.0, 3.0, 9.0])
    target = torch.tensor([1.0, 0.5, 0.0])
    mask = torch.tensor([True, True, False])
    # |e| = 1 -> 0.5 * 1^2 = 0.5; |e| = 2.5 -> 1 * (2.5 - 0.5) = 2.0; the third is missing
    assert float(masked_huber(pred, target, mask)) == pytest.approx(1.25)
    assert get_loss("huber") is masked_huber and get_loss("mae") is masked_mae
    assert get_loss(masked_huber) is masked_huber
    with pytest.raises(ValueError, match="unknown loss 'l7'"):
        get_loss("l7")


def test_plain_training_arguments_keep_the_start_column(splits, small, tmp_path):
    # Trainer would drop "start" (not a forward argument) and the collator would have nothing to gather
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=8, use_cpu=True,
                             report_to="none", disable_tqdm=True)
    model = NodeLinear()
    before = params_of(model)
    STTrainer(model, args, small[0], data_collator=splits.collator).train()
    assert not args.remove_unused_columns
    assert not torch.equal(params_of(model)["proj.weight"], before["proj.weight"])


class NaNAfter(nn.Module):
    """A linear forecaster whose forecast turns NaN from the ``bad_call``-th training call on."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 12)
        self.calls = 0
        self.bad_call = bad_call

    def forward(self, past_values: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls += self.training
        forecast = self.proj(past_values.transpose(1, 3)).transpose(1, 3)
        return forecast * float("nan") if self.calls >= self.bad_call else forecast


def test_a_non_finite_loss_stops_training_naming_the_step(splits, small, tmp_path):
    from st_peft.training import NonFiniteLossError

    model = NaNAfter(bad_call=3)
    trainer = make_trainer(model, splits, small, tmp_path, epochs=1)
    assert trainer.args.logging_nan_inf_filter is False  # a NaN is never logged as the mean of earlier losses
    with pytest.raises(NonFiniteLossError, match=r"the training loss is nan at step 3 \(epoch 0\.1"):
        trainer.train()
    assert trainer.state.global_step == 2  # the NaN step applied nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_optimizer_state_round_trips_through_safetensors_and_refuses_other_names(tmp_path):
    from safetensors.torch import save_file

    from st_peft.optimizer_state import load_optimizer_tensors, optimizer_tensors

    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
    save_file(optimizer_tensors(optimizer), str(tmp_path / "optimizer.safetensors"))
    restored = torch.optim.Adam(layer.parameters(), lr=1e-2)
    load_optimizer_tensors(restored, load_file(str(tmp_path / "optimizer.safetensors")), lrs=[5e-3])
    saved, loaded = optimizer.state_dict()["state"], restored.state_dict()["state"]
    assert saved.keys() == loaded.keys() and restored.param_groups[0]["lr"] == 5e-3
    assert all(torch.equal(saved[i][entry], loaded[i][entry]) for i in saved for entry in saved[i])
    with pytest.raises(ValueError, match="'weight' is not the name of an optimiser state tensor"):
        load_optimizer_tensors(restored, {"weight": torch.zeros(2)})
