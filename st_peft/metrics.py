"""Masked forecasting metrics: MAE, RMSE, MAPE, WAPE per horizon, pinball loss and CRPS.

Every function takes torch tensors or numpy arrays laid out ``(B, H, N, C)`` (any layout
works for the point metrics as long as ``pred`` and ``target`` match; ``horizon_metrics``
reads the horizon from axis 1). Torch inputs give a 0-dim tensor that keeps its graph,
so the same functions serve as training losses; numpy inputs give a Python float.

Which entries count:
    * ``mask`` (bool, True = observed) when given; it overrides ``null_value``.
    * otherwise every entry whose target differs from ``null_value`` (``0.0`` by
      default, or ``float("nan")`` to drop NaN targets).
    * non-finite targets never count, whatever the mask says: a NaN target means
      "missing" in every data set this project reads.

Two conventions for a slice with no counted entry: the point metrics give 0, never NaN, so
that as training losses an all-masked batch adds nothing and stays finite;
:func:`horizon_metrics`, the evaluation report, gives NaN with a warning, since 0 would read
as a perfect score. MAPE and WAPE are in percent, the way
BasicTS and the papers report them (``9.32`` means 9.32 %). MAPE also skips entries
whose target is within ``MAPE_ZERO_TOLERANCE`` (5e-5, the BasicTS tolerance) of 0: the
relative error is undefined there, and real files store some zeros as 1e-17 residues.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray
MAPE_ZERO_TOLERANCE = 5e-5


def _as_tensor(value: ArrayLike | None) -> torch.Tensor | None:
    """Wrap numpy arrays as float64 tensors (no copy); leave tensors alone."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype == np.bool_:
        return torch.from_numpy(array)
    return torch.from_numpy(array.astype(np.float64, copy=False))


def _output(value: torch.Tensor, numpy_in: bool) -> torch.Tensor | float:
    return float(value) if numpy_in else value


def _check_shapes(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}")
    if mask is not None and mask.shape != target.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but target has shape {tuple(target.shape)}")


def valid_mask(target: ArrayLike, mask: ArrayLike | None = None, null_value: float = 0.0) -> torch.Tensor:
    """Return the bool tensor of entries that count, shaped like ``target``.

    Args:
        target: ground truth ``(B, H, N, C)``.
        mask: bool ``(B, H, N, C)``, True = observed; overrides ``null_value``.
        null_value: the value that marks a missing target when ``mask`` is None (0.0 or NaN).
    """
    target_t = _as_tensor(target)
    finite = torch.isfinite(target_t)
    if mask is not None:
        return _as_tensor(mask).to(torch.bool) & finite
    if math.isnan(null_value):
        return finite
    return finite & (target_t != null_value)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # torch.where instead of multiplying by the mask: pred may be NaN or inf at masked
    # entries, and 0 * inf would leak NaN into the mean.
    total = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    count = valid.sum()
    return total / count.clamp(min=1)


