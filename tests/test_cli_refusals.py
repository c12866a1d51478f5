"""What the command line refuses or warns about in one line instead of training on it silently or dumping a
traceback (issue 21, items 4 and 5): graphs and models that contradict each other, a value that would
dominate the scaler, impossible model sizes, and run folders whose model cannot be read back.

The data is the first three weeks of eight NYC bike stations (inflow and outflow) and their graph, as a
user's ``.npz`` and dense adjacency ``.csv``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from st_peft import cli
from st_peft.data.builtin import BUILTIN_ROOT

torch.set_num_threads(1)

NODES = 8
FAST = ["--input-len", "6", "--horizon", "3", "--max-steps", "1", "--batch-size", "64", "--steps-per-day", "24"]
TINY_STID = ["--model-args", "{embed_dim: 8, node_dim: 4, tod_dim: 2, dow_dim: 2, num_layers: 1}"]
TINY_GWNET = "residual_channels: 4, dilation_channels: 4, skip_channels: 8, end_channels: 8"


@pytest.fixture(scope="module")
def bike(tmp_path_factory) -> Path:
    """A folder with ``bike.npz`` (504 hours, 8 stations, inflow and outflow) and their graph ``graph.csv``."""
    folder = tmp_path_factory.mktemp("bike")
    with np.load(BUILTIN_ROOT / "nyc-bike" / "NYCBike1.npz") as archive:
        np.savez(folder / "bike.npz", data=archive["data"][: 21 * 24, :NODES, :2])
    with np.load(BUILTIN_ROOT / "nyc-bike" / "adj_mx.npz") as archive:
        np.savetxt(folder / "graph.csv", archive["adj_mx"][:NODES, :NODES], delimiter=",")
    return folder


@pytest.fixture(scope="module")
def trained(bike, tmp_path_factory) -> Path:
    """A finished one-step STID run on the bike data."""
    out = tmp_path_factory.mktemp("runs") / "stid"
    assert cli.main(["train", "--dataset", str(bike / "bike.npz"), *FAST, *TINY_STID, "--output-dir", str(out)]) == 0
    return out


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    return error


def test_a_graph_model_without_a_graph_is_refused_unless_a_learned_graph_is_asked_for(bike, tmp_path, capsys):
    data = ["--dataset", str(bike / "bike.npz"), *FAST, "--model", "gwnet"]
    assert cli.main(["train", *data, "--model-args", f"{{{TINY_GWNET}}}", "--output-dir", str(tmp_path / "a")]) == 2
    assert "--model gwnet is a graph model and the data has no graph: pass --adjacency or --model-args " \
        "'{adaptive_adjacency: true}' for a learned graph only" in one_line_error(capsys)
    assert not (tmp_path / "a").exists()
    assert cli.main(["train", *data, "--model-args", f"{{{TINY_GWNET}, adaptive_adjacency: true}}",
                     "--output-dir", str(tmp_path / "b")]) == 0


def test_a_graph_given_to_a_model_that_ignores_it_is_a_one_line_warning(bike, tmp_path, capsys):
    assert cli.main(["train", "--dataset", str(bike / "bike.npz"), *FAST, *TINY_STID, "--adjacency",
                     str(bike / "graph.csv"), "--output-dir", str(tmp_path / "run")]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "graph.csv" in line]
    assert warning == [f"st-peft: warning: --adjacency {bike / 'graph.csv'}: stid reads no graph and ignores it"]


def test_a_value_that_would_dominate_the_scaler_is_refused_naming_it(bike, tmp_path, capsys):
    with np.load(bike / "bike.npz") as archive:
        values = archive["data"].copy()
    values[100, 5, 1] = 1e19
    np.savez(tmp_path / "bike.npz", data=values)
    assert cli.main(["train", "--dataset", str(tmp_path / "bike.npz"), *FAST, "--start", "2014-04-01",
                     "--output-dir", str(tmp_path / "run")]) == 2
    assert "value 1e+19 at step 100 (2014-04-05T04:00:00), node '5', channel 'c1' is" in one_line_error(capsys)


def test_an_impossible_model_size_is_one_line(bike, tmp_path, capsys):
    assert cli.main(["train", "--dataset", str(bike / "bike.npz"), *FAST, "--model-args", "{embed_dim: -1}",
                     "--output-dir", str(tmp_path / "run")]) == 2
    assert "--model stid --adapter none on" in one_line_error(capsys)


@pytest.mark.parametrize("damage", ["truncated", "pickled", "other nodes"])
def test_evaluate_on_a_model_that_does_not_load_is_one_line(damage, trained, bike, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    weights = run / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "pickled":
        weights.write_bytes(pickle.dumps({"weight": np.zeros(3)}))
    else:  # the run's data file now holds fewer nodes than the model was trained on
        with np.load(bike / "bike.npz") as archive:
            np.savez(tmp_path / "bike.npz", data=archive["data"][:, :5])
        run_json = run / "run.json"
        run_json.write_text(run_json.read_text().replace(str(bike / "bike.npz"), str(tmp_path / "bike.npz")))
    assert cli.main(["evaluate", str(run)]) == 2
    assert f"the model in {run} does not load into the model its run.json describes" in one_line_error(capsys)
