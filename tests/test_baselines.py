"""Naive forecasts on real data, checked against values read straight from the series."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from st_peft.baselines import (
    baseline_metrics,
    default_season,
    last_value_forecast,
    seasonal_naive_forecast,
    seasonal_period,
    split_targets,
)
from st_peft.data import DataError, build_splits, load


@pytest.fixture(scope="module")
def taxi_splits():
    return build_splits(load("nyc-taxi"), input_len=12, horizon=12)


def test_last_value_repeats_the_last_history_step(taxi_splits):
    forecast = last_value_forecast(taxi_splits, "test")
    start = taxi_splits.test["start"][7]
    values = taxi_splits.data.values
    assert forecast.shape == (len(taxi_splits.test), 12, 200, 2)
    for step in (0, 11):
        np.testing.assert_array_equal(forecast[7, step], values[start + 11])


def test_seasonal_naive_copies_one_week_earlier(taxi_splits):
    assert default_season(taxi_splits) == 7 * 48
    forecast = seasonal_naive_forecast(taxi_splits, "test")
    start = taxi_splits.test["start"][3]
    np.testing.assert_array_equal(forecast[3, 5], taxi_splits.data.values[start + 12 + 5 - 336])
    y, mask = split_targets(taxi_splits, "test")
    np.testing.assert_array_equal(y[3, 5], taxi_splits.data.values[start + 17])
    assert mask.all()


def test_default_season_falls_back_to_a_day_or_a_year():
    assert default_season(build_splits(load("los-loop"))) == 288
    assert default_season(build_splits(load("chickenpox"))) == 52


def test_season_shorter_than_the_horizon_is_refused(taxi_splits):
    with pytest.raises(DataError, match="season of 6 steps is shorter than the horizon of 12"):
        seasonal_naive_forecast(taxi_splits, period=6)


def test_baseline_metrics_match_a_hand_computed_mae(taxi_splits):
    metrics = baseline_metrics(taxi_splits, "val")
    y, _ = split_targets(taxi_splits, "val")
    expected = np.abs(last_value_forecast(taxi_splits, "val") - y).mean()
    assert metrics["last value"]["mae"] == pytest.approx(expected, rel=1e-6)
    assert metrics["seasonal naive"]["mae"] < metrics["last value"]["mae"]


def test_a_test_span_with_no_observed_target_scores_nan_not_zero():
    # issue 14 (6): seasonal naive and last value scored a perfect 0.0 on an all-masked test span
    data = load("sz-taxi")
    test_steps = slice(round(data.num_steps * 0.8), None)
    mask = data.mask.copy()
    mask[test_steps] = False
    splits = build_splits(dataclasses.replace(data, mask=mask), input_len=12, horizon=12)
    with pytest.warns(RuntimeWarning, match="no observed target to score mae@3"):
        metrics = baseline_metrics(splits, "test")
    for name in ("last value", "seasonal naive"):
        assert all(math.isnan(value) for value in metrics[name].values()), name
    assert all(math.isfinite(value) for value in baseline_metrics(splits, "val")["last value"].values())


@pytest.mark.parametrize(("name", "period"), [("nyc-bike", 7 * 24), ("sz-taxi", 96)])
def test_the_reported_season_is_the_week_only_where_it_is_better_on_validation(name, period):
    splits = build_splits(load(name), input_len=12, horizon=12)
    assert seasonal_period(splits) == period
    day, week = (baseline_metrics(splits, "val", (3,), p)["seasonal naive"]["mae"]
                 for p in (splits.steps_per_day, 7 * splits.steps_per_day))
    assert (week < day) == (period == 7 * splits.steps_per_day)


def test_without_a_season_that_fits_only_last_value_is_scored():
    splits = build_splits(load("los-loop"), input_len=12, horizon=12)  # one week: no week of history
    short = build_splits(dataclasses.replace(splits.data, values=splits.data.values[:400],
                                             mask=splits.data.mask[:400], timestamps=None), input_len=12, horizon=12)
    assert seasonal_period(splits) == 288 and seasonal_period(short) is None
    assert list(baseline_metrics(short, "test")) == ["last value"]
