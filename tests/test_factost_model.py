"""FactoST backbone: shapes, normalisation, rollout, positions, save/load, pretraining, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, GPT2Config

import st_peft  # noqa: F401  (registers the Auto classes)
from st_peft.models.factost import (
    FACTOST_SIZES,
    FactoSTConfig,
    FactoSTModel,
    FactoSTTokenHook,
    FactoSTTokenHookOutput,
)
from st_peft.models.factost.modeling_factost import FactoSTAttention, masked_instance_norm, rotate_half_pairs
from st_peft.models.factost.pretraining import (
    PretrainingObjective,
    WindowSampler,
    add_pretrain_arguments,
    corpus_from_builtin,
    frequency_view,
    pretrain,
    run_pretrain,
)

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
    x = torch.randn(3, 12, 5, 2)
    output = model(x, horizon=6)
    assert output.prediction.shape == (3, 6, 5, 2)
    assert output.quantiles.shape == (3, 6, 5, 2, 9)
    assert torch.equal(output.prediction, output.quantiles[..., model.config.median_index])
    assert (output.quantiles.diff(dim=-1) >= 0).all()


def test_horizon_defaults_to_y_time(model):
    x = torch.randn(2, 12, 3, 1)
    y_time = torch.zeros(2, 7, 2, dtype=torch.long)
    assert model(x, y_time=y_time).prediction.shape == (2, 7, 3, 1)


def test_every_series_is_forecast_on_its_own(model):
    x = torch.randn(2, 12, 4, 2)
    changed = x.clone()
    changed[:, :, 1:] = torch.randn_like(changed[:, :, 1:])
    changed[:, :, 0, 1] += 3.0
    before, after = model(x, horizon=4).prediction, model(changed, horizon=4).prediction
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


def test_forecast_follows_affine_changes_of_the_input(model):
    x = torch.randn(2, 12, 3, 1)
    base = model(x, horizon=8).quantiles
    moved = model(5.0 * x + 7.0, horizon=8).quantiles
    torch.testing.assert_close(moved, 5.0 * base + 7.0, rtol=1e-4, atol=1e-3)


def test_missing_values_are_ignored(model):
    x = torch.randn(2, 12, 3, 1)
    mask = torch.rand(2, 12, 3, 1) > 0.3
    mask[:, -1] = True
    other = torch.where(mask, x, torch.randn_like(x) * 50)
    first = model(x, x_mask=mask, horizon=4).prediction
    second = model(other, x_mask=mask, horizon=4).prediction
    torch.testing.assert_close(first, second)
    with_nan = torch.where(mask, x, torch.full_like(x, float("nan")))
    torch.testing.assert_close(model(with_nan, horizon=4).prediction, first)
    with_zero = torch.where(mask, x, torch.zeros_like(x))
    torch.testing.assert_close(model(with_zero, horizon=4).prediction, first)


def test_history_that_is_not_whole_patches_is_left_padded_as_missing(model):
    x = torch.randn(1, 14, 2, 1)
    padded = torch.cat((torch.zeros(1, 2, 2, 1), x), dim=1)
    mask = torch.cat((torch.zeros(1, 2, 2, 1, dtype=torch.bool), torch.ones_like(x, dtype=torch.bool)), dim=1)
    torch.testing.assert_close(model(x, horizon=4).prediction, model(padded, x_mask=mask, horizon=4).prediction)


def test_long_history_keeps_its_last_steps(model):
    x = torch.randn(1, 40, 2, 1)
    torch.testing.assert_close(model(x, horizon=4).prediction, model(x[:, -24:], horizon=4).prediction)


def test_rollout_extends_the_horizon(model):
    x = torch.randn(2, 12, 3, 1)
    long = model(x, horizon=20, rollout=True)
    assert long.prediction.shape == (2, 20, 3, 1)
    first = model(x, horizon=8).prediction
    torch.testing.assert_close(long.prediction[:, :8], first)
    fed_back = torch.cat((x, first), dim=1)
    torch.testing.assert_close(long.prediction[:, 8:16], model(fed_back, horizon=8).prediction)


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
    x = torch.randn(1, 12, 2, 1)
    plain = attention_positions(model, x=x, horizon=8)
    assert plain == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    model.token_hook = PrefixHook()
    prompted = attention_positions(model, x=x, horizon=8, use_domain_prompts=True)
    # register, 2 hook prefixes and 3 matched prompts at 0; context and future unchanged
    assert prompted == [0.0] * 6 + [1.0, 2.0, 3.0, 4.0, 5.0]


def test_domain_prompts_are_the_closest_codebook_entries(model):
    codebook = model.domain_prompts.detach()
    query = codebook[[5, 2]] * 3.0
    matched = model.match_domain_prompts(query, top_k=1)
    torch.testing.assert_close(matched[:, 0], codebook[[5, 2]])


def test_save_and_load_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, FactoSTModel)
    x = torch.randn(2, 12, 3, 1)
    assert torch.equal(model(x, horizon=8).quantiles, loaded(x, horizon=8).quantiles)
    assert isinstance(AutoConfig.for_model("factost"), FactoSTConfig)


def test_named_sizes():
    tiny = FactoSTModel(FactoSTConfig.from_size("tiny"))
    assert abs(tiny.num_parameters() - 4.4e6) / 4.4e6 < 0.05
    assert set(FACTOST_SIZES) == {"cpu", "tiny", "base"}
    with pytest.raises(ValueError, match="unknown FactoST size 'huge'"):
        FactoSTConfig.from_size("huge")


def test_series_shorter_than_one_patch_is_refused(model):
    with pytest.raises(ValueError, match=r"history has 3 steps, shorter than one patch \(4 steps\)"):
        model(torch.randn(1, 3, 2, 1), horizon=2)


def test_horizon_above_the_maximum_needs_rollout(model):
    with pytest.raises(ValueError, match=r"horizon 9 exceeds the model's max_horizon \(8\); pass rollout=True"):
        model(torch.randn(1, 12, 2, 1), horizon=9)


def test_bad_shapes_are_refused(model):
    with pytest.raises(ValueError, match=r"expects x of shape \(B, L, N, C\)"):
        model(torch.randn(12, 2, 1), horizon=2)
    with pytest.raises(ValueError, match="y_time covers 3 steps but the horizon is 4"):
        model(torch.randn(1, 12, 2, 1), y_time=torch.zeros(1, 3, 2, dtype=torch.long), horizon=4)
    with pytest.raises(ValueError, match=r"x_mask has shape \(1, 12, 3, 1\) but x has shape \(1, 12, 2, 1\)"):
        model(torch.randn(1, 12, 2, 1), x_mask=torch.ones(1, 12, 3, 1, dtype=torch.bool), horizon=2)


def test_checkpoint_of_another_model_type_is_refused(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model type 'gpt2', not 'factost'"):
        FactoSTModel.from_pretrained(tmp_path)


def test_bad_configs_are_refused():
    with pytest.raises(Exception, match="must be increasing and contain 0.5"):
        tiny_config(quantiles=[0.1, 0.9])
    with pytest.raises(Exception, match="is not a multiple of num_attention_heads"):
        tiny_config(hidden_size=18, num_attention_heads=4)


def test_frequency_views():
    values = torch.randn(3, 16)
    low = frequency_view(values, torch.tensor([True] * 3), torch.tensor([1, 1, 1]))
    torch.testing.assert_close(low, values.mean(dim=1, keepdim=True).expand(-1, 16))
    cutoff = torch.tensor([3, 3, 3])
    high = frequency_view(values, torch.tensor([False] * 3), cutoff)
    low = frequency_view(values, torch.tensor([True] * 3), cutoff)
    torch.testing.assert_close(low + high, values + values.mean(dim=1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_window_sampler_refuses_a_corpus_without_long_series():
    corpus = datasets.Dataset.from_dict({"target": [[1.0] * 10, [2.0] * 20]})
    with pytest.raises(ValueError, match="no series of the corpus has 32 steps"):
        WindowSampler(corpus, window=32)
    with pytest.raises(ValueError, match="no column 'values'"):
        WindowSampler(corpus, window=8, column="values")


def test_pretraining_runs_saves_and_learns_from_a_hf_dataset(tmp_path):
    rng = np.random.default_rng(0)
    steps = np.arange(400)
    series = [np.sin(2 * np.pi * steps / period + rng.uniform(0, 6)) for period in (8, 12, 16, 24)]
    series[0][5:9] = np.nan
    corpus = datasets.Dataset.from_dict({"target": [s.tolist() for s in series]})
    config = tiny_config()
    log = pretrain(
        config, corpus, tmp_path, max_steps=60, batch_size=32, warmup_steps=5, log_every=20, cpu=True, seed=0
    )
    assert log["steps"] == 60
    losses = [entry["loss"] for entry in log["losses"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, FactoSTModel)
    assert json.loads((tmp_path / "pretraining_log.json").read_text())["steps"] == 60


def test_pretraining_objective_is_a_finite_pinball_loss():
    config = tiny_config()
    model = FactoSTModel(config)
    values = torch.randn(16, config.max_context_length + config.max_horizon)
    mask = torch.ones_like(values, dtype=torch.bool)
    loss = PretrainingObjective()(model, config, values, mask, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.head.weight.grad is not None


def test_pretrain_command_line_on_builtin_data(tmp_path):
    corpus = corpus_from_builtin(["chickenpox"])
    assert len(corpus) == 20 and len(corpus[0]["target"]) == 521
    parser = add_pretrain_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args(
        ["--data", "chickenpox", "--output", str(tmp_path), "--max-steps", "3", "--batch-size", "8", "--cpu"]
    )
    assert run_pretrain(args)["steps"] == 3
    assert (tmp_path / "model.safetensors").exists()


def test_shipped_checkpoint_loads_and_is_small():
    weights = CHECKPOINT / "model.safetensors"
    assert weights.stat().st_size <= 20 * 1024 * 1024
    assert json.loads((CHECKPOINT / "config.json").read_text())["model_type"] == "factost"
    model = AutoModel.from_pretrained(CHECKPOINT).eval()
    assert isinstance(model, FactoSTModel)
    output = model(torch.randn(2, 12, 3, 1), horizon=12)
    assert torch.isfinite(output.quantiles).all()


def test_shipped_checkpoint_beats_seasonal_naive_zero_shot_on_held_out_sz_taxi():
    from st_peft.baselines import seasonal_naive_forecast
    from st_peft.data import build_splits, load
    from st_peft.metrics import masked_mae

    splits = build_splits(load("sz-taxi"), input_len=12, horizon=12)
    starts = np.asarray(splits.test["start"])[::24]
    batch = splits.collator.gather(starts)
    model = AutoModel.from_pretrained(CHECKPOINT).eval()
    with torch.no_grad():
        forecast = splits.scaler.inverse_transform(model(x=batch["x"], horizon=12).prediction)
    zero_shot = float(masked_mae(forecast, batch["y"], batch["y_mask"]))
    naive = float(masked_mae(torch.from_numpy(seasonal_naive_forecast(splits)[::24]), batch["y"], batch["y_mask"]))
    assert zero_shot < 0.95 * naive


def test_pretraining_runs_on_two_processes_under_accelerate_launch(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # `--cpu --num_processes 2` silently runs one process; `--multi_gpu` on the CPU runs two
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), "-m", "st_peft.cli", "pretrain", "--data", "chickenpox",
        "--max-steps", "4", "--batch-size", "8", "--output", str(tmp_path), "--cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((tmp_path / "pretraining_log.json").read_text())
    assert log["processes"] == 2 and log["steps"] == 4
    assert isinstance(AutoModel.from_pretrained(tmp_path), FactoSTModel)
