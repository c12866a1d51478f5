"""Bad data is refused at load time, naming the first offending value (issue 14, items 5 and 7-11),
and ``load()`` opens a user's own data the way the command line needs it (issue 13)."""

from __future__ import annotations

import shutil

import datasets
import numpy as np
import pandas as pd
import pytest

import st_peft.data as D
from st_peft.data.builtin import BUILTIN_ROOT

ETTH1 = BUILTIN_ROOT / "ett" / "ETTh1.csv"


@pytest.fixture(scope="module")
def sz_taxi() -> D.STData:
    return D.load("sz-taxi")


@pytest.fixture
def etth1_rows() -> pd.DataFrame:
    """The first 400 hours of the real ETTh1 file."""
    return pd.read_csv(ETTH1, nrows=400)


# ---- values that overflow float32 (item 5) -----------------------------------------------


def test_value_beyond_float32_is_refused_naming_node_and_step(tmp_path, sz_taxi):
    values = sz_taxi.values[:300, :5].astype(np.float64)
    values[123, 4, 0] = 1e39  # finite in float64, inf in float32
    np.savez(tmp_path / "speed.npz", data=values)
    with pytest.raises(D.DataError, match=r"value 1e\+39 at step 123, node '4', channel 'c0' overflows float32"):
        D.load(tmp_path / "speed.npz", steps_per_day=96)


def test_value_beyond_float32_in_a_dated_csv_names_the_time(tmp_path, etth1_rows):
    etth1_rows.loc[57, "OT"] = -3e40
    etth1_rows.to_csv(tmp_path / "ett.csv", index=False)
    with pytest.raises(D.DataError, match=r"step 57 \(2016-07-03T09:00.*\), node 'OT'.* overflows float32"):
        D.load(tmp_path / "ett.csv")


def test_large_but_representable_values_still_load(tmp_path, sz_taxi):
    values = sz_taxi.values[:300, :5].astype(np.float64) * 1e30
    np.savez(tmp_path / "speed.npz", data=values)
    assert np.isfinite(D.load(tmp_path / "speed.npz", steps_per_day=96).values).all()


# ---- timestamps (item 7) -----------------------------------------------------------------


def test_timestamps_that_go_backwards_are_refused_naming_the_index(tmp_path, etth1_rows):
    swapped = etth1_rows.copy()
    swapped.iloc[[200, 201]] = etth1_rows.iloc[[201, 200]].to_numpy()
    swapped.to_csv(tmp_path / "ett.csv", index=False)
    with pytest.raises(D.DataError, match=r"timestamp 201 \(2016-07-09T08:00.*\) goes back from timestamp 200"):
        D.load(tmp_path / "ett.csv")


def test_repeated_timestamps_are_refused_naming_the_index(tmp_path, etth1_rows):
    repeated = pd.concat([etth1_rows.iloc[:100], etth1_rows.iloc[99:]])
    repeated.to_csv(tmp_path / "ett.csv", index=False)
    with pytest.raises(D.DataError, match=r"timestamp 100 \(2016-07-05T03:00.*\) repeats timestamp 99"):
        D.load(tmp_path / "ett.csv")


def test_a_gap_is_refused_with_the_fix(tmp_path, etth1_rows):
    # three days missing: windows would span them as if the steps were consecutive
    gapped = pd.concat([etth1_rows.iloc[:150], etth1_rows.iloc[222:]])
    gapped.to_csv(tmp_path / "ett.csv", index=False)
    with pytest.raises(D.DataError, match=r"a gap of 3 days 01:00:00 before timestamp 150 .*frame\.asfreq\('h'\)"):
        D.load(tmp_path / "ett.csv")
    with pytest.raises(D.DataError, match="a gap of 3 days"):
        D.STData(values=np.ones((len(gapped), 1, 1)), mask=np.ones((len(gapped), 1, 1), bool), steps_per_day=24,
                 timestamps=pd.to_datetime(gapped["date"]).to_numpy())


def test_the_fix_for_a_gap_loads_with_the_missing_steps_masked(tmp_path, etth1_rows):
    gapped = pd.concat([etth1_rows.iloc[:150], etth1_rows.iloc[222:]])
    filled = gapped.set_index(pd.to_datetime(gapped.pop("date"))).asfreq("h")
    filled.index.name = "date"
    filled.to_csv(tmp_path / "ett.csv")
    data = D.load(tmp_path / "ett.csv")
    assert data.num_steps == 400 and not data.mask[150:222].any() and data.mask[:150].all()


