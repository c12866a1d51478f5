"""The command line shows and lets the user set the data choices that change the numbers (issue 21, items 2-4):
the data summary before training, ``--channels`` / ``--target-channels``, ``--missing-value``, ``--date-column``
and ``--columns``, and one-line refusals of contradictions in the data.

Every run goes through ``st_peft.cli.main`` on real data: the first three weeks of eight NYC bike stations in the
published three-channel ``.npz`` (inflow, outflow and a time-of-day fraction), and the first 400 hours of ETTh1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from st_peft import cli
from st_peft.data.builtin import BUILTIN_ROOT

torch.set_num_threads(1)

TINY = ["--model-args", "{embed_dim: 8, node_dim: 4, tod_dim: 2, dow_dim: 2, num_layers: 1}"]
FAST = ["--input-len", "6", "--horizon", "3", "--max-steps", "1", "--batch-size", "64", *TINY]


@pytest.fixture(scope="module")
def bike(tmp_path_factory) -> Path:
    """Three weeks of eight stations of the published NYC bike file, all three channels (T, 8, 3)."""
    path = tmp_path_factory.mktemp("bike") / "bike.npz"
    with np.load(BUILTIN_ROOT / "nyc-bike" / "NYCBike1.npz") as archive:
        np.savez(path, data=archive["data"][: 21 * 24, :8])
    return path


@pytest.fixture(scope="module")
def hourly(tmp_path_factory) -> Path:
    """A folder with the first 400 hours of ETTh1 as ``ett.csv`` (a ``date`` column and seven variables)."""
    folder = tmp_path_factory.mktemp("ett")
    pd.read_csv(BUILTIN_ROOT / "ett" / "ETTh1.csv", nrows=400).to_csv(folder / "ett.csv", index=False)
    return folder


def train(tmp_path: Path, *args: str) -> int:
    return cli.main(["train", *FAST, *args, "--output-dir", str(tmp_path / "run")])


def test_the_summary_shows_every_channel_and_what_is_missing_and_the_run_keeps_it(bike, tmp_path, capsys):
    assert train(tmp_path, "--dataset", str(bike), "--steps-per-day", "24") == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert printed.index("data bike: 504 steps x 8 nodes x 3 channels, 24 steps a day (given") < \
        printed.index("training 1 steps")
    assert "missing: 0 (the PEMS convention; --missing-value none makes zeros real)" in printed
    assert "the model reads c0, c1, c2; it forecasts and is scored on c0, c1, c2" in printed
    # the time-of-day channel is a fraction of a day: the summary shows its range beside the counts'
    assert summary["channels"][2]["max"] == pytest.approx(23 / 24, abs=1e-4) and summary["channels"][0]["max"] > 10
    assert summary["observed"] < 0.8 and summary["inputs"] == summary["targets"] == ["c0", "c1", "c2"]
    # ... and says that it is a clock, forecast and scored as if it were demand
    assert [channel["clock"] for channel in summary["channels"]] == [False, False, True]
    assert "warning: c2 repeats exactly every day or week (a clock, not a reading), yet forecast and scored" in printed


def test_a_clock_channel_read_but_not_scored_draws_no_warning(bike, tmp_path, capsys):
    assert train(tmp_path, "--dataset", str(bike), "--steps-per-day", "24", "--target-channels", "0", "1") == 0
    assert "warning" not in capsys.readouterr().out


def test_channels_and_missing_value_none_change_what_is_read_and_scored(bike, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tmp_path, "--dataset", str(bike), "--steps-per-day", "24", "--channels", "0", "c1",
                 "--missing-value", "none") == 0
    printed = capsys.readouterr().out
    assert "missing: nothing: zeros are real values; observed 100.0% of entries" in printed
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["inputs"] == summary["targets"] == ["c0", "c1"] and summary["observed"] == 1.0
    assert summary["zeros"] > 0.3  # the quiet hours count as real demand now
    weights = load_file(out / "model.safetensors")
    assert weights["scaler.future_loc"].shape == (8, 2)  # two channels forecast, not three
    run = json.loads((out / "run.json").read_text())["options"]
    assert run["channels"] == [0, "c1"] and run["missing_value"] == "none"
    # evaluate rebuilds the same choices from run.json
    assert cli.main(["evaluate", str(out)]) == 0
    evaluated = json.loads((out / "metrics-test.json").read_text())
    assert evaluated["mae"] == pytest.approx(json.loads((out / "metrics.json").read_text())["mae"], rel=1e-5)


def test_target_channels_read_the_calendar_channel_but_score_only_demand(bike, tmp_path):
    out = tmp_path / "run"
    assert train(tmp_path, "--dataset", str(bike), "--steps-per-day", "24", "--channels", "0", "1", "2",
                 "--target-channels", "0", "1") == 0
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["inputs"] == ["c0", "c1", "c2"] and summary["targets"] == ["c0", "c1"]


def test_date_column_and_columns_choose_what_a_csv_holds(hourly, tmp_path):
    frame = pd.read_csv(hourly / "ett.csv").rename(columns={"date": "timestamp"})
    frame.insert(0, "row_id", np.arange(len(frame)))
    frame.to_csv(tmp_path / "ett.csv", index=False)
    assert train(tmp_path, "--dataset", str(tmp_path / "ett.csv"), "--date-column", "timestamp",
                 "--columns", "HUFL", "OT") == 0
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["shape"] == [400, 2, 1] and summary["steps_per_day_from"] == "inferred from the dates"
    assert summary["dates"] == ["2016-07-01T00:00:00", "2016-07-17T15:00:00"]


@pytest.mark.parametrize(("case", "args", "message"), [
    ("steps per day against the dates", ["--steps-per-day", "48"],
     "steps_per_day 48 contradicts the dates, which step every 0 days 01:00:00 (24 a day); drop --steps-per-day"),
    ("a row id becomes a sensor", ["ROW_ID"], "column 'row_id' looks like a row id (0, 1, 2, ...), not a sensor; "
     "choose the node columns with --columns"),
    ("a clock becomes a sensor", ["CLOCK"], "column 'hour' repeats exactly every day or week (0, 1, 2, ...): a "
     "clock, not a sensor; choose the node columns with --columns"),
    ("a text column", ["TEXT"], "column 'site' is not numeric (e.g. 'north'); choose the node columns with --columns"),
    ("a date column of another name", ["RENAMED"], "no date column 'date' (columns: when, HUFL, HULL, MUFL, MULL, "
     "LUFL, LULL, OT); name it with --date-column"),
    ("a date option on a file without columns", ["NPZ", "--date-column", "when"],
     "--date-column choose columns of a .csv file"),
    ("a start in the year 3000", ["NPZ", "--start", "3000-01-01"], "end after 2262-04-11, the last date"),
    ("a start relative to today", ["NPZ", "--start", "now"], "start 'now' is relative to today"),
    ("a channel that is not there", ["NPZ", "--channels", "0", "inflow"], "--channels: no channel 'inflow'"),
    ("a missing value that is no number", ["NPZ", "--missing-value", "zero"], "expected a number or none"),
])
def test_a_contradiction_in_the_data_is_one_line_with_status_2(case, args, message, hourly, bike, tmp_path, capsys):
    frame = pd.read_csv(hourly / "ett.csv")
    dataset = hourly / "ett.csv"
    if args and args[0] in ("ROW_ID", "CLOCK", "TEXT", "RENAMED"):
        change = args.pop(0)
        if change == "ROW_ID":
            frame.insert(1, "row_id", np.arange(len(frame)))
        elif change == "CLOCK":
            frame["hour"] = pd.to_datetime(frame["date"]).dt.hour
        elif change == "TEXT":
            frame["site"] = "north"
        else:
            frame = frame.rename(columns={"date": "when"})
        dataset = tmp_path / "ett.csv"
        frame.to_csv(dataset, index=False)
    elif args and args[0] == "NPZ":
        args = [*args[1:], "--steps-per-day", "24"]
        dataset = bike
    try:
        code = train(tmp_path, "--dataset", str(dataset), *args)
    except SystemExit as error:  # argparse refuses a value of the wrong type before main runs
        code = error.code
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and "\n" not in error.split("usage:")[-1].strip(), (case, error)
    assert not (tmp_path / "run" / "run.json").exists()


README = Path(__file__).resolve().parent.parent / "README.md"
DEMAND_COMMAND = ('st-peft train --dataset NYCBike1.npz --steps-per-day 24 --start "2014-04-01 00:00" '
                  "--channels 0 1 --missing-value none --model stid --epochs 5 --batch-size 64 --output-dir runs/stid-bike")


def test_the_readme_demand_example_runs_and_shows_the_summary_and_the_verdict(tmp_path, monkeypatch, capsys):
    import shlex

    text = README.read_text()
    section = text[text.index("### Your own data"):text.index("### Choosing a method")]
    assert DEMAND_COMMAND in section.replace(" \\\n    ", " ")
    assert "verdict: stid beats last value" in section and "the model reads c0, c1; it forecasts" in section
    # the same command on three weeks of eight stations of the same file, one step
    with np.load(BUILTIN_ROOT / "nyc-bike" / "NYCBike1.npz") as archive:
        np.savez(tmp_path / "NYCBike1.npz", data=archive["data"][: 21 * 24, :8])
    monkeypatch.chdir(tmp_path)
    assert cli.main([*shlex.split(DEMAND_COMMAND)[1:], "--max-steps", "1", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "the model reads c0, c1; it forecasts and is scored on c0, c1" in printed
    assert "missing: nothing: zeros are real values; observed 100.0% of entries" in printed
    assert re.search(r"^verdict: stid (beats|loses to) ", printed, re.M)
