"""What the command line refuses or warns about in one line instead of training on it silently or dumping a
traceback (issue 21, items 4 and 5): graphs and models that contradict each other, a value that would
dominate the scaler, impossible model sizes, and run folders whose model cannot be read back.

The data is the first three weeks of eight NYC bike stations (inflow and outflow) and their graph, as a
user's ``.npz`` and dense adjacency ``.csv``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
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
    """The error printed since the last read: one line (after any one-line warnings), no traceback."""
    printed = capsys.readouterr().err.strip()
    lines = [line for line in printed.splitlines() if not line.startswith("st-peft: warning: ")]
    assert len(lines) == 1 and "Traceback" not in printed, printed
    return lines[0]


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


@pytest.mark.parametrize("value", [1e19, 1e30])
def test_a_value_that_would_dominate_the_scaler_is_refused_naming_it(value, bike, tmp_path, capsys):
    with np.load(bike / "bike.npz") as archive:
        values = archive["data"].copy()
    values[100, 5, 1] = value
    np.savez(tmp_path / "bike.npz", data=values)
    assert cli.main(["train", "--dataset", str(tmp_path / "bike.npz"), *FAST, "--start", "2014-04-01",
                     "--output-dir", str(tmp_path / "run")]) == 2
    error = one_line_error(capsys)
    assert f"value {value:.3g} at step 100 (2014-04-05T04:00:00), node '5', channel 'c1' is" in error
    assert "it would dominate the scaling of every node; correct it or mark it missing" in error


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
    assert cli.main(["evaluate", str(run), *(["--allow-changed-data"] if damage == "other nodes" else [])]) == 2
    expected = f"the model in {run} was trained on data of 8 nodes, but its data now has 5 nodes" \
        if damage == "other nodes" else f"the model in {run} does not load into the model its run.json describes"
    assert expected in one_line_error(capsys)


def replace_values(path: Path) -> None:
    """Rewrite the data file ``path`` with the same shape and other values, as a user replacing a file would."""
    with np.load(path) as archive:
        values = archive["data"]
    np.savez(path, data=values[::-1].copy())


def test_evaluate_on_changed_data_is_refused_naming_the_file_unless_allowed(trained, bike, tmp_path, capsys):
    import shutil

    run, data = tmp_path / "run", tmp_path / "bike.npz"
    shutil.copytree(trained, run)
    shutil.copy(bike / "bike.npz", data)
    run_json = run / "run.json"
    run_json.write_text(run_json.read_text().replace(str(bike / "bike.npz"), str(data)))
    assert cli.main(["evaluate", str(run)]) == 0
    replace_values(data)
    capsys.readouterr()
    assert cli.main(["evaluate", str(run)]) == 2
    error = one_line_error(capsys)
    assert f"the data of the run in {run} changed since it trained: --dataset {data} changed (" in error
    assert error.endswith("pass --allow-changed-data to evaluate it on the new data anyway")
    assert cli.main(["evaluate", str(run), "--allow-changed-data"]) == 0
    assert "; going on (--allow-changed-data)" in capsys.readouterr().err


def test_resume_on_changed_data_is_refused_unless_allowed(bike, tmp_path, capsys):
    import shutil

    data, out = tmp_path / "bike.npz", tmp_path / "run"
    shutil.copy(bike / "bike.npz", data)
    args = ["train", "--dataset", str(data), *FAST, *TINY_STID, "--output-dir", str(out)]
    assert cli.main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["options"]["data_fingerprints"]["dataset"]["bytes"] == data.stat().st_size
    record["status"] = "running"  # as if the process had died before the end
    (out / "run.json").write_text(json.dumps(record))
    replace_values(data)
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 2
    assert "pass --allow-changed-data to resume it on the new data anyway" in one_line_error(capsys)
    assert cli.main([*args, "--resume", "--allow-changed-data"]) == 0


def test_a_refused_second_run_leaves_the_holders_id_for_the_next(bike, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", str(bike / "bike.npz"), *FAST, *TINY_STID, "--output-dir", str(out)]
    with cli.RunFolder(out).locked():
        for _ in range(2):
            assert cli.main(args) == 2
            assert f"is in use by another st-peft process (pid {os.getpid()})" in one_line_error(capsys)


def test_metrics_with_nothing_to_score_are_strict_json(bike, tmp_path, capsys):
    with np.load(bike / "bike.npz") as archive:
        values = archive["data"].copy()
    values[-110:] = 0  # the test span (the last 101 steps) is all missing: 0 in an .npz
    np.savez(tmp_path / "bike.npz", data=values)
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", str(tmp_path / "bike.npz"), *FAST, *TINY_STID,
                     "--output-dir", str(out)]) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"metrics.json holds {constant}, which is not JSON")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["mae"] is None and metrics["loss"] is None  # not a loss of 0.0 beside unscored metrics
    assert metrics["baselines"]["last value"]["mae"] is None
    assert metrics["verdict"] == "stid has no observed target to score here, so nothing beats or loses"


@pytest.mark.parametrize(("where", "code", "message"), [
    ("begin", errno.EROFS, "cannot write {out}: Read-only file system; make it writable or choose another "
     "--output-dir"),
    ("finish", errno.ENOSPC, "cannot write {out}/model.safetensors: No space left on device; free some space, then "
     "continue the run with --resume"),
])
def test_a_full_disk_or_read_only_folder_is_one_line_and_the_run_resumes(where, code, message, bike, tmp_path,
                                                                          monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", str(bike / "bike.npz"), *FAST, *TINY_STID, "--output-dir", str(out)]
    original = getattr(cli.RunFolder, where)

    def failing(self, *rest, **kwargs):
        name = out if where == "begin" else out / "model.safetensors"
        raise OSError(code, os.strerror(code), str(name))

    monkeypatch.setattr(cli.RunFolder, where, failing)
    assert cli.main(args) == 2
    assert one_line_error(capsys) == f"st-peft train: error: {message.format(out=out)}"
    monkeypatch.setattr(cli.RunFolder, where, original)
    if where == "finish":  # the run's record says it is not finished, and --resume finishes it
        assert json.loads((out / "run.json").read_text())["status"] != "finished"
        assert cli.main([*args, "--resume"]) == 0
        assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_saved_dataset_with_nan_where_its_mask_says_observed_is_refused(tmp_path, capsys):
    import datasets

    values = np.ones((200, 3, 1), dtype=np.float32)
    values[50, 2, 0] = np.nan
    dataset = datasets.Dataset.from_dict({"values": values, "mask": np.ones_like(values, dtype=bool)})
    dataset.save_to_disk(str(tmp_path / "saved"))
    capsys.readouterr()
    assert cli.main(["train", "--dataset", str(tmp_path / "saved"), *FAST, "--output-dir", str(tmp_path / "run")]) == 2
    assert "NaN or inf at step 50, node '2', channel 'c0', an observed position" in one_line_error(capsys)


GRAPHS = {
    "an edge list that reads as a matrix": ("0,1,2.5\n1,2,3.0\n0,2,1.5\n", 3,
                                             "3 rows of 3 numbers could be a dense 3x3 matrix or an edge list of 3 "
                                             "nodes; add the header from,to,cost"),
    "a distance file without rows": ("from,to,cost\n", NODES, "the edge list has no edge after its header"),
    "an edge listed twice": ("from,to,cost\n0,1,1.5\n2,3,0.7\n0,1,5.0\n", NODES,
                             "lines 2 and 4 list the edge 0 -> 1 with costs 1.5 and 5; keep one row per edge"),
    "ids that match one edge": ("from,to,distance\n1001,1002,310.5\n9001,9002,12.0\n9003,1001,40.0\n", "ids",
                                "no edge keeps a weight (1 of its rows join two of the data's node ids): the gaussian "
                                "weights are all 0"),
}


@pytest.mark.parametrize("case", GRAPHS)
def test_a_graph_file_that_would_be_misread_is_one_line(case, bike, tmp_path, capsys):
    text, nodes, message = GRAPHS[case]
    with np.load(bike / "bike.npz") as archive:
        values = archive["data"][..., 0]
    if nodes == "ids":  # a CSV whose sensors have ids, as PEMS distance files name them
        frame = pd.DataFrame(values, columns=[str(1001 + i) for i in range(NODES)])
        frame.insert(0, "date", pd.date_range("2014-04-01", periods=len(frame), freq="h"))
        frame.to_csv(tmp_path / "data.csv", index=False)
        dataset = ["--dataset", str(tmp_path / "data.csv")]
    else:
        np.savez(tmp_path / "data.npz", data=values[:, :nodes])
        dataset = ["--dataset", str(tmp_path / "data.npz"), "--steps-per-day", "24"]
    (tmp_path / "graph.csv").write_text(text)
    fast = [arg for arg in FAST if arg not in ("--steps-per-day", "24")]
    assert cli.main(["train", *dataset, *fast, "--model", "stgcn", "--adjacency", str(tmp_path / "graph.csv"),
                     "--output-dir", str(tmp_path / "run")]) == 2
    assert message in one_line_error(capsys)


def test_a_slow_epoch_shows_its_steps_and_an_eta_and_early_stopping_says_what_it_kept(bike, tmp_path, monkeypatch,
                                                                                       capsys):
    from types import SimpleNamespace

    from st_peft import progress

    # every reading of the progress clock is 6 s after the previous one: each step is slower than the 5 s interval
    ticks = iter(range(0, 10**6, 6))
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))
    fast = [arg for arg in FAST if arg not in ("--max-steps", "1")]
    assert cli.main(["train", "--dataset", str(bike / "bike.npz"), *fast, *TINY_STID, "--epochs", "40", "--lr",
                     "0.3", "--patience", "1", "--output-dir", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    steps = re.findall(r"^  step (\d+)/(\d+) \(epoch [\d.]+/40\)  \d+ s  ETA [\d.]+ (?:s|min|h)$", printed, re.M)
    assert steps and steps[0][0] == "1"  # the first step of the run already shows
    stopped = re.search(r"^early stopping after epoch (\d+): no better val MAE for 1 evaluations; kept epoch (\d+) "
                        r"\(val MAE [\d.]+\)$", printed, re.M)
    assert stopped and int(stopped[2]) == int(stopped[1]) - 1, printed[-2000:]
