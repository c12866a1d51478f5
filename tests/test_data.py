"""The data layer on the built-in real data sets and the real graph files."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import st_peft.data as D
from st_peft.data.builtin import BUILTIN_ROOT
from st_peft.data.container import calendar_like

EXPECTED_SHAPES = {
    "los-loop": (2016, 207, 1),
    "sz-taxi": (2976, 156, 1),
    "nyc-taxi": (2880, 200, 2),
    "nyc-bike": (4392, 128, 2),
    "etth1": (17420, 7, 1),
    "chickenpox": (521, 20, 1),
}


@pytest.fixture(scope="module")
def sz_taxi() -> D.STData:
    return D.load("sz-taxi")


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_builtin_datasets_load_with_their_shapes(name):
    data = D.load(name)
    assert data.values.shape == EXPECTED_SHAPES[name]
    assert data.values.dtype == np.float32 and data.mask.dtype == bool
    assert np.isfinite(data.values).all()
    if data.adjacency is not None:
        assert data.adjacency.shape == (data.num_nodes, data.num_nodes)
        assert data.adjacency.flags.c_contiguous
    calendar = data.calendar()
    assert calendar.shape == (data.num_steps, 2)
    assert calendar[:, 0].max() < data.steps_per_day and calendar[:, 1].max() < 7


def test_sz_taxi_zeros_are_missing(sz_taxi):
    raw = np.load(BUILTIN_ROOT / "sz-taxi" / "SZ_taxi.npz")["data"]
    np.testing.assert_array_equal(sz_taxi.mask, np.abs(raw) > 1e-3)
    assert (~sz_taxi.mask & (raw != 0)).sum() == 184  # float residues such as 2.4e-17
    assert 0.2 < 1 - sz_taxi.mask.mean() < 0.3


def test_calendar_from_timestamps_matches_hand_computed(sz_taxi):
    # 2015-01-01 was a Thursday (day 3); 15-minute steps give 96 slots a day.
    calendar = sz_taxi.calendar()
    assert calendar[0].tolist() == [0, 3]
    assert calendar[4].tolist() == [4, 3]  # 01:00
    assert calendar[96].tolist() == [0, 4]  # Friday 00:00
    assert calendar[96 * 3 + 95].tolist() == [95, 6]  # Sunday 23:45


def test_calendar_from_steps_per_day_without_timestamps():
    data = D.STData(values=np.ones((10, 2, 1)), mask=np.ones((10, 2, 1), bool), steps_per_day=4, start_day_of_week=5)
    assert data.calendar()[:, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert data.calendar()[:, 1].tolist() == [5, 5, 5, 5, 6, 6, 6, 6, 0, 0]


def test_calendar_like_finds_clocks_and_leaves_readings_alone(sz_taxi):
    """Columns (T = 4 days of 4 steps): a time of day, a day of week, a reading, an on/off flag, and a time of
    day with one missing entry that differs; real sz-taxi speeds are never clocks."""
    steps = np.arange(16)
    time_of_day = (steps % 4) / 4
    reading = time_of_day.copy()
    reading[9] += 0.5
    gapped = time_of_day.copy()
    gapped[9] = 7.0
    values = np.stack([time_of_day, steps // 4 % 7, reading, steps % 2, gapped], axis=1)
    mask = np.ones_like(values, dtype=bool)
    mask[9, 4] = False
    # the day of week (0, 0, 0, 0, 1, ...) repeats neither daily nor, in four days, weekly
    assert calendar_like(values, mask, steps_per_day=4).tolist() == [True, False, False, False, True]
    weeks = np.tile(np.repeat(np.arange(7.0), 4), 2)[:, None]
    assert calendar_like(weeks, np.ones_like(weeks, dtype=bool), steps_per_day=4).tolist() == [True]
    assert not calendar_like(sz_taxi.values[..., 0], sz_taxi.mask[..., 0], sz_taxi.steps_per_day).any()


def test_hf_dataset_round_trip_is_exact(sz_taxi, tmp_path):
    import datasets

    dataset = sz_taxi.to_hf_dataset()
    assert len(dataset) == sz_taxi.num_steps
    dataset.save_to_disk(str(tmp_path / "ds"))
    back = D.STData.from_hf_dataset(datasets.load_from_disk(str(tmp_path / "ds")))
    np.testing.assert_array_equal(back.values, sz_taxi.values)
    np.testing.assert_array_equal(back.mask, sz_taxi.mask)
    np.testing.assert_array_equal(back.adjacency, sz_taxi.adjacency)
    np.testing.assert_array_equal(back.calendar(), sz_taxi.calendar())
    assert (back.name, back.steps_per_day, back.node_ids) == (sz_taxi.name, 96, sz_taxi.node_ids)


def test_ratio_splits_are_chronological_and_disjoint_in_targets(sz_taxi):
    splits = D.build_splits(sz_taxi, input_len=12, horizon=12, ratios=(0.7, 0.1, 0.2))
    train_end, val_end = round(2976 * 0.7), round(2976 * 0.7) + round(2976 * 0.1)
    train, val, test = (np.asarray(s["start"]) for s in (splits.train, splits.val, splits.test))
    assert train[-1] + 24 == train_end
    assert val[0] + 12 == train_end and val[-1] + 24 == val_end
    assert test[0] + 12 == val_end and test[-1] + 24 == 2976
    assert (len(train), len(val), len(test)) == (train_end - 23, val_end - train_end - 11, 2976 - val_end - 11)


def test_scaler_sees_only_the_training_span(sz_taxi):
    splits = D.build_splits(sz_taxi, ratios=(0.7, 0.1, 0.2))
    span = slice(0, round(2976 * 0.7))
    observed = sz_taxi.values[span][sz_taxi.mask[span]]
    assert splits.scaler.mean[0] == pytest.approx(observed.mean(), rel=1e-5)
    assert splits.scaler.std[0] == pytest.approx(observed.std(), rel=1e-5)
    changed = D.STData(values=sz_taxi.values.copy(), mask=sz_taxi.mask, steps_per_day=96)
    changed.values[round(2976 * 0.7):] += 100.0
    assert D.build_splits(changed).scaler.mean[0] == pytest.approx(splits.scaler.mean[0])


def test_collator_gathers_the_right_windows(sz_taxi):
    splits = D.build_splits(sz_taxi, input_len=12, horizon=6)
    rows = [splits.test[0], splits.test[5]]
    batch = splits.collator(rows)
    start = rows[1]["start"]
    # original units: the collator never scales, the model does
    np.testing.assert_array_equal(batch["past_values"][1].numpy(), sz_taxi.values[start : start + 12])
    np.testing.assert_array_equal(batch["future_values"][1].numpy(), sz_taxi.values[start + 12 : start + 18])
    np.testing.assert_array_equal(batch["future_observed_mask"][1].numpy(), sz_taxi.mask[start + 12 : start + 18])
    np.testing.assert_array_equal(batch["past_observed_mask"][1].numpy(), sz_taxi.mask[start : start + 12])
    np.testing.assert_array_equal(batch["past_time_features"][1].numpy(), sz_taxi.calendar()[start : start + 12])
    np.testing.assert_array_equal(batch["future_time_features"][1].numpy(), sz_taxi.calendar()[start + 12 : start + 18])
    assert batch["past_values"].dtype == torch.float32 and batch["past_time_features"].dtype == torch.int64
    assert batch["past_values"].shape == (2, 12, 156, 1) and batch["future_values"].shape == (2, 6, 156, 1)
    assert sorted(batch) == sorted(["past_values", "past_observed_mask", "past_time_features", "future_values",
                                    "future_observed_mask", "future_time_features"])


def test_collator_says_to_keep_the_start_column(sz_taxi):
    splits = D.build_splits(sz_taxi, input_len=12, horizon=6)
    with pytest.raises(D.DataError, match="remove_unused_columns=False"):
        splits.collator([{}, {}])


def test_model_kwargs_carry_the_training_span_statistics_per_node_and_channel():
    data = D.load("nyc-bike")
    splits = D.build_splits(data, input_channels=[0, 1], target_channels=[1])
    scaling = splits.model_kwargs()["scaling"]
    assert np.shape(scaling["past_loc"]) == (128, 2) and np.shape(scaling["future_scale"]) == (128, 1)
    np.testing.assert_allclose(scaling["past_loc"][5], splits.scaler.mean[[0, 1]], rtol=1e-6)
    np.testing.assert_allclose(scaling["future_loc"][7], splits.scaler.mean[[1]], rtol=1e-6)
    np.testing.assert_allclose(scaling["future_scale"][0], splits.scaler.std[[1]], rtol=1e-6)


def test_collator_batches_are_writable_copies_and_survive_pickling(sz_taxi):
    splits = D.build_splits(sz_taxi, input_len=12, horizon=6)
    last = len(sz_taxi.values) - 18
    batch = splits.collator.gather(np.array([0, last]))
    before = batch["past_values"].clone()
    batch["past_values"] += 1.0
    assert splits.collator.gather(np.array([0, last]))["past_values"].equal(before)
    copied = pickle.loads(pickle.dumps(splits.collator))
    for key, value in copied.gather(np.array([3, last])).items():
        assert value.equal(splits.collator.gather(np.array([3, last]))[key]), key


def test_collator_refuses_starts_outside_the_series(sz_taxi):
    splits = D.build_splits(sz_taxi, input_len=12, horizon=6)
    with pytest.raises(D.DataError, match="window starts must lie in"):
        splits.collator.gather(np.array([len(sz_taxi.values) - 17]))
    with pytest.raises(D.DataError, match="got -1"):
        splits.collator.gather(np.array([-1, 0]))


def test_few_shot_keeps_the_most_recent_fraction(sz_taxi):
    full = D.build_splits(sz_taxi)
    few = D.build_splits(sz_taxi, few_shot=0.1)
    assert len(few.train) == int(np.ceil(0.1 * len(full.train)))
    assert few.train["start"][-1] == full.train["start"][-1]
    assert few.test["start"] == full.test["start"]


def test_channels_select_inputs_and_targets():
    data = D.load("nyc-bike")
    splits = D.build_splits(data, input_channels=[0, 1], target_channels=[1])
    batch = next(splits.iter_batches("val", 8))
    assert batch["past_values"].shape[-1] == 2 and batch["future_values"].shape[-1] == 1
    assert splits.size_kwargs() == {"num_nodes": 128, "input_len": 12, "horizon": 12, "in_channels": 2, "out_channels": 1}
    with pytest.raises(D.DataError, match="out of range"):
        D.build_splits(data, target_channels=[2])


def test_index_file_split(tmp_path):
    data = D.load("los-loop")
    with np.load(BUILTIN_ROOT / "split-index" / "METRLA_index.npz") as real:
        rows = real["train"][:1000]
    np.savez(tmp_path / "index.npz", train=rows[:700], val=rows[700:800], test=rows[800:])
    splits = D.build_splits(data, index_file=tmp_path / "index.npz")
    np.testing.assert_array_equal(splits.train["start"], rows[:700, 0])
    np.testing.assert_array_equal(splits.test["start"], rows[800:, 0])
    with pytest.raises(D.DataError, match="not 12 in and 6 out"):
        D.build_splits(data, horizon=6, index_file=tmp_path / "index.npz")


def test_window_longer_than_the_series_is_refused():
    with pytest.raises(D.DataError, match=r"window of 400 \+ 12 steps does not fit"):
        D.build_splits(D.load("chickenpox"), input_len=400)


def test_dcrnn_pickle_reads_the_real_metr_la_graph():
    sensor_ids, adjacency = D.read_dcrnn_pickle(BUILTIN_ROOT / "metr-la-graph" / "adj_mx.pkl")
    assert adjacency.shape == (207, 207) and sensor_ids[:2] == ["773869", "767541"]
    los_ids = pd.read_csv(BUILTIN_ROOT / "los-loop" / "los_speed.csv", nrows=0).columns.tolist()
    assert los_ids == sensor_ids


class _Exploit:
    def __reduce__(self):
        return (sys.exit, ("pickle code ran",))


def test_pickle_holding_code_is_refused_and_never_run(tmp_path):
    path = tmp_path / "adj_mx.pkl"
    path.write_bytes(pickle.dumps([["a"], {"a": 0}, _Exploit()]))
    with pytest.raises(D.DataError, match="refused to unpickle 'sys.exit'"):
        D.read_dcrnn_pickle(path)


def test_corrupt_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "adj_mx.pkl"
    path.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(D.DataError, match="corrupt pickle"):
        D.load_plain_pickle(path)


def test_edge_lists_of_pems_graphs():
    adjacency = D.read_edge_list(BUILTIN_ROOT / "pems-graphs" / "PEMS08.csv", num_nodes=170)
    assert adjacency.shape == (170, 170)
    edges = pd.read_csv(BUILTIN_ROOT / "pems-graphs" / "PEMS08.csv")
    pairs = {frozenset(pair) for pair in zip(edges["from"], edges["to"], strict=True)}
    assert (adjacency == adjacency.T).all() and int(adjacency.sum()) == 2 * len(pairs)
    ids = (BUILTIN_ROOT / "pems-graphs" / "PEMS03.txt").read_text().split()
    by_id = D.read_edge_list(BUILTIN_ROOT / "pems-graphs" / "PEMS03.csv", node_ids=ids, weight="gaussian")
    assert by_id.shape == (358, 358) and 0 < by_id.max() <= 1
    with pytest.raises(D.DataError, match="node index"):
        D.read_edge_list(BUILTIN_ROOT / "pems-graphs" / "PEMS08.csv", num_nodes=100)


def test_user_npz_h5_and_csv_files(tmp_path, sz_taxi):
    values = sz_taxi.values[:300, :5]
    np.savez(tmp_path / "pems.npz", data=values)
    np.savetxt(tmp_path / "adj.csv", sz_taxi.adjacency[:5, :5], delimiter=",")
    data = D.load(tmp_path / "pems.npz", steps_per_day=96, adjacency=tmp_path / "adj.csv")
    np.testing.assert_array_equal(data.values, values)
    np.testing.assert_array_equal(data.mask, values != 0)
    assert data.adjacency.shape == (5, 5)

    index = pd.date_range("2015-01-01", periods=300, freq="15min")
    frame = pd.DataFrame(values[..., 0], index=index, columns=[f"s{i}" for i in range(5)])
    frame.to_hdf(tmp_path / "speed.h5", key="df")
    from_h5 = D.load(tmp_path / "speed.h5")
    assert from_h5.steps_per_day == 96 and from_h5.node_ids == list(frame.columns)
    np.testing.assert_array_equal(from_h5.values[..., 0], values[..., 0])

    frame.index.name = "date"
    frame.iloc[3, 2] = np.nan
    frame.to_csv(tmp_path / "wide.csv")
    from_csv = D.load(tmp_path / "wide.csv", missing_value=0.0)
    assert not from_csv.mask[3, 2, 0] and from_csv.values[3, 2, 0] == 0.0
    np.testing.assert_array_equal(from_csv.calendar(), sz_taxi.calendar()[:300])


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(D.DataError, match="neither a built-in data set"):
        D.load(tmp_path / "missing.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(D.DataError, match="corrupt npz"):
        D.load(tmp_path / "broken.npz", steps_per_day=288)
    np.savez(tmp_path / "nan.npz", data=np.array([[[1.0]], [[np.nan]]]))
    with pytest.raises(D.DataError, match="NaN"):
        D.load(tmp_path / "nan.npz", steps_per_day=288)
    pd.DataFrame({"date": ["2020-01-01", "2020-01-02"], "a": [1.0, np.inf]}).to_csv(tmp_path / "inf.csv", index=False)
    with pytest.raises(D.DataError, match="inf"):
        D.load(tmp_path / "inf.csv")
    with pytest.raises(D.DataError, match="adjacency is"):
        D.STData(values=np.ones((4, 3, 1)), mask=np.ones((4, 3, 1), bool), steps_per_day=1, adjacency=np.eye(2))
