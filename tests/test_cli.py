"""`st-peft train` / `evaluate` end to end on the built-in chickenpox data: option parsing, run folders that
cannot lie (locks, resume, overwrite, partial checkpoints, non-finite losses) and user-input errors."""

import ast
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForTimeSeriesPrediction

import st_peft.data as std
from st_peft import cli
from st_peft.baselines import baseline_metrics, seasonal_period
from st_peft.options import TrainOptions
from st_peft.runs import CHECKPOINT_MARK, LOCK_FILE, RunFolder

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
PAUSE_AT_SAVE = Path(__file__).parent / "scripts" / "pause_at_save.py"
TINY = "{embed_dim: 8, node_dim: 4, tod_dim: 2, dow_dim: 2, num_layers: 1}"
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def write_config(path, **extra):
    lines = [
        "dataset: chickenpox",
        "input-len: 8",
        "horizon: 4",
        "epochs: 3",
        "batch_size: 64",
        "lr: 1e-2",  # PyYAML reads this as a string; the CLI converts it like the flag
        f"model_args: '{TINY}'",
        *(f"{key}: {value}" for key, value in extra.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_json(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in (folder / "checkpoints").glob("checkpoint-*"))


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def start_paused(signal_file: Path, step: int, *args: str) -> subprocess.Popen:
    """`st-peft train` in its own process, held during the checkpoint save of ``step`` (see pause_at_save.py)."""
    process = subprocess.Popen([sys.executable, str(PAUSE_AT_SAVE), str(signal_file), str(step), "train", *args],
                               env=SUBPROCESS_ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 240
    while not signal_file.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before its checkpoint save: {process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run did not reach its checkpoint save within 240 s")
        time.sleep(0.1)
    return process


# ---- options ---------------------------------------------------------------------------------


def test_yaml_gives_defaults_and_flags_override(tmp_path):
    config = write_config(tmp_path / "run.yaml")
    options = cli.parse_args(["train", "--config", str(config), "--epochs", "1", "--output-dir", "out"])
    assert options.dataset == "chickenpox" and options.input_len == 8
    assert options.epochs == 1  # the flag wins over the file's 3
    assert options.lr == pytest.approx(0.01) and isinstance(options.lr, float)
    assert options.model_args == {"embed_dim": 8, "node_dim": 4, "tod_dim": 2, "dow_dim": 2, "num_layers": 1}
    assert options.model == "stid" and options.adapter == "none"


def test_bad_options_are_one_line_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["train", "--config", str(write_config(tmp_path / "a.yaml", epoch=2))])
    assert exit_info.value.code == 2 and "unknown options ['epoch']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--config", str(write_config(tmp_path / "b.yaml", model="mlp"))])
    assert "--model (model in YAML): 'mlp' is not one of" in capsys.readouterr().err
    assert cli.main(["train"]) == 2
    assert capsys.readouterr().err.strip() == "st-peft train: error: missing --dataset, --output-dir (flag or --config key)"
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--adapter", "no-such-adapter"])
    assert "invalid choice: 'no-such-adapter'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "error"), [
    (["train", "--epohcs", "3"], "st-peft train: error: unrecognized arguments: --epohcs 3; did you mean '--epochs'?"),
    (["train", "--model", "stdi"], "invalid choice: 'stdi' (choose from 'gwnet', 'st_link', 'stgcn', 'stid'); "
     "did you mean 'stid'?"),
    (["tran"], "st-peft: error: argument command: invalid choice: 'tran' (choose from 'train', 'evaluate', "
     "'pretrain', 'push'); did you mean 'train'?"),
    (["train", "--config", "EPOHCS"], "unknown options ['epohcs']; did you mean 'epochs'?"),
    (["train", "--config", "ADAPTER"], "--adapter (adapter in YAML): 'st-lora' is not one of ['factost', 'none', "
     "'st_lora']; did you mean 'st_lora'?"),
])
def test_a_mistyped_option_is_one_line_that_says_what_was_meant(argv, error, tmp_path, capsys):
    if "EPOHCS" in argv or "ADAPTER" in argv:
        extra = {"epohcs": 3} if "EPOHCS" in argv else {"adapter": "st-lora"}
        argv = [*argv[:-1], str(write_config(tmp_path / "run.yaml", **extra))]
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    printed = capsys.readouterr().err
    assert exit_info.value.code == 2 and error in printed and printed.count("\n") == 1, printed


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    for default in ("history steps L (default: 12)", "(default: stid)", "(default: 10.0)", "(default: 0.001)"):
        assert default in printed
    assert printed.count("(default: ") == len(dataclasses.fields(TrainOptions)) + 2  # and --config, --debug