def test_monthly_data_is_not_a_gap():
    stamps = pd.date_range("2020-01-01", periods=24, freq="MS").to_numpy()
    data = D.STData(values=np.ones((24, 2, 1)), mask=np.ones((24, 2, 1), bool), steps_per_day=1, timestamps=stamps)
    assert data.num_steps == 24


# ---- steps_per_day (item 10) -------------------------------------------------------------


@pytest.mark.parametrize("steps_per_day", [2.5, 100000, 0, -96, True, "96"])
def test_steps_per_day_that_is_not_a_whole_number_of_steps_in_a_day_is_refused(tmp_path, sz_taxi, steps_per_day):
    np.savez(tmp_path / "speed.npz", data=sz_taxi.values[:100, :3])
    message = rf"steps_per_day must be a whole number of steps in a day, from 1 .* to 86400 .*got {steps_per_day!r}.*--steps-per-day"
    with pytest.raises(D.DataError, match=message):
        D.load(tmp_path / "speed.npz", steps_per_day=steps_per_day)
    with pytest.raises(D.DataError, match="steps_per_day must be a whole number"):
        D.STData(values=sz_taxi.values[:100, :3], mask=sz_taxi.mask[:100, :3], steps_per_day=steps_per_day)


def test_steps_per_day_at_the_limits_loads(tmp_path, sz_taxi):
    np.savez(tmp_path / "speed.npz", data=sz_taxi.values[:100, :3])
    assert D.load(tmp_path / "speed.npz", steps_per_day=86400).steps_per_day == 86400
    assert D.load(tmp_path / "speed.npz", steps_per_day=96.0).steps_per_day == 96


# ---- index files (items 9 and 11) --------------------------------------------------------


@pytest.fixture
def real_index_rows() -> np.ndarray:
    """The first 1000 windows of STAEformer's real METR-LA index (12 in, 12 out, consecutive starts)."""
    with np.load(BUILTIN_ROOT / "split-index" / "METRLA_index.npz") as index:
        return index["train"][:1000]


def _index(tmp_path, train, val, test):
    np.savez(tmp_path / "index.npz", train=train, val=val, test=test)
    return tmp_path / "index.npz"


def test_index_with_test_windows_before_training_is_refused(tmp_path, real_index_rows):
    rows = real_index_rows
    path = _index(tmp_path, train=rows[300:1000], val=rows[200:300], test=rows[:200])
    with pytest.raises(D.DataError, match=r"'val' window 0 starts at step 200, not after the last 'train' window \(step 999\)"):
        D.build_splits(D.load("los-loop"), index_file=path)


def test_index_with_overlapping_splits_is_refused(tmp_path, real_index_rows):
    rows = real_index_rows
    path = _index(tmp_path, train=rows[:700], val=rows[700:800], test=rows[750:])
    with pytest.raises(D.DataError, match=r"'test' window 0 starts at step 750, not after the last 'val' window \(step 799\)"):
        D.build_splits(D.load("los-loop"), index_file=path)


def test_index_with_windows_out_of_order_within_a_split_is_refused(tmp_path, real_index_rows):
    rows = real_index_rows
    train = rows[:700].copy()
    train[[10, 11]] = train[[11, 10]]
    path = _index(tmp_path, train=train, val=rows[700:800], test=rows[800:])
    with pytest.raises(D.DataError, match=r"'train' window 11 starts at step 10, not after window 10 \(step 11\)"):
        D.build_splits(D.load("los-loop"), index_file=path)


def test_index_with_a_negative_start_names_it(tmp_path, real_index_rows):
    # the message was "windows reach step 19 of a 2016-step series"
    rows = real_index_rows
    train = rows[:700] - 5
    path = _index(tmp_path, train=train, val=rows[700:800], test=rows[800:])
    with pytest.raises(D.DataError, match=r"'train' window 0 starts at step -5; starts must be >= 0"):
        D.build_splits(D.load("los-loop"), index_file=path)


def test_index_beyond_the_series_names_the_window(tmp_path, real_index_rows):
    rows = real_index_rows
    path = _index(tmp_path, train=rows[:700], val=rows[700:800], test=rows[800:] + 1000)
    with pytest.raises(D.DataError, match=r"'test' window 193 ends at step 2017, beyond the 2016-step series"):
        D.build_splits(D.load("los-loop"), index_file=path)


