"""`st-peft train` / `st-peft evaluate` end to end on the built-in chickenpox data, and option parsing."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import st_peft.data as std
from st_peft import cli

torch.set_num_threads(1)

TINY = "{embed_dim: 8, node_dim: 4, tod_dim: 2, dow_dim: 2, num_layers: 1}"


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


def test_yaml_gives_defaults_and_flags_override(tmp_path):
    config = write_config(tmp_path / "run.yaml")
    options = cli.parse_args(["train", "--config", str(config), "--epochs", "1", "--output-dir", "out"])
    assert options.dataset == "chickenpox" and options.input_len == 8
    assert options.epochs == 1  # the flag wins over the file's 3
    assert options.lr == pytest.approx(0.01) and isinstance(options.lr, float)
    assert options.model_args == {"embed_dim": 8, "node_dim": 4, "tod_dim": 2, "dow_dim": 2, "num_layers": 1}
    assert options.model == "stid" and options.adapter == "none"


def test_bad_options_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"unknown options \['epoch'\]"):
        cli.parse_args(["train", "--config", str(write_config(tmp_path / "a.yaml", epoch=2))])
    with pytest.raises(SystemExit, match="model='mlp' is not one of"):
        cli.parse_args(["train", "--config", str(write_config(tmp_path / "b.yaml", model="mlp"))])
    with pytest.raises(SystemExit, match="missing --dataset, --output-dir"):
        cli.main(["train"])
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--adapter", "no-such-adapter"])
    assert "invalid choice: 'no-such-adapter'" in capsys.readouterr().err


def test_train_then_evaluate_round_trip(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml")
    assert cli.main(["train", "--config", str(config), "--epochs", "1", "--output-dir", str(out)]) == 0
    assert {"model.safetensors", "run.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "scaler.json").exists()  # the model carries its scaling statistics
    splits = std.build_splits(std.load("chickenpox"), input_len=8, horizon=4)
    saved = load_file(out / "model.safetensors")
    assert torch.equal(saved["scaler.future_loc"], torch.tensor(splits.scaling_statistics()["future_loc"]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"loss", "mae@3", "rmse@3", "mape@3", "wape@3", "mae", "rmse", "mape", "wape"}
    run = json.loads((out / "run.json").read_text())
    assert run["epochs"] == 1 and run["model_args"]["embed_dim"] == 8

    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="already holds a finished run"):
        cli.main(["train", "--config", str(config), "--epochs", "1", "--seed", "3", "--output-dir", str(out)])
    assert (out / "model.safetensors").read_bytes() == before

    assert cli.main(["evaluate", "--model-dir", str(out), "--batch-size", "7"]) == 0
    again = json.loads((out / "metrics-test.json").read_text())
    for key in metrics:
        if key != "loss":  # the loss is a mean of batch means, so it depends on the batch size
            assert again[key] == pytest.approx(metrics[key], rel=1e-5), key


def test_loss_is_an_argument_of_the_model(tmp_path):
    splits = std.build_splits(std.load("chickenpox"), input_len=8, horizon=4)
    options = cli.parse_args(["train", "--config", str(write_config(tmp_path / "run.yaml")), "--loss", "huber"])
    model = cli.build_model(options, splits)
    assert model.loss_name == "huber"
    batch = next(iter(splits.iter_batches("test", 4)))
    assert float(model(**batch).loss.detach()) > 0


def test_registered_adapter_trains_and_reloads(tmp_path, monkeypatch):
    def lora(backbone, splits, options):
        config = LoraConfig(r=options.adapter_args["r"], target_modules=["fc1", "fc2"])
        return get_peft_model(backbone, config)

    monkeypatch.setitem(cli.ADAPTERS, "lora", lora)
    backbone_run, adapter_run = tmp_path / "backbone", tmp_path / "adapter"
    config = write_config(tmp_path / "run.yaml", epochs=1)
    cli.main(["train", "--config", str(config), "--output-dir", str(backbone_run)])
    cli.main(["train", "--config", str(config), "--output-dir", str(adapter_run), "--adapter", "lora",
              "--adapter-args", "{r: 2}", "--backbone-from", str(backbone_run)])
    assert (adapter_run / "adapter" / "adapter_model.safetensors").is_file()
    # the backbone stays frozen: its weights in the adapter run equal the ones it started from
    start = load_file(backbone_run / "model.safetensors")
    tuned = load_file(adapter_run / "model.safetensors")
    assert torch.equal(tuned["base_model.model.encoder.0.fc1.base_layer.weight"], start["encoder.0.fc1.weight"])
    assert torch.equal(tuned["base_model.model.series_embedding.weight"], start["series_embedding.weight"])
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in tuned.items())
    cli.main(["evaluate", "--model-dir", str(adapter_run), "--output", str(tmp_path / "m.json")])
    metrics = json.loads((adapter_run / "metrics.json").read_text())
    assert json.loads((tmp_path / "m.json").read_text())["mae"] == pytest.approx(metrics["mae"], rel=1e-5)


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


def test_resume_continues_where_the_run_stopped(tmp_path):
    config = str(write_config(tmp_path / "run.yaml", patience=10, epochs=2))
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    cli.main(["train", "--config", config, "--output-dir", str(straight)])
    # a run that died during epoch 2: only the epoch-1 checkpoint made it to disk
    steps = sorted(int(p.name.split("-")[1]) for p in (straight / "checkpoints").iterdir())
    assert len(steps) == 2 and steps[1] == 2 * steps[0]
    first_epoch = f"checkpoint-{steps[0]}"
    shutil.copytree(straight / "checkpoints" / first_epoch, crashed / "checkpoints" / first_epoch)
    cli.main(["train", "--config", config, "--output-dir", str(crashed), "--resume"])
    assert (crashed / "checkpoints" / f"checkpoint-{steps[1]}").is_dir()
    expected, resumed = load_file(straight / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], msg=key)