@pytest.mark.parametrize(("budget", "message"), [
    (["--epochs", "0"], "--epochs (epochs in YAML): must be above 0, got 0.0"),
    (["--max-steps", "0"], "--max-steps (max_steps in YAML): must be at least 1, got 0"),
    (["--epochs", "-1"], "--epochs (epochs in YAML): must be above 0, got -1.0"),
])
def test_a_run_that_would_train_nothing_is_refused(budget, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(write_config(tmp_path / "run.yaml")), *budget,
                     "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


HOSTILE = [
    (["train", "--epochs", "inf"], "--epochs (epochs in YAML): expected a finite number, got inf"),
    (["train", "--batch-size", "0"], "--batch-size (batch_size in YAML): must be at least 1, got 0"),
    (["train", "--batch-size", "-4"], "must be at least 1, got -4"),
    (["train", "--lr", "nan"], "--lr (lr in YAML): expected a finite number, got nan"),
    (["train", "--lr", "-1"], "--lr (lr in YAML): must be above 0, got -1.0"),
    (["train", "--seed", "-1"], "--seed (seed in YAML): must be at least 0, got -1"),
    (["train", "--patience", "-1"], "--patience (patience in YAML): must be at least 1, got -1"),
    (["train", "--model-args", "{embed_dim: 8"], "argument --model-args: '{embed_dim: 8' is not a YAML mapping"),
    (["train", "--output-dir", ""], "--output-dir (output_dir in YAML): expected a non-empty path, got ''"),
    (["push", "--timeout", "inf"], "--timeout (timeout in YAML): expected a finite number, got inf"),
    (["push", "--repo-id", "not a repo id", "--save-dir", "x"], "expected a repository id such as org/name, got "
     "'not a repo id'"),
    (["train", "YAML", "batch_size: 3.5"], "--batch-size (batch_size in YAML): expected a whole number, got 3.5"),
    (["train", "YAML", "epochs: [1, 2]"], "--epochs (epochs in YAML): expected a number, got [1, 2]"),
    (["train", "YAML", "resume: 'no'"], "--resume (resume in YAML): expected true or false, got 'no'"),
    (["train", "YAML", b"dataset: \xff\n"], "not a UTF-8 text file"),
]


@pytest.mark.parametrize(("argv", "message"), HOSTILE, ids=[" ".join(map(str, argv)) for argv, _ in HOSTILE])
def test_a_hostile_option_is_one_line_with_status_2(argv, message, tmp_path, capsys):
    if argv[1] == "YAML":
        config = tmp_path / "run.yaml"
        content = argv[2] if isinstance(argv[2], bytes) else f"dataset: chickenpox\n{argv[2]}\n".encode()
        config.write_bytes(content)
        argv = [argv[0], "--config", str(config)]
    assert cli.main([*argv, *(["--output-dir", str(tmp_path / "run")] if "--output-dir" not in argv and
                               argv[0] == "train" else [])]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and "Traceback" not in error, error
    assert not (tmp_path / "run").exists()


def test_yaml_booleans_are_real_booleans(tmp_path):
    options = cli.parse_args(["train", "--config", str(write_config(tmp_path / "run.yaml", resume="false",
                                                                     overwrite="yes"))])
    assert options.resume is False and options.overwrite is True


def test_loss_is_an_argument_of_the_model(tmp_path):
    splits = std.build_splits(std.load("chickenpox"), input_len=8, horizon=4)
    options = cli.parse_args(["train", "--config", str(write_config(tmp_path / "run.yaml")), "--loss", "huber"])
    model = cli.build_model(options, splits)
    assert model.config.loss == "huber"
    batch = next(iter(splits.iter_batches("test", 4)))
    assert float(model(**batch).loss.detach()) > 0


def test_adapter_config_can_ask_for_a_training_sampler():
    from types import SimpleNamespace

    from st_peft.training import MemoryReplaySampler

    splits = std.build_splits(std.load("chickenpox"), input_len=8, horizon=4)
    options = SimpleNamespace(batch_size=10, seed=3)

    def replay_sampler(starts, batch_size, seed):
        return MemoryReplaySampler(starts, batch_size=batch_size, seed=seed)

    model = SimpleNamespace(active_peft_config=SimpleNamespace(replay_sampler=replay_sampler))
    sampler = cli.adapter_sampler(model, splits, options)
    assert isinstance(sampler, MemoryReplaySampler) and sampler.batch_size == 10 and sampler.seed == 3
    assert len(sampler.memory) + len(sampler.stream) == len(splits.train)
    lora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig(target_modules=["0"]))
    assert cli.adapter_sampler(lora, splits, options) is None
    assert cli.adapter_sampler(torch.nn.Linear(2, 2), splits, options) is None


# ---- train, evaluate, adapters ----------------------------------------------------------------


def test_train_then_evaluate_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml")
    assert cli.main(["train", "--config", str(config), "--epochs", "1", "--output-dir", str(out)]) == 0
    assert {"model.safetensors", "run.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "scaler.json").exists()  # the model carries its scaling statistics
    splits = std.build_splits(std.load("chickenpox"), input_len=8, horizon=4)
    saved = load_file(out / "model.safetensors")
    assert torch.equal(saved["scaler.future_loc"], torch.tensor(splits.scaling_statistics()["future_loc"]))
    metrics = json.loads((out / "metrics.json").read_text())
    scores = {"mae@3", "rmse@3", "mape@3", "wape@3", "mae", "rmse", "mape", "wape"}
    assert set(metrics) == {"loss", *scores, "baselines", "verdict"}
    # the baselines are scored on the same test windows and mask as the model, with the season validation chose
    expected = baseline_metrics(splits, "test", (3,), seasonal_period(splits))
    assert metrics["baselines"]["season_steps"] == seasonal_period(splits) == 52  # weekly data: a year
    for name in ("last value", "seasonal naive"):
        assert metrics["baselines"][name] == pytest.approx(expected[name], rel=1e-6), name
    printed = capsys.readouterr().out
    assert re.search(r"^\| stid \|.*\n\| last value \|.*\n\| seasonal naive \|", printed, re.M), printed
    assert f"verdict: {metrics['verdict']}\n" in printed
    assert re.fullmatch(r"stid (beats|loses to) .*MAE [\d.]+ vs [\d.]+\)", metrics["verdict"])
    run = run_json(out)
    assert run["status"] == "finished" and run["options"]["epochs"] == 1
    assert run["options"]["model_args"]["embed_dim"] == 8
    assert all((out / "checkpoints" / f"checkpoint-{step}" / CHECKPOINT_MARK).is_file()
               for step in checkpoint_steps(out))

    # the run folder is a model folder: transformers' Auto class loads it, and it forecasts in
    # original units exactly as the run's own model does
    loaded = AutoModelForTimeSeriesPrediction.from_pretrained(out).eval()
    rebuilt = cli.load_run(RunFolder(out))[0].eval()
    assert type(loaded) is type(rebuilt) and loaded.config.steps_per_day == splits.steps_per_day
    batch = next(splits.iter_batches("test", batch_size=4))
    with torch.no_grad():
        forecast, expected = loaded(**batch), rebuilt(**batch)
    assert torch.equal(forecast.prediction_outputs, expected.prediction_outputs)
    assert torch.equal(forecast.loc[0, 0], saved["scaler.future_loc"])

    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli.main(["train", "--config", str(config), "--epochs", "1", "--seed", "3", "--output-dir", str(out)]) == 2
    assert "already holds a finished run; pass --overwrite to start over" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before

    assert cli.main(["evaluate", "--model-dir", str(out), "--batch-size", "7"]) == 0
    again = json.loads((out / "metrics-test.json").read_text())
    for key in scores:  # the loss is a mean of batch means, so it depends on the batch size
        assert again[key] == pytest.approx(metrics[key], rel=1e-5), key
    assert again["baselines"] == metrics["baselines"] and again["verdict"] == metrics["verdict"]
    assert f"verdict: {metrics['verdict']}" in capsys.readouterr().out


def test_registered_adapter_trains_and_reloads(tmp_path, monkeypatch):
    def lora(backbone, splits, options):
        config = LoraConfig(r=options.adapter_args["r"], target_modules=["fc1", "fc2"])
        return get_peft_model(backbone, config)

    monkeypatch.setitem(cli.ADAPTERS, "lora", lora)
    backbone_run, adapter_run = tmp_path / "backbone", tmp_path / "adapter"
    config = write_config(tmp_path / "run.yaml", epochs=1)
    assert cli.main(["train", "--config", str(config), "--output-dir", str(backbone_run)]) == 0
    assert cli.main(["train", "--config", str(config), "--output-dir", str(adapter_run), "--adapter", "lora",
                     "--adapter-args", "{r: 2}", "--backbone-from", str(backbone_run)]) == 0
    assert (adapter_run / "adapter" / "adapter_model.safetensors").is_file()
    # the backbone stays frozen: its weights in the adapter run equal the ones it started from
    start = load_file(backbone_run / "model.safetensors")
    tuned = load_file(adapter_run / "model.safetensors")
    assert torch.equal(tuned["base_model.model.encoder.0.fc1.base_layer.weight"], start["encoder.0.fc1.weight"])
    assert torch.equal(tuned["base_model.model.series_embedding.weight"], start["series_embedding.weight"])
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in tuned.items())
    assert cli.main(["evaluate", "--model-dir", str(adapter_run), "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((adapter_run / "metrics.json").read_text())
    assert json.loads((tmp_path / "m.json").read_text())["mae"] == pytest.approx(metrics["mae"], rel=1e-5)


# ---- run folders that cannot lie (issue 14) ----------------------------------------------------


def test_two_concurrent_runs_into_one_folder(tmp_path):
    """Real CLI, two processes: the second is refused naming the first's process id; the first finishes."""
    out, signal_file = tmp_path / "run", tmp_path / "paused"
    config = str(write_config(tmp_path / "run.yaml", epochs=1))
    first = start_paused(signal_file, 6, "--config", config, "--output-dir", str(out))
    second = subprocess.run([sys.executable, "-m", "st_peft.cli", "train", "--config", config, "--seed", "7",
                             "--output-dir", str(out)], env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    signal_file.unlink()
    _, first_err = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by another st-peft process (pid {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, first_err[-3000:]
    run = run_json(out)
    assert run["status"] == "finished" and run["options"]["seed"] == 0
    # the saved model is the first run's: the same as that run made alone
    alone = tmp_path / "alone"
    assert cli.main(["train", "--config", config, "--output-dir", str(alone)]) == 0
    assert_same_weights(out, alone)


def test_kill_during_a_checkpoint_save_then_resume(tmp_path, capsys):
    """Real CLI killed while it saves the epoch-2 checkpoint; --resume falls back to epoch 1 and lands
    on the same model as an uninterrupted run."""
    config = str(write_config(tmp_path / "run.yaml", patience=10, epochs=3))
    straight, crashed, signal_file = tmp_path / "straight", tmp_path / "crashed", tmp_path / "paused"
    assert cli.main(["train", "--config", config, "--output-dir", str(straight)]) == 0
    per_epoch = checkpoint_steps(straight)[-1] // 3
    process = start_paused(signal_file, 2 * per_epoch, "--config", config, "--output-dir", str(crashed))
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    partial = crashed / "checkpoints" / f"checkpoint-{2 * per_epoch}"
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert run_json(crashed)["status"] == "running"

    capsys.readouterr()
    assert cli.main(["train", "--config", config, "--output-dir", str(crashed), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"recovered the stale lock of process {process.pid}" in err
    assert f"skipping {partial}: no {CHECKPOINT_MARK}: a save that did not complete" in err
    assert run_json(crashed)["status"] == "finished"
    assert_same_weights(crashed, straight)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda last: (last / "trainer_state.json").unlink(), "no trainer_state.json"),
    (lambda last: truncate(last / "model.safetensors"), "unreadable model.safetensors"),
    (lambda last: truncate(last / "optimizer.pt"), "unreadable optimizer.pt"),
], ids=["no trainer state", "truncated weights", "truncated optimizer"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(damage, problem, tmp_path, capsys):
    config = str(write_config(tmp_path / "run.yaml", patience=10, epochs=2))
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert cli.main(["train", "--config", config, "--output-dir", str(straight)]) == 0
    # the same run, stopped after epoch 2's checkpoint was damaged
    assert cli.main(["train", "--config", config, "--output-dir", str(crashed)]) == 0
    last = crashed / "checkpoints" / f"checkpoint-{checkpoint_steps(crashed)[-1]}"
    damage(last)
    run = run_json(crashed)
    run["status"] = "running"
    (crashed / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert cli.main(["train", "--config", config, "--output-dir", str(crashed), "--resume"]) == 0
    assert f"skipping {last}: {problem}" in capsys.readouterr().err
    assert_same_weights(crashed, straight)


def test_overwrite_crash_then_resume_never_returns_the_old_run(tmp_path, monkeypatch, capsys):
    config = str(write_config(tmp_path / "run.yaml", epochs=1))
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    assert cli.main(["train", "--config", config, "--output-dir", str(out)]) == 0
    old = (out / "model.safetensors").read_bytes()

    from st_peft.training import STTrainer

    crash = monkeypatch.context()
    with crash as patch:
        def die(*args, **kwargs):
            raise KeyboardInterrupt

        patch.setattr(STTrainer, "training_step", die)
        with pytest.raises(KeyboardInterrupt):
            cli.main(["train", "--config", config, "--seed", "3", "--overwrite", "--output-dir", str(out)])
    assert run_json(out)["status"] == "failed"
    assert not (out / "model.safetensors").exists() and checkpoint_steps(out) == []

    capsys.readouterr()
    assert cli.main(["train", "--config", config, "--seed", "3", "--output-dir", str(out), "--resume"]) == 0
    assert "no complete checkpoint of run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() != old
    assert cli.main(["train", "--config", config, "--seed", "3", "--output-dir", str(fresh)]) == 0
    assert_same_weights(out, fresh)


def test_resume_refuses_other_options_and_finished_runs(tmp_path, capsys):
    config = str(write_config(tmp_path / "run.yaml", epochs=1))
    out = tmp_path / "run"
    assert cli.main(["train", "--config", config, "--output-dir", str(out), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert cli.main(["train", "--config", config, "--output-dir", str(out)]) == 0
    assert cli.main(["train", "--config", config, "--output-dir", str(out), "--resume"]) == 2
    assert "has finished: nothing to resume" in capsys.readouterr().err
    run = run_json(out)
    run["status"] = "failed"
    (out / "run.json").write_text(json.dumps(run))
    assert cli.main(["train", "--config", config, "--lr", "0.5", "--output-dir", str(out), "--resume"]) == 2
    assert "these differ: lr: 0.01 -> 0.5" in capsys.readouterr().err


def test_a_checkpoint_of_another_run_is_never_resumed(tmp_path, capsys):
    config = str(write_config(tmp_path / "run.yaml", epochs=1))
    other, out = tmp_path / "other", tmp_path / "run"
    assert cli.main(["train", "--config", config, "--output-dir", str(other)]) == 0
    # a run that crashed before its first checkpoint, next to a copied checkpoint of another run
    folder = RunFolder(out)
    with folder.locked():
        folder.begin(cli.run_options(cli.parse_args(["train", "--config", config, "--output-dir", str(out)])))
    step = checkpoint_steps(other)[-1]
    os.makedirs(out / "checkpoints")
    os.rename(other / "checkpoints" / f"checkpoint-{step}", out / "checkpoints" / f"checkpoint-{step}")
    capsys.readouterr()
    assert cli.main(["train", "--config", config, "--output-dir", str(out), "--resume"]) == 0
    assert "written by another run" in capsys.readouterr().err
    assert_same_weights(out, other)  # trained from step 0 with the same options: the same model


def test_stale_lock_is_recovered_with_a_warning(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(str(dead.pid))
    assert cli.main(["train", "--config", str(write_config(tmp_path / "run.yaml", epochs=1)),
                     "--output-dir", str(out)]) == 0
    assert f"recovered the stale lock of process {dead.pid} (no longer running)" in capsys.readouterr().err
    assert (out / LOCK_FILE).read_text() == ""  # released


def test_a_non_finite_loss_stops_training_naming_the_step(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(write_config(tmp_path / "run.yaml", epochs=1)), "--lr", "1e30",
                     "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "st-peft train: error: the training loss is nan at step 2" in err and "Traceback" not in err
    run = run_json(out)
    assert run["status"] == "failed" and "at step 2" in run["error"]
    assert not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()


def test_the_hub_code_does_not_import_the_command_line():
    for module in ("hub.py", "hub_http.py", "runs.py"):
        tree = ast.parse((ROOT / "st_peft" / module).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert "st_peft.cli" not in imported and not ("st_peft" in imported and "cli" in names), module