def _prepare(
    pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None, null_value: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    numpy_in = not isinstance(pred, torch.Tensor)
    pred_t, target_t, mask_t = _as_tensor(pred), _as_tensor(target), _as_tensor(mask)
    _check_shapes(pred_t, target_t, mask_t)
    valid = valid_mask(target_t, mask_t, null_value)
    # zero out missing targets so that arithmetic on them stays finite
    target_t = torch.where(valid, target_t, torch.zeros((), dtype=target_t.dtype, device=target_t.device))
    return pred_t, target_t, valid, numpy_in


def _absolute_error(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _masked_mean((pred - target).abs(), valid), valid.any()


def _squared_error(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _masked_mean((pred - target) ** 2, valid), valid.any()


def _root_squared_error(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    mean, counted = _squared_error(pred, target, valid)
    return mean.sqrt(), counted


def _percentage_error(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    valid = valid & (target.abs() > MAPE_ZERO_TOLERANCE)
    safe_target = torch.where(valid, target, torch.ones((), dtype=target.dtype, device=target.device))
    return 100.0 * _masked_mean(((pred - target) / safe_target).abs(), valid), valid.any()


def _weighted_percentage_error(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
    error = torch.where(valid, (pred - target).abs(), zero).sum()
    scale = target.abs().sum()
    wape = torch.where(scale > 0, 100.0 * error / scale.clamp(min=torch.finfo(scale.dtype).tiny), zero)
    return wape, scale > 0


# Each takes ``pred``, ``target`` (0 where not counted) and ``valid`` and returns the value
# (0 when nothing counts) and whether anything counted.
_SCORES = {
    "mae": _absolute_error,
    "rmse": _root_squared_error,
    "mape": _percentage_error,
    "wape": _weighted_percentage_error,
}


def _point_metric(score, pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None, null_value: float):
    pred_t, target_t, valid, numpy_in = _prepare(pred, target, mask, null_value)
    value, _ = score(pred_t, target_t, valid)
    return _output(value, numpy_in)


def masked_mae(
    pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None, null_value: float = 0.0
) -> torch.Tensor | float:
    """Mean absolute error over observed entries of ``(B, H, N, C)`` inputs (0 when none is observed)."""
    return _point_metric(_absolute_error, pred, target, mask, null_value)


def masked_mse(
    pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None, null_value: float = 0.0
) -> torch.Tensor | float:
    """Mean squared error over observed entries of ``(B, H, N, C)`` inputs (0 when none is observed)."""
    return _point_metric(_squared_error, pred, target, mask, null_value)


def masked_rmse(
    pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None, null_value: float = 0.0
) -> torch.Tensor | float:
    """Root mean squared error over observed entries of ``(B, H, N, C)`` inputs (0 when none is observed)."""
    return _point_metric(_root_squared_error, pred, target, mask, null_value)


def masked_mape(
    pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None, null_value: float = 0.0
) -> torch.Tensor | float:
    """Mean absolute percentage error in percent over observed targets of ``(B, H, N, C)`` inputs.

    Targets within ``MAPE_ZERO_TOLERANCE`` of 0 are skipped (0 when none is left).
    """
    return _point_metric(_percentage_error, pred, target, mask, null_value)


def masked_wape(
    pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None, null_value: float = 0.0
) -> torch.Tensor | float:
    """Weighted absolute percentage error in percent: ``100 * sum|pred - target| / sum|target|`` over observed entries.

    Inputs are ``(B, H, N, C)``. Gives 0 when the observed targets sum to 0 in absolute value
    (in particular when nothing is observed).
    """
    return _point_metric(_weighted_percentage_error, pred, target, mask, null_value)


POINT_METRICS = {"mae": masked_mae, "rmse": masked_rmse, "mape": masked_mape, "wape": masked_wape}


def horizon_metrics(
    pred: ArrayLike,
    target: ArrayLike,
    mask: ArrayLike | None = None,
    horizons: Sequence[int] = (3, 6, 12),
    null_value: float = 0.0,
) -> dict[str, float]:
    """MAE, RMSE, MAPE and WAPE at chosen horizon steps and over all of them: the evaluation report.

    A metric with nothing to score (no observed target in its slice; for MAPE none away from
    0; for WAPE observed targets that all are 0) is NaN, with one ``RuntimeWarning`` naming
    every such key: a 0.0 would read as a perfect score.

    Args:
        pred: forecast in original units ``(B, H, N, C)``.
        target: ground truth ``(B, H, N, C)``.
        mask: bool ``(B, H, N, C)``, True = observed; overrides ``null_value``.
        horizons: 1-based steps ahead to report, each in ``[1, H]`` (step 3 is ``pred[:, 2]``).
        null_value: the value that marks a missing target when ``mask`` is None.

    Returns:
        ``{"mae@3": ..., "rmse@3": ..., "mape@3": ..., "wape@3": ..., ..., "mae": ..., "rmse": ...,
        "mape": ..., "wape": ...}`` as floats. The keys without ``@`` pool every observed entry of
        every step, as BasicTS does, so an all-masked step simply adds nothing to them.
    """
    pred_t, target_t, valid, _ = _prepare(pred, target, mask, null_value)
    if pred_t.dim() < 2:
        raise ValueError(f"horizon_metrics needs inputs shaped (B, H, ...), got shape {tuple(pred_t.shape)}")
    steps = pred_t.shape[1]
    bad = [h for h in horizons if not 1 <= h <= steps]
    if bad:
        raise ValueError(f"horizons {bad} are outside [1, {steps}]: the forecast has {steps} steps")
    slices = {f"@{h}": (pred_t[:, h - 1], target_t[:, h - 1], valid[:, h - 1]) for h in horizons}
    slices[""] = (pred_t, target_t, valid)
    results: dict[str, float] = {}
    unscored = []
    with torch.no_grad():
        for suffix, tensors in slices.items():
            for name, score in _SCORES.items():
                value, counted = score(*tensors)
                results[name + suffix] = float(value) if counted else math.nan
                if not counted:
                    unscored.append(name + suffix)
    if unscored:
        warnings.warn(
            f"no observed target to score {', '.join(unscored)}: reported as NaN (MAPE skips targets "
            f"within {MAPE_ZERO_TOLERANCE} of 0; WAPE needs observed targets that are not all 0)",
            RuntimeWarning,
            stacklevel=2,
        )
    return results


def pinball_loss(
    quantile_pred: ArrayLike,
    target: ArrayLike,
    quantiles: Sequence[float],
    mask: ArrayLike | None = None,
    null_value: float = 0.0,
) -> torch.Tensor | float:
    """Quantile (pinball) loss averaged over quantiles and observed entries.

    For quantile ``q`` and error ``e = target - pred_q`` the loss is ``max(q * e, (q - 1) * e)``.

    Args:
        quantile_pred: quantile forecasts ``(B, H, N, C, Q)``, the last axis following ``quantiles``.
        target: ground truth ``(B, H, N, C)``.
        quantiles: the ``Q`` levels, each in ``(0, 1)``.
        mask: bool ``(B, H, N, C)``, True = observed; overrides ``null_value``.
        null_value: the value that marks a missing target when ``mask`` is None.
    """
    numpy_in = not isinstance(quantile_pred, torch.Tensor)
    pred_t, target_t, mask_t = _as_tensor(quantile_pred), _as_tensor(target), _as_tensor(mask)
    if pred_t.shape[:-1] != target_t.shape or pred_t.shape[-1] != len(quantiles):
        raise ValueError(
            f"quantile_pred has shape {tuple(pred_t.shape)}; expected target's shape {tuple(target_t.shape)} "
            f"plus a last axis of {len(quantiles)} quantiles"
        )
    if any(not 0.0 < q < 1.0 for q in quantiles):
        raise ValueError(f"quantiles must lie in (0, 1), got {list(quantiles)}")
    if mask_t is not None and mask_t.shape != target_t.shape:
        raise ValueError(f"mask has shape {tuple(mask_t.shape)} but target has shape {tuple(target_t.shape)}")
    valid = valid_mask(target_t, mask_t, null_value)
    target_t = torch.where(valid, target_t, torch.zeros((), dtype=target_t.dtype, device=target_t.device))
    levels = torch.as_tensor(quantiles, dtype=pred_t.dtype, device=pred_t.device)
    error = target_t.unsqueeze(-1) - pred_t
    loss = torch.maximum(levels * error, (levels - 1.0) * error).mean(dim=-1)
    return _output(_masked_mean(loss, valid), numpy_in)


def crps(
    quantile_pred: ArrayLike,
    target: ArrayLike,
    quantiles: Sequence[float],
    mask: ArrayLike | None = None,
    null_value: float = 0.0,
) -> torch.Tensor | float:
    """Continuous ranked probability score approximated from quantile forecasts.

    CRPS equals ``2 * integral over q in (0, 1) of pinball_q``; with evenly spread levels
    (``0.1, ..., 0.9``) the integral is approximated by the mean over the given quantiles,
    so this returns ``2 * pinball_loss(...)``. Shapes as in :func:`pinball_loss`.
    """
    return 2.0 * pinball_loss(quantile_pred, target, quantiles, mask, null_value)
