"""Masked metrics checked against numbers worked out by hand."""

import math
import warnings

import numpy as np
import pytest
import torch

from st_peft.losses import LOSSES
from st_peft.metrics import (
    crps,
    horizon_metrics,
    masked_mae,
    masked_mape,
    masked_mse,
    masked_rmse,
    masked_wape,
    pinball_loss,
)

# One sample, 2 steps, 2 nodes, 1 channel. The target 0 at (step 1, node 1) is missing under
# the default null value 0.0.
PRED = np.array([[[[2.0], [1.0]], [[5.0], [7.0]]]])
TARGET = np.array([[[[1.0], [0.0]], [[4.0], [10.0]]]])
# observed errors: |2-1| = 1, |5-4| = 1, |7-10| = 3


def test_mae_rmse_mape_wape_by_hand_null_zero():
    assert masked_mae(PRED, TARGET) == pytest.approx(5 / 3)
    assert masked_mse(PRED, TARGET) == pytest.approx(11 / 3)
    assert masked_rmse(PRED, TARGET) == pytest.approx(math.sqrt(11 / 3))
    # relative errors 1/1, 1/4, 3/10 -> mean 0.5167 -> percent
    assert masked_mape(PRED, TARGET) == pytest.approx(100 * (1 + 0.25 + 0.3) / 3)
    # sum |e| = 5 over sum |y| = 15
    assert masked_wape(PRED, TARGET) == pytest.approx(100 * 5 / 15)


def test_torch_and_numpy_agree_and_torch_keeps_gradients():
    pred = torch.tensor(PRED, dtype=torch.float32, requires_grad=True)
    loss = masked_mae(pred, torch.tensor(TARGET, dtype=torch.float32))
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert float(loss.detach()) == pytest.approx(masked_mae(PRED, TARGET), rel=1e-6)
    loss.backward()
    # d/dpred of mean |pred - y| over 3 entries: sign / 3, 0 at the missing entry
    expected = np.array([[[[1.0], [0.0]], [[1.0], [-1.0]]]]) / 3
    np.testing.assert_allclose(pred.grad.numpy(), expected, rtol=1e-6)


def test_explicit_mask_overrides_null_value():
    mask = np.ones_like(TARGET, dtype=bool)
    mask[0, 1, 1, 0] = False  # drop the error-3 entry, keep the zero target
    # errors counted: 1, |1 - 0| = 1, 1 -> MAE 1
    assert masked_mae(PRED, TARGET, mask) == pytest.approx(1.0)
    # MAPE skips the zero target even when it is observed: 1/1 and 1/4
    assert masked_mape(PRED, TARGET, mask) == pytest.approx(100 * 1.25 / 2)


def test_nan_null_value_and_nan_predictions_at_missing_entries():
    target = TARGET.copy()
    target[0, 1, 1, 0] = np.nan
    pred = PRED.copy()
    pred[0, 1, 1, 0] = np.inf  # a forecast at a missing entry must not leak
    # NaN null: the zero target now counts (error 1), the NaN one does not
    assert masked_mae(pred, target, null_value=float("nan")) == pytest.approx(1.0)
    assert masked_rmse(pred, target, null_value=float("nan")) == pytest.approx(1.0)


def test_all_masked_point_metrics_give_zero_so_training_losses_stay_finite():
    mask = np.zeros_like(TARGET, dtype=bool)
    for fn in (masked_mae, masked_rmse, masked_mape, masked_wape):
        assert fn(PRED, TARGET, mask) == 0.0
    for name, loss_fn in LOSSES.items():
        grad_pred = torch.zeros(1, 2, 2, 1, requires_grad=True)
        loss = loss_fn(grad_pred, torch.zeros(1, 2, 2, 1), torch.zeros(1, 2, 2, 1, dtype=torch.bool))
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.isfinite(grad_pred.grad).all(), name


def test_horizon_metrics_per_step_and_pooled():
    metrics = horizon_metrics(PRED, TARGET, horizons=(1, 2))
    assert metrics["mae@1"] == pytest.approx(1.0)  # only node 0 observed at step 1
    assert metrics["mae@2"] == pytest.approx(2.0)
    assert metrics["rmse@2"] == pytest.approx(math.sqrt(5.0))
    assert metrics["mape@2"] == pytest.approx(100 * (0.25 + 0.3) / 2)
    assert metrics["wape@2"] == pytest.approx(100 * 4 / 14)
    # pooled over all observed entries, not the mean of the two step values
    assert metrics["mae"] == pytest.approx(5 / 3)
    assert set(metrics) == {f"{m}@{h}" for m in ("mae", "rmse", "mape", "wape") for h in (1, 2)} | {
        "mae",
        "rmse",
        "mape",
        "wape",
    }


