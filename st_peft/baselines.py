"""Forecasts that need no training: last value and seasonal naive, on the windows of a split."""

from __future__ import annotations

import math

import numpy as np

from st_peft.data.errors import DataError
from st_peft.data.windows import ForecastingSplits
from st_peft.metrics import horizon_metrics


def split_starts(splits: ForecastingSplits, split: str) -> np.ndarray:
    """Window starts ``(W,)`` of a split, in order."""
    return np.asarray(splits.split(split)["start"], dtype=np.int64)


def split_targets(splits: ForecastingSplits, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Targets and their mask of every window of a split.

    Returns:
        The targets float32 ``(W, H, N, C_out)`` in original units (``future_values`` of every window)
        and their observed mask, bool of the same shape (``future_observed_mask``).
    """
    future = split_starts(splits, split)[:, None] + splits.input_len + np.arange(splits.horizon)
    return splits.collator.targets[future], splits.collator.target_mask[future]


def last_value_forecast(splits: ForecastingSplits, split: str = "test") -> np.ndarray:
    """Repeat the last step of each history over the horizon.

    Returns:
        float32 ``(W, H, N, C_out)`` in original units.
    """
    last = split_starts(splits, split) + splits.input_len - 1
    values = splits.collator.targets[last]
    return np.repeat(values[:, None], splits.horizon, axis=1)


def default_season(splits: ForecastingSplits, split: str = "test") -> int:
    """The first of one week, one day or (for daily or coarser data) one year of steps that
    covers the horizon and that every window of the split has as history before it."""
    seasons = [7 * splits.steps_per_day, splits.steps_per_day]
    stamps = splits.data.timestamps
    if splits.steps_per_day == 1 and stamps is not None and len(stamps) > 1:
        step_days = (stamps[1] - stamps[0]) / np.timedelta64(1, "D")
        seasons.append(round(365.25 / step_days))
    first_target = int(split_starts(splits, split)[0]) + splits.input_len
    for period in seasons:
        if splits.horizon <= period <= first_target:
            return period
    raise DataError(f"no season in {seasons} steps covers the horizon and fits the history of '{split}'")


def seasonal_naive_forecast(splits: ForecastingSplits, split: str = "test", period: int | None = None) -> np.ndarray:
    """Forecast each future step by the value one season earlier.

    Args:
        splits: the data's splits.
        split: which split's windows to forecast.
        period: season length in steps (default :func:`default_season`); it must be at least
            the horizon, so the values it copies are known when the forecast is made.

    Returns:
        float32 ``(W, H, N, C_out)`` in original units.
    """
    period = period or default_season(splits, split)
    if period < splits.horizon:
        raise DataError(f"a season of {period} steps is shorter than the horizon of {splits.horizon} steps")
    future = split_starts(splits, split)[:, None] + splits.input_len + np.arange(splits.horizon)
    if future.min() - period < 0:
        raise DataError(f"the first window of '{split}' has less than one season ({period} steps) of history")
    return splits.collator.targets[future - period]


def seasonal_period(splits: ForecastingSplits) -> int | None:
    """The season the reports use: the data's day, or its week where that scores a lower MAE on validation.

    Daily or coarser data also tries a year. A candidate must cover the horizon and fit the
    history of the first validation window (and so of every later one); without one, None.
    """
    day = splits.steps_per_day
    candidates = [day, 7 * day]
    stamps = splits.data.timestamps
    if day == 1 and stamps is not None and len(stamps) > 1:
        candidates.append(round(365.25 / ((stamps[1] - stamps[0]) / np.timedelta64(1, "D"))))
    first_target = int(split_starts(splits, "val")[0]) + splits.input_len
    fitting = [period for period in candidates if splits.horizon <= period <= first_target]
    if len(fitting) < 2:
        return fitting[0] if fitting else None
    target, mask = split_targets(splits, "val")
    weight = mask.sum()

    def val_mae(period: int) -> float:
        error = np.abs(seasonal_naive_forecast(splits, "val", period) - target)
        return float((error * mask).sum() / weight) if weight else np.inf

    # the first of equal scores wins: the day, the shorter and more recent season
    return min(fitting, key=val_mae)


def baseline_metrics(
    splits: ForecastingSplits, split: str = "test", horizons: tuple[int, ...] = (3, 6, 12),
    period: int | None = None,
) -> dict[str, dict[str, float]]:
    """Masked metrics of the last-value and seasonal-naive forecasts on a split.

    A metric with no observed target to score is NaN with a warning, as in
    :func:`~st_peft.metrics.horizon_metrics`, never 0.0.

    Args:
        splits: the data's splits.
        split: which split's windows to score.
        horizons: the 1-based steps reported.
        period: the seasonal-naive season in steps (default :func:`seasonal_period`).

    Returns:
        ``{"last value": {...}, "seasonal naive": {...}}`` with :func:`~st_peft.metrics.horizon_metrics`
        keys; without a season that fits the data, only ``"last value"``.
    """
    target, mask = split_targets(splits, split)
    period = period or seasonal_period(splits)
    forecasts = {"last value": last_value_forecast(splits, split)}
    if period is not None:
        forecasts["seasonal naive"] = seasonal_naive_forecast(splits, split, period)
    return {name: horizon_metrics(forecast, target, mask, horizons=horizons) for name, forecast in forecasts.items()}


def verdict(name: str, mae: float, baselines: dict[str, dict[str, float]]) -> str:
    """One line: whether the forecaster ``name``, of mean MAE ``mae``, beats each baseline of
    :func:`baseline_metrics`, e.g. ``stid beats last value (MAE 2.1 vs 2.9) but loses to seasonal naive
    (MAE 2.1 vs 1.8)``."""
    if not math.isfinite(mae):
        return f"{name} has no observed target to score here, so nothing beats or loses"
    beaten = [f"{baseline} (MAE {mae:.4g} vs {scores['mae']:.4g})" for baseline, scores in baselines.items()
              if mae < scores["mae"]]
    lost = [f"{baseline} (MAE {mae:.4g} vs {scores['mae']:.4g})" for baseline, scores in baselines.items()
            if not mae < scores["mae"]]
    if not lost:
        return f"{name} beats {' and '.join(beaten)}"
    if not beaten:
        return f"{name} loses to {' and '.join(lost)}: it is no better than a forecast without training"
    return f"{name} beats {' and '.join(beaten)} but loses to {' and '.join(lost)}"


def with_baselines(metrics: dict[str, float], splits: ForecastingSplits, split: str, name: str,
                   horizons: tuple[int, ...]) -> dict:
    """``metrics`` of the forecaster ``name`` on ``split``, with the baselines scored on the same windows and
    mask beside them and the :func:`verdict`: what a run's ``metrics.json`` holds.

    Returns:
        ``metrics`` plus ``"baselines"`` (``{"season_steps": ..., "last value": {...}, "seasonal naive": {...}}``)
        and ``"verdict"`` (one line).
    """
    period = seasonal_period(splits)
    baselines = baseline_metrics(splits, split, horizons, period)
    if "loss" in metrics and not math.isfinite(metrics["mae"]):
        # nothing observed to score: the masked loss is an empty mean, reported as 0.0, not a score
        metrics = {**metrics, "loss": math.nan}
    return {**metrics, "baselines": {"season_steps": period, **baselines},
            "verdict": verdict(name, metrics["mae"], baselines)}