def test_index_of_floats_is_refused(tmp_path, real_index_rows):
    rows = real_index_rows
    path = _index(tmp_path, train=rows[:700] + 0.5, val=rows[700:800], test=rows[800:])
    with pytest.raises(D.DataError, match="'train' holds float64 values; window steps must be integers"):
        D.build_splits(D.load("los-loop"), index_file=path)


# ---- load() of a user's own data (issue 13) ----------------------------------------------


def test_npz_needs_steps_per_day_and_says_how(tmp_path, sz_taxi):
    np.savez(tmp_path / "speed.npz", data=sz_taxi.values[:100, :3])
    with pytest.raises(D.DataError, match=r"pass steps_per_day=\.\.\. .*--steps-per-day 288"):
        D.load(tmp_path / "speed.npz")


def test_npz_with_start_gets_the_real_calendar(tmp_path, sz_taxi):
    np.savez(tmp_path / "speed.npz", data=sz_taxi.values)
    data = D.load(tmp_path / "speed.npz", steps_per_day=96, start="2015-01-01 00:00")
    np.testing.assert_array_equal(data.timestamps, sz_taxi.timestamps)
    np.testing.assert_array_equal(data.calendar(), sz_taxi.calendar())
    from datetime import datetime

    again = D.load(tmp_path / "speed.npz", steps_per_day=96, start=datetime(2015, 1, 1))
    np.testing.assert_array_equal(again.timestamps, sz_taxi.timestamps)
    with pytest.raises(D.DataError, match="start 'soon' is not a date and time"):
        D.load(tmp_path / "speed.npz", steps_per_day=96, start="soon")


def test_start_for_data_with_timestamps_is_refused(tmp_path):
    shutil.copy(ETTH1, tmp_path / "ett.csv")
    with pytest.raises(D.DataError, match="has its own timestamps; drop start"):
        D.load(tmp_path / "ett.csv", start="2020-01-01")


def test_saved_datasets_folder_loads_whole(tmp_path, sz_taxi):
    sz_taxi.to_hf_dataset().save_to_disk(str(tmp_path / "sz"))
    back = D.load(tmp_path / "sz")
    np.testing.assert_array_equal(back.values, sz_taxi.values)
    np.testing.assert_array_equal(back.mask, sz_taxi.mask)
    np.testing.assert_array_equal(back.adjacency, sz_taxi.adjacency)
    np.testing.assert_array_equal(back.calendar(), sz_taxi.calendar())
    assert (back.name, back.steps_per_day, back.node_ids) == ("sz-taxi", 96, sz_taxi.node_ids)
    shutil.copy(BUILTIN_ROOT / "sz-taxi" / "sz_adj.csv", tmp_path / "adj.csv")
    rewired = D.load(tmp_path / "sz", adjacency=np.eye(156, dtype=np.float32))
    np.testing.assert_array_equal(rewired.adjacency, np.eye(156))


def test_pushed_parquet_folder_loads_with_steps_per_day_from_timestamps(tmp_path, sz_taxi, monkeypatch):
    # Dataset.push_to_hub writes parquet files and drops st-peft's metadata
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    small = sz_taxi.select_nodes(np.arange(4))
    (tmp_path / "repo" / "data").mkdir(parents=True)
    small.to_hf_dataset().to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    back = D.load(tmp_path / "repo")
    assert (back.name, back.steps_per_day, back.adjacency) == ("repo", 96, None)
    np.testing.assert_array_equal(back.values, small.values)
    np.testing.assert_array_equal(back.calendar(), small.calendar())


def test_unknown_names_and_formats_are_one_clear_line(tmp_path):
    with pytest.raises(D.DataError, match="neither a built-in data set .* nor a Hub dataset id"):
        D.load(tmp_path / "missing.npz")
    (tmp_path / "data.parquet").write_bytes(b"")
    with pytest.raises(D.DataError, match=r"unknown format '\.parquet'"):
        D.load(tmp_path / "data.parquet")
    with pytest.raises(D.DataError, match=r"built-in data set 'sz-taxi' takes no options, got \['steps_per_day'\]"):
        D.load("sz-taxi", steps_per_day=96)
