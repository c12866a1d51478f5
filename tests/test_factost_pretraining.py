"""FactoST pretraining: the streamed corpus, its bad options, and runs that resume bit for bit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import st_peft  # noqa: F401  (registers the Auto classes)
from st_peft import cli
from st_peft.models.factost import FactoSTConfig, FactoSTModel
from st_peft.models.factost.corpus import (
    CorpusConfig,
    PretrainingCorpus,
    RealSeries,
    SyntheticSeriesConfig,
    read_real_series,
    synthesize,
)
from st_peft.models.factost.pretraining import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    PretrainingOptions,
    build_corpus,
    pretrain,
    run_pretrain,
)

ROOT = Path(__file__).resolve().parent.parent


def small_config(**overrides) -> FactoSTConfig:
    settings = {"patch_length": 4, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 32, "max_context_length": 64, "max_horizon": 8}
    return FactoSTConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def chickenpox_series() -> list[RealSeries]:
    return read_real_series(["chickenpox"])


def small_corpus(series: list[RealSeries], config: FactoSTConfig | None = None, **settings) -> PretrainingCorpus:
    return build_corpus(config or small_config(), series, **{"tokens_per_batch": 256, "max_batch_size": 16, **settings})


def test_synthetic_series_are_seeded_and_hold_counts_gaps_and_both_signs():
    config = SyntheticSeriesConfig()
    values, observed = synthesize(np.random.default_rng(3), 400, 300, config)
    again, observed_again = synthesize(np.random.default_rng(3), 400, 300, config)
    assert np.array_equal(values, again) and np.array_equal(observed, observed_again)
    assert values.shape == observed.shape == (400, 300) and np.isfinite(values).all()
    assert (values[~observed] == 0).all() and 0.01 < (~observed).mean() < 0.3
    whole = np.all(values == np.round(values), axis=1) & np.all(values >= 0, axis=1)
    assert 0.1 < whole.mean() < 0.5  # about count_probability of the series are counts
    assert (values < 0).any(axis=1).mean() > 0.1
    none = SyntheticSeriesConfig(count_probability=0.0, missing_run_probability=0.0, scattered_missing_probability=0.0)
    values, observed = synthesize(np.random.default_rng(0), 50, 100, none)
    assert observed.all() and not np.all(values == np.round(values), axis=1).any()


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: SyntheticSeriesConfig(count_probability=1.5), "count_probability"),
        (lambda: SyntheticSeriesConfig(steps_per_day=(24, 0)), "steps_per_day"),
        (lambda: SyntheticSeriesConfig(noise_scale=(0.5, 0.1)), "noise_scale"),
        (lambda: SyntheticSeriesConfig(harmonics=0), "harmonics"),
        (lambda: CorpusConfig(max_batch_size=0), "max_batch_size"),
        (lambda: CorpusConfig(min_context_length=4, patch_length=8), "min_context_length"),
        (lambda: CorpusConfig(mixup_weight=float("nan")), "mixup_weight"),
        (lambda: CorpusConfig(long_context_probability=-0.1), "long_context_probability"),
        (lambda: CorpusConfig(validation_fraction=1.0), "validation_fraction"),
        (lambda: PretrainingOptions(learning_rate=float("inf")), "learning_rate"),
        (lambda: PretrainingOptions(max_steps=0), "max_steps"),
    ],
)
def test_options_out_of_range_are_refused_naming_the_option(make, option):
    with pytest.raises(ValueError, match=option):
        make()


def test_batches_are_a_function_of_their_index_and_fit_the_lengths(chickenpox_series):
    corpus = small_corpus(chickenpox_series)
    twin = small_corpus(read_real_series(["chickenpox"]))
    for index in (0, 7, 123):
        batch = corpus.batch(index)
        assert np.array_equal(batch.values, twin.batch(index).values)
        assert np.array_equal(batch.observed, twin.batch(index).observed)
        assert 4 <= batch.context_length <= 64 and 1 <= batch.horizon <= 8
        assert batch.values.shape == (len(batch.sources), batch.context_length + batch.horizon)
        assert 8 <= len(batch.values) <= 16
    other_seed = small_corpus(chickenpox_series, seed=1)
    assert not np.array_equal(corpus.batch(0).values, other_seed.batch(0).values)
    kinds = np.concatenate([corpus.batch(index).sources for index in range(30)])
    assert {"synthetic", "mixup", "chickenpox"} <= set(kinds)


def test_the_stream_is_an_iterable_dataset_that_resumes_at_a_batch(chickenpox_series):
    corpus = small_corpus(chickenpox_series)
    stream = corpus.as_iterable_dataset(start=5)
    assert isinstance(stream, datasets.IterableDataset)
    rows = list(stream.take(len(corpus.batch(5).values) + 1))
    batch = corpus.batch(5)
    assert [row["batch_index"] for row in rows] == [5] * len(batch.values) + [6]
    np.testing.assert_array_equal(np.asarray(rows[1]["past_values"]), batch.values[1, : batch.context_length])
    np.testing.assert_array_equal(np.asarray(rows[1]["future_observed_mask"]), batch.observed[1, batch.context_length :])


def test_validation_windows_forecast_the_held_out_tail_only():
    # a series whose value is its own time index tells where every window was cut from
    ramp = RealSeries("ramp", np.arange(1000, dtype=np.float32) + 1)
    corpus = PretrainingCorpus(
        CorpusConfig(max_context_length=32, max_horizon=8, min_context_length=4, patch_length=4,
                     synthetic_weight=0.0, mixup_weight=0.0, tokens_per_batch=64, max_batch_size=16),
        [ramp],
    )
    boundary = 900
    for index in range(20):
        train = corpus.batch(index, "train")
        assert train.values[:, train.context_length :][train.observed[:, train.context_length :]].max() <= boundary
        held_out = corpus.batch(index, "validation")
        target = held_out.values[:, held_out.context_length :]
        assert target.min() > boundary
    with pytest.raises(ValueError, match="split"):
        corpus.batch(0, "test")


def test_all_missing_and_short_series_are_skipped_and_counted():
    series = [RealSeries("good", np.arange(50, dtype=np.float32)), RealSeries("bad", np.full(50, np.nan, np.float32)),
              RealSeries("bad", np.ones(3, np.float32))]
    corpus = PretrainingCorpus(CorpusConfig(max_context_length=32, max_horizon=8, min_context_length=4, patch_length=4),
                               series)
    assert corpus.num_series == 1 and corpus.skipped == {"bad": 2}
    assert corpus.describe()["skipped_series"] == {"bad": 2}
    with pytest.raises(ValueError, match="no usable real series"):
        PretrainingCorpus(CorpusConfig(), series[1:])
    synthetic_only = PretrainingCorpus(CorpusConfig(real_weight=0.0, mixup_weight=0.0, max_context_length=32,
                                                    max_horizon=8, min_context_length=8))
    assert set(synthetic_only.batch(0).sources) == {"synthetic"}


def run(folder: Path, corpus: PretrainingCorpus, options: PretrainingOptions, **kwargs) -> dict:
    return pretrain(small_config(), corpus, folder, options, cpu=True, validate_every=5, validation_batches=2,
                    log_every=4, **kwargs)


def test_pretraining_resumes_bit_identically_after_interruptions(tmp_path, chickenpox_series):
    corpus = small_corpus(chickenpox_series)
    options = PretrainingOptions(max_steps=12, warmup_steps=2)
    whole = run(tmp_path / "whole", corpus, options)
    assert whole["finished"] and whole["steps"] == 12 and [v["step"] for v in whole["validation"]] == [5, 10, 12]
    interrupted = tmp_path / "interrupted"
    # max_minutes=0 stops (with a checkpoint) after every single step; each call resumes
    steps = []
    while not (log := run(interrupted, corpus, options, max_minutes=0))["finished"]:
        steps.append(log["steps"])
    assert steps == list(range(1, 12))
    first, second = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(interrupted / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    assert log["validation"] == whole["validation"]
    model = AutoModel.from_pretrained(interrupted)
    assert isinstance(model, FactoSTModel)
    saved = json.loads((interrupted / "pretraining_log.json").read_text())
    assert saved["steps"] == 12 and saved["cpu_hours"] > 0 and saved["windows"] > 0 and saved["peak_rss_mib"] > 100
    files = {path: path.read_bytes() for path in interrupted.rglob("*") if path.is_file()}
    again = run(interrupted, corpus, options)
    assert again["finished"] and again["cpu_hours"] == log["cpu_hours"]
    assert {path: path.read_bytes() for path in interrupted.rglob("*") if path.is_file()} == files


def test_resuming_with_changed_options_is_refused_naming_them(tmp_path, chickenpox_series):
    corpus = small_corpus(chickenpox_series)
    run(tmp_path, corpus, PretrainingOptions(max_steps=6, warmup_steps=1), max_minutes=0)
    before = (tmp_path / CHECKPOINT / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"options\.learning_rate: 0\.001 -> 0\.002"):
        run(tmp_path, corpus, PretrainingOptions(max_steps=6, warmup_steps=1, learning_rate=2e-3))
    with pytest.raises(ValueError, match=r"corpus\.seed: 0 -> 1"):
        run(tmp_path, small_corpus(chickenpox_series, seed=1), PretrainingOptions(max_steps=6, warmup_steps=1))
    assert (tmp_path / CHECKPOINT / "model.safetensors").read_bytes() == before


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, chickenpox_series):
    corpus = small_corpus(chickenpox_series)
    options = PretrainingOptions(max_steps=4, warmup_steps=1)
    run(tmp_path, corpus, options, max_minutes=0)
    run(tmp_path, corpus, options, max_minutes=0)
    assert json.loads((tmp_path / PREVIOUS_CHECKPOINT / "state.json").read_text())["step"] == 1
    (tmp_path / CHECKPOINT / "model.safetensors").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="cannot be read"):
        log = run(tmp_path, corpus, options)
    assert log["finished"] and log["steps"] == 4
    reference = run(tmp_path / "reference", corpus, options)
    assert reference["steps"] == 4
    first = load_file(str(tmp_path / "model.safetensors"))
    second = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_the_backbone_must_take_the_corpus_lengths(tmp_path, chickenpox_series):
    corpus = small_corpus(chickenpox_series, config=small_config(max_context_length=128))
    with pytest.raises(ValueError, match="more than the backbone takes"):
        run(tmp_path, corpus, PretrainingOptions(max_steps=2))


def test_pretraining_learns_from_a_saved_hf_dataset_through_the_command_line(tmp_path):
    rng = np.random.default_rng(0)
    steps = np.arange(600)
    series = [np.sin(2 * np.pi * steps / period + rng.uniform(0, 6)) for period in (8, 12, 16, 24)]
    series[0][5:9] = np.nan
    datasets.Dataset.from_dict({"target": [s.tolist() for s in series]}).save_to_disk(tmp_path / "corpus")
    args = cli.parse_args(
        ["pretrain", "--hf-dataset", str(tmp_path / "corpus"), "--output", str(tmp_path / "run"), "--max-steps", "80",
         "--warmup-steps", "5", "--synthetic-weight", "0", "--mixup-weight", "0", "--max-batch-size", "32",
         "--validate-every", "40", "--log-every", "10", "--cpu"]
    )
    log = run_pretrain(args)
    assert log["finished"] and log["steps"] == 80
    losses = [entry["loss"] for entry in log["losses"]]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert log["validation"][-1]["all"] < log["validation"][0]["all"]
    assert isinstance(AutoModel.from_pretrained(tmp_path / "run"), FactoSTModel)
    args.column = "values"
    with pytest.raises(SystemExit, match="no column 'values'"):
        run_pretrain(args)


def test_pretraining_runs_on_two_processes_under_accelerate_launch(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # `--cpu --num_processes 2` silently runs one process; `--multi_gpu` on the CPU runs two
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), "-m", "st_peft.cli", "pretrain", "--data", "chickenpox",
        "--max-steps", "4", "--max-batch-size", "8", "--tokens-per-batch", "64", "--output", str(tmp_path), "--cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((tmp_path / "pretraining_log.json").read_text())
    assert log["processes"] == 2 and log["steps"] == 4
    assert isinstance(AutoModel.from_pretrained(tmp_path), FactoSTModel)


def test_the_study_sizes_span_150k_to_the_papers_tiny():
    counts = {size: sum(p.numel() for p in FactoSTModel(FactoSTConfig.from_size(size)).parameters())
              for size in ("small", "medium", "tiny-long")}
    assert 140_000 < counts["small"] < 160_000 < counts["medium"] < counts["tiny-long"]
    assert abs(counts["tiny-long"] - 4.4e6) < 0.05e6
    assert {FactoSTConfig.from_size(size).max_context_length for size in counts} == {2048}  # 7 days at 5 minutes


def test_the_command_line_refuses_bad_options_and_changed_resumes_in_one_line(tmp_path, capsys):
    from st_peft import cli

    common = ["pretrain", "--size", "cpu", "--data", "chickenpox", "--output", str(tmp_path), "--cpu"]
    assert cli.main([*common, "--real-weight", "-1"]) == 2
    assert "--real-weight (real_weight in YAML): must be at least 0, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "options.json").exists()
    assert cli.main([*common, "--max-steps", "2", "--warmup-steps", "1", "--validate-every", "0"]) == 0
    capsys.readouterr()
    assert cli.main([*common, "--max-steps", "3", "--warmup-steps", "1", "--validate-every", "0"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "options.max_steps: 2 -> 3" in error[0]
