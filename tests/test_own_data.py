"""Your own data from the command line (issue 13): the README's "Your own data" commands on files this test
writes, the flags and YAML keys for real data, models from any folder, one-line errors and readable output.

The user's files are real data: three days of eight LOS-loop sensors as a PEMS-layout ``my.npz``, and a
PEMS distance CSV of the road distances between the connected ones (from the sensors' coordinates).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hub_server import point_hub_at, refuse_non_local_hosts, running_hub
from huggingface_hub import ModelCard
from peft import get_peft_model
from transformers import AutoModel

import st_peft.data as std
from st_peft import cli, demo
from st_peft.backbones import STID
from st_peft.data.builtin import BUILTIN_ROOT
from st_peft.hub import card_fields, load_adapter, load_backbone
from st_peft.models.factost import FactoSTModel
from st_peft.shipped import shipped_checkpoint
from st_peft.tuners.st_lora import STLoraConfig

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
NODES = 8
STEPS = 3 * 288  # three days of 5-minute readings
GWNET_CPU = "{residual_channels: 16, dilation_channels: 16, skip_channels: 64, end_channels: 128}"
README_COMMANDS = [
    'st-peft train --dataset my.npz --steps-per-day 288 --start "2024-03-01 00:00" --adjacency distances.csv '
    "--model stid --epochs 5 --batch-size 64 --output-dir runs/stid-mine",
    'st-peft train --dataset my.npz --steps-per-day 288 --start "2024-03-01 00:00" --adjacency distances.csv '
    f'--model gwnet --model-args "{GWNET_CPU}" --epochs 5 --batch-size 64 --output-dir runs/gwnet-mine',
    "st-peft evaluate runs/stid-mine",
    "st-peft evaluate runs/gwnet-mine",
]
"""The commands of the README's "Your own data", one string each (line continuations joined)."""


def haversine_km(a: np.ndarray, b: np.ndarray) -> float:
    lat1, lon1, lat2, lon2 = np.radians([*a, *b])
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return float(6371 * 2 * np.arcsin(np.sqrt(h)))


@pytest.fixture(scope="module")
def own_files(tmp_path_factory) -> Path:
    """A user's folder with ``my.npz`` (T, N, 1) and ``distances.csv`` (from,to,cost in km, PEMS layout)."""
    folder = tmp_path_factory.mktemp("own")
    los = std.load("los-loop")
    np.savez(folder / "my.npz", data=los.values[:STEPS, :NODES])
    locations = pd.read_csv(BUILTIN_ROOT / "metr-la-graph" / "graph_sensor_locations.csv", dtype={"sensor_id": str})
    where = locations.set_index("sensor_id").loc[los.node_ids[:NODES], ["latitude", "longitude"]].to_numpy()
    edges = [(i, j, round(haversine_km(where[i], where[j]), 3))
             for i in range(NODES) for j in range(NODES) if i != j and los.adjacency[i, j] > 0]
    pd.DataFrame(edges, columns=["from", "to", "cost"]).to_csv(folder / "distances.csv", index=False)
    return folder


def run_cli(command: str) -> tuple[int, str]:
    """Run one ``st-peft ...`` command line through the console script's entry point; its status and output."""
    argv = shlex.split(command)
    assert argv[0] == "st-peft"
    with redirect_stdout(io.StringIO()) as out:
        code = cli.main(argv[1:])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def own_runs(own_files) -> list[str]:
    """The README's commands, run in the user's folder; their outputs."""
    cwd = os.getcwd()
    os.chdir(own_files)
    try:
        results = [run_cli(command) for command in README_COMMANDS]
    finally:
        os.chdir(cwd)
    assert [code for code, _ in results] == [0] * len(README_COMMANDS), [out[-2000:] for _, out in results]
    return [out for _, out in results]