def test_horizon_metrics_all_masked_step_is_nan_with_a_warning_and_does_not_poison_average():
    mask = np.ones_like(TARGET, dtype=bool)
    mask[:, 0] = False
    with pytest.warns(RuntimeWarning, match=r"no observed target to score mae@1, rmse@1, mape@1, wape@1: reported as NaN"):
        metrics = horizon_metrics(torch.tensor(PRED), torch.tensor(TARGET), torch.tensor(mask), horizons=(1, 2))
    assert all(math.isnan(metrics[f"{name}@1"]) for name in ("mae", "rmse", "mape", "wape"))
    assert all(math.isfinite(value) for key, value in metrics.items() if not key.endswith("@1"))
    assert metrics["mae"] == pytest.approx(metrics["mae@2"])


def test_evaluation_with_no_observed_target_is_nan_never_a_perfect_zero():
    # issue 14 (6): an all-masked test span scored MAE, RMSE, MAPE and WAPE of 0.0
    with pytest.warns(RuntimeWarning, match="reported as NaN"):
        metrics = horizon_metrics(PRED, TARGET, np.zeros_like(TARGET, dtype=bool), horizons=(1, 2))
    assert len(metrics) == 12 and all(math.isnan(value) for value in metrics.values())


def test_mape_and_wape_of_all_zero_targets_are_nan_in_the_report():
    target = np.zeros_like(TARGET)
    with pytest.warns(RuntimeWarning, match="mape@1, wape@1"):
        metrics = horizon_metrics(PRED, target, np.ones_like(TARGET, dtype=bool), horizons=(1,))
    assert metrics["mae@1"] == pytest.approx(1.5) and math.isnan(metrics["mape@1"]) and math.isnan(metrics["wape"])


def test_observed_targets_raise_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        horizon_metrics(PRED, TARGET, horizons=(1, 2))


def test_clear_errors_for_bad_shapes_and_horizons():
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 1\).*\(1, 2, 2\)"):
        masked_mae(PRED, TARGET[..., 0])
    with pytest.raises(ValueError, match=r"horizons \[12\] are outside \[1, 2\]"):
        horizon_metrics(PRED, TARGET, horizons=(1, 12))


def test_pinball_and_crps_by_hand():
    target = np.array([[2.0, 4.0]])
    quantile_pred = np.array([[[1.0, 3.0], [5.0, 4.0]]])  # levels 0.1 and 0.9
    quantiles = (0.1, 0.9)
    # entry 0: e = 1 at q=.1 -> 0.1; e = -1 at q=.9 -> 0.1  => mean 0.1
    # entry 1: e = -1 at q=.1 -> 0.9; e = 0 at q=.9 -> 0   => mean 0.45
    assert pinball_loss(quantile_pred, target, quantiles) == pytest.approx(0.275)
    assert crps(quantile_pred, target, quantiles) == pytest.approx(0.55)
    mask = np.array([[True, False]])
    assert pinball_loss(quantile_pred, target, quantiles, mask) == pytest.approx(0.1)
    torch_value = pinball_loss(torch.tensor(quantile_pred), torch.tensor(target), quantiles)
    assert float(torch_value) == pytest.approx(0.275)
    with pytest.raises(ValueError, match="3 quantiles"):
        pinball_loss(quantile_pred, target, (0.1, 0.5, 0.9))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        pinball_loss(quantile_pred, target, (0.0, 0.9))


def test_median_pinball_is_half_mae():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(4, 3, 5, 2))
    pred = rng.normal(size=(4, 3, 5, 2))
    value = pinball_loss(pred[..., None], target, (0.5,), null_value=float("nan"))
    assert value == pytest.approx(0.5 * masked_mae(pred, target, null_value=float("nan")))


def test_mape_skips_float_residues_of_zero():
    # real files store some zeros as 1e-17; a relative error there would be ~1e17 %
    target = np.array([1e-17, 2.0])
    pred = np.array([1.0, 3.0])
    assert masked_mape(pred, target, np.array([True, True])) == pytest.approx(50.0)