def test_readme_commands_train_stid_and_gwnet_then_evaluate(own_files, own_runs):
    for name in ("stid", "gwnet"):
        folder = own_files / "runs" / f"{name}-mine"
        run = json.loads((folder / "run.json").read_text())
        assert run["status"] == "finished" and run["options"]["steps_per_day"] == 288
        assert run["options"]["adjacency"] == str(own_files / "distances.csv")  # reads back from anywhere
        metrics = json.loads((folder / "metrics.json").read_text())
        again = json.loads((folder / "metrics-test.json").read_text())
        assert again["mae"] == pytest.approx(metrics["mae"], rel=1e-5)
        assert 0 < metrics["mae"] < 10  # mph: a forecast in the data's units, not the scaled space
    train_stid, train_gwnet, evaluate_stid, _ = own_runs
    # progress while training, then the demo's table (not a JSON dict)
    assert re.search(r"^epoch 1/5  step \d+/\d+  loss [\d.]+  val MAE [\d.]+", train_stid, re.M)
    assert "| forecaster | MAE@3 | RMSE@3 | MAPE%@3 |" in train_gwnet and "| gwnet |" in train_gwnet
    assert "| stid |" in evaluate_stid and "{" not in evaluate_stid
    # GWNet diffuses over the CSV's road graph: DCRNN's Gaussian kernel of the distances
    model, splits, _ = cli.load_run(cli.RunFolder(own_files / "runs" / "gwnet-mine"))
    distances = pd.read_csv(own_files / "distances.csv")
    weights = np.exp(-np.square(distances["cost"] / np.std(distances["cost"].to_numpy())))  # DCRNN: numpy std
    expected = np.zeros((NODES, NODES), dtype=np.float32)
    keep = weights >= 0.1
    expected[distances["from"][keep], distances["to"][keep]] = weights[keep]
    expected[distances["to"][keep], distances["from"][keep]] = weights[keep]
    np.testing.assert_allclose(model.adjacency.numpy(), expected, rtol=1e-6)


def test_the_readme_section_holds_these_commands():
    readme = (ROOT / "README.md").read_text()
    assert "## Your own data" in readme
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    block = " ".join(re.sub(r"\\\n\s*", "", section.split("```bash", 1)[1].split("```", 1)[0]).split())
    for command in README_COMMANDS:
        assert " ".join(command.split()) in block, command


def test_cards_name_the_data_set_by_file_name(own_files, own_runs, tmp_path):
    upload = tmp_path / "upload"
    code, _ = run_cli(f"st-peft push {own_files / 'runs' / 'stid-mine'} --repo-id org/stid-mine --save-dir {upload}")
    assert code == 0
    card = ModelCard.load(upload / "README.md")
    assert card.data.datasets == ["my.npz"]
    assert str(own_files) not in (upload / "README.md").read_text()
    splits = std.build_splits(std.load("chickenpox"), input_len=8, horizon=4)
    model = STID(**splits.model_kwargs(), steps_per_day=1, embed_dim=8, node_dim=8, tod_dim=8, dow_dim=8,
                 num_layers=1)
    fields = card_fields(model, "org/x", dataset=str(own_files / "my.npz"), metrics={"mae": 1.0})
    assert fields["dataset"] == "my.npz"
    assert card_fields(model, "org/x", dataset="org/traffic", metrics={"mae": 1.0})["dataset"] == "org/traffic"


def test_npz_without_steps_per_day_is_one_line_with_the_flag(own_files, tmp_path, capsys):
    code = cli.main(["train", "--dataset", str(own_files / "my.npz"), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--steps-per-day 288" in err, err
    assert not (tmp_path / "run").exists()  # a typo leaves no failed run behind to --overwrite


def test_real_data_options_are_yaml_keys_too(own_files, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(f"dataset: {own_files / 'my.npz'}\nsteps_per_day: 288\nstart: '2024-03-01 00:00'\n"
                      f"adjacency: {own_files / 'distances.csv'}\nmax_steps: 3\nmodel: stgcn\n")
    options = cli.parse_args(["train", "--config", str(config)])
    assert (options.steps_per_day, options.start, options.max_steps) == (288, "2024-03-01 00:00", 3)
    splits = cli.splits_for(options)
    assert splits.steps_per_day == 288 and splits.adjacency.shape == (NODES, NODES)
    assert str(splits.data.timestamps[0]) == "2024-03-01T00:00:00.000000000"
    assert cli.build_model(options, splits).adjacency.shape == (NODES, NODES)  # STGCN gets the graph


def test_a_graph_model_without_a_graph_is_one_line(own_files, tmp_path, capsys):
    code = cli.main(["train", "--dataset", str(own_files / "my.npz"), "--steps-per-day", "288", "--model", "stgcn",
                     "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "adjacency" in err and "Traceback" not in err, err


def test_debug_shows_the_traceback(own_files, tmp_path):
    with pytest.raises(std.DataError, match="steps_per_day"):
        cli.main(["train", "--dataset", str(own_files / "my.npz"), "--output-dir", str(tmp_path / "run"), "--debug"])


def test_version(capsys):
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == "st-peft 0.1.0"


def saved_dataset(own_files: Path, folder: Path) -> Path:
    data = std.load(own_files / "my.npz", steps_per_day=288, start="2024-03-01 00:00")
    data.to_hf_dataset().save_to_disk(str(folder))
    return folder


def last_step(run_dir: Path) -> int:
    return max(int(path.name.split("-")[1]) for path in (run_dir / "checkpoints").glob("checkpoint-*"))


def test_a_saved_datasets_folder_trains_for_max_steps(own_files, tmp_path):
    folder = saved_dataset(own_files, tmp_path / "my-dataset")
    out = tmp_path / "run"
    code, printed = run_cli(f"st-peft train --dataset {folder} --max-steps 3 --output-dir {out}")
    assert code == 0, printed
    assert last_step(out) == 3
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_hub_dataset_repo_id_trains(own_files, tmp_path, monkeypatch):
    """Prepared: a dataset repository (a save_to_disk folder committed to the server). Real: the download by id."""
    with running_hub(tmp_path / "hub") as hub:
        hub.publish(saved_dataset(own_files, tmp_path / "my-dataset"), "org/my-traffic", repo_type="dataset")
        point_hub_at(monkeypatch, hub.endpoint, tmp_path / "cache")
        refuse_non_local_hosts(monkeypatch)
        out = tmp_path / "run"
        code, printed = run_cli(f"st-peft train --dataset org/my-traffic --max-steps 2 --output-dir {out}")
    assert code == 0, printed
    assert json.loads((out / "run.json").read_text())["options"]["dataset"] == "org/my-traffic"
    assert last_step(out) == 2


def test_make_demo_shows_progress_while_it_trains(tmp_path, capsys):
    demo.main(["--dataset", "chickenpox", "--epochs", "2", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in progress] == ["1/2", "2/2"]
    assert out.index(progress[-1]) < out.index("| forecaster |")


def test_the_shipped_factost_checkpoint_loads_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = AutoModel.from_pretrained(shipped_checkpoint("factost-cpu"))
    assert isinstance(model, FactoSTModel)
    with pytest.raises(FileNotFoundError, match=r"ships no checkpoint 'factost-gpu'; it ships \['factost-cpu'\]"):
        shipped_checkpoint("factost-gpu")


def test_loaders_take_absolute_and_relative_local_folders(tmp_path, monkeypatch):
    splits = std.build_splits(std.load("chickenpox"), input_len=8, horizon=4)

    def backbone() -> STID:
        torch.manual_seed(0)
        return STID(**splits.model_kwargs(), steps_per_day=1, embed_dim=8, node_dim=8, tod_dim=8, dow_dim=8,
                    num_layers=1).eval()

    adapter = get_peft_model(backbone(), STLoraConfig(**splits.size_kwargs(), r=2, hidden_dim=4,
                                                      node_embedding_dim=2, num_nall_layers=1))
    with torch.no_grad():
        for parameter in adapter.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1)
    backbone().save_pretrained(tmp_path / "models" / "stid")
    adapter.save_pretrained(tmp_path / "models" / "stlora")
    batch = next(iter(splits.iter_batches("test", 4)))
    with torch.no_grad():
        expected = adapter.eval()(**batch).prediction_outputs
    monkeypatch.chdir(tmp_path / "models")
    for where in ("./stid", "stid", str(tmp_path / "models" / "stid"), "../models/stid"):
        assert isinstance(load_backbone(STID, where), STID), where
    for where in ("./stlora", str(tmp_path / "models" / "stlora"), "../models/stlora"):
        with torch.no_grad():
            output = load_adapter(backbone(), where).eval()(**batch).prediction_outputs
        assert torch.equal(output, expected), where
    with pytest.raises(FileNotFoundError, match=r"no folder \./nowhere"):
        load_backbone(STID, "./nowhere")
