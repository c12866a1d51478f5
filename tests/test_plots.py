"""The notebooks' plots and comparisons: node choice, baseline verdicts, figures, and the committed outputs."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from st_peft.backbones import STID
from st_peft.baselines import baseline_metrics, last_value_forecast, split_targets
from st_peft.data import build_splits, load
from st_peft.plots import (
    active_nodes,
    compare_with_baselines,
    graph_layout,
    losing_steps,
    plot_error_per_step,
    plot_forecasts,
    plot_node_errors,
    residual_band,
    sensor_locations,
    split_forecasts,
    verdict,
)

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def chickenpox():
    data = load("chickenpox")
    return data, build_splits(data, input_len=12, horizon=12)


def observed_share_and_spread(truth: np.ndarray, mask: np.ndarray, node: int) -> tuple[float, float]:
    """Share of a node's test targets that are observed, and the range of the observed ones."""
    observed = truth[:, :, node][mask[:, :, node]]
    return float(mask[:, :, node].mean()), float(np.ptp(observed)) if observed.size else 0.0


def test_active_nodes_skip_the_all_zero_regions_of_nyc_bike():
    splits = build_splits(load("nyc-bike"), input_len=12, horizon=12)
    truth, mask = split_targets(splits, "test")
    # the quickstart used to plot regions 3, 40 and 90: the last two have no bike in the whole test span
    assert [observed_share_and_spread(truth, mask, node)[1] for node in (40, 90)] == [0.0, 0.0]
    every_eligible = active_nodes(truth, mask, count=splits.num_nodes)
    assert 40 not in every_eligible and 90 not in every_eligible
    assert all(observed_share_and_spread(truth, mask, node)[1] > 0 for node in every_eligible)
    chosen = active_nodes(truth, mask, count=3)
    variances = truth.var(axis=(0, 1, 3))  # nothing is missing in nyc-bike
    assert list(chosen) == list(np.argsort(-variances)[:3])


def test_active_nodes_skip_the_mostly_missing_roads_of_sz_taxi():
    splits = build_splits(load("sz-taxi"), input_len=12, horizon=12)
    truth, mask = split_targets(splits, "test")
    shares = mask.mean(axis=(0, 1, 3))
    assert shares.min() < 0.05  # some roads are almost never recorded in the test span
    every_eligible = active_nodes(truth, mask, count=splits.num_nodes)
    assert len(every_eligible) < splits.num_nodes
    for node in every_eligible:
        share, spread = observed_share_and_spread(truth, mask, node)
        assert share >= 0.5 and spread > 0


def test_active_nodes_refuse_when_nothing_happens():
    truth = np.zeros((4, 3, 5, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="no node is observed"):
        active_nodes(truth, np.ones_like(truth, dtype=bool))
    with pytest.raises(ValueError, match="no node is observed"):
        active_nodes(truth + np.arange(4)[:, None, None, None], np.zeros_like(truth, dtype=bool))


def test_verdict_says_loses_and_beats_from_the_numbers():
    # the ST-LoRA quickstart's backbone before this change
    sentence = verdict({"STID": 5.76}, {"last value": 10.1, "seasonal naive": 3.44})
    assert sentence == (
        "STID (test MAE 5.760) beats last value (10.100) but loses to seasonal naive (3.440). "
        "Lowest test MAE: seasonal naive."
    )
    both = verdict({"STID": 2.9}, {"last value": 10.1, "seasonal naive": 3.44})
    assert "beats last value (10.100) and seasonal naive (3.440)" in both and "loses" not in both
    assert both.endswith("Lowest test MAE: STID.")
    worse = verdict({"model": 11.0}, {"last value": 10.1, "seasonal naive": 3.44}, metric="RMSE")
    assert "model (test RMSE 11.000) loses to last value (10.100) and seasonal naive (3.440)." in worse
    assert "beats" not in worse
    assert "ties with last value" in verdict({"model": 1.0}, {"last value": 1.0})
    assert "cannot be compared with last value" in verdict({"model": math.nan}, {"last value": 1.0})


def test_compare_with_baselines_names_the_steps_a_winner_still_loses():
    model = {"mae@1": 1.0, "mae@2": 2.0, "mae@3": 3.5, "mae": 2.0, "rmse": 3.0}
    naive = {"mae@1": 3.0, "mae@2": 3.0, "mae@3": 3.0, "mae": 3.0, "rmse": 4.0}
    table, sentence = compare_with_baselines({"model": model}, {"seasonal naive": naive})
    assert list(table.columns) == ["mae@3", "mae", "rmse"]
    assert sentence == ("model (test MAE 2.000) beats seasonal naive (3.000). Lowest test MAE: model. "
                        "model still loses to seasonal naive at horizon step 3.")
    assert losing_steps(model, naive) == [3]
    _, several = compare_with_baselines({"model": {**model, "mae@1": 3.5, "mae@2": 3.5}}, {"seasonal naive": naive})
    assert several.endswith("model still loses to seasonal naive at horizon steps 1, 2 and 3.")
    _, losing = compare_with_baselines({"model": {**model, "mae": 4.0}}, {"seasonal naive": naive})
    assert "model (test MAE 4.000) loses to seasonal naive" in losing and "still" not in losing


def test_compare_with_baselines_puts_models_next_to_both_baselines(chickenpox):
    _, splits = chickenpox
    baselines = baseline_metrics(splits)
    model = {**baselines["seasonal naive"], "mae": baselines["seasonal naive"]["mae"] + 1.0}
    table, sentence = compare_with_baselines({"model": model}, baselines)
    assert list(table.index) == ["model", "last value", "seasonal naive"]
    assert list(table.columns) == ["mae@3", "mae@6", "mae@12", "mae", "rmse"]
    assert table.loc["seasonal naive", "mae"] == round(baselines["seasonal naive"]["mae"], 3)
    assert "loses to" in sentence and "seasonal naive" in sentence


def test_split_forecasts_cover_every_window_in_original_units(chickenpox):
    data, splits = chickenpox
    torch.manual_seed(0)
    model = STID(**splits.model_kwargs(), steps_per_day=splits.steps_per_day, num_layers=1)
    test = split_forecasts(model, splits, "test", batch_size=32)
    truth, mask = split_targets(splits, "test")
    assert test.prediction.shape == truth.shape == (len(splits.test), 12, data.num_nodes, 1)
    np.testing.assert_array_equal(test.truth, truth)
    np.testing.assert_array_equal(test.mask, mask)
    assert test.quantiles is None
    metrics = test.metrics()
    assert {f"mae@{h}" for h in range(1, 13)} <= set(metrics)
    assert test.node_mae().shape == (data.num_nodes,)


def test_residual_band_holds_its_share_of_the_errors(chickenpox):
    _, splits = chickenpox
    forecast = last_value_forecast(splits, "val")
    truth, mask = split_targets(splits, "val")
    low, high = residual_band(forecast, truth, mask, coverage=0.8)
    assert low.shape == high.shape == forecast.shape[1:]
    inside = (truth >= forecast + low) & (truth <= forecast + high)
    assert 0.7 <= inside[mask].mean() <= 0.9


def test_plot_forecasts_draws_one_panel_per_node_with_truth_forecasts_and_band(chickenpox):
    data, splits = chickenpox
    forecast = last_value_forecast(splits, "test")
    truth, mask = split_targets(splits, "test")
    nodes = active_nodes(truth, mask, count=3)
    fig = plot_forecasts(truth, mask, {"last value": forecast, "truth again": truth}, nodes,
                         band=(forecast - 1, forecast + 1), node_names=data.node_ids, windows=slice(0, 50))
    assert len(fig.axes) == 3
    for ax, node in zip(fig.axes, nodes, strict=True):
        assert [line.get_label() for line in ax.lines] == ["truth", "last value", "truth again"]
        assert len(ax.collections) == 1  # the band
        assert data.node_ids[node] in ax.get_title()
        assert len(ax.lines[0].get_xdata()) == 50


def test_plot_error_per_step_draws_one_line_per_model(chickenpox):
    _, splits = chickenpox
    metrics = baseline_metrics(splits, horizons=tuple(range(1, 13)))
    fig = plot_error_per_step(metrics, unit="cases")
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == ["last value", "seasonal naive"]
    assert list(ax.lines[1].get_xdata()) == list(range(1, 13))
    assert ax.lines[1].get_ydata()[0] == pytest.approx(metrics["seasonal naive"]["mae@1"])


def test_plot_node_errors_puts_los_loop_sensors_on_the_map():
    data = load("los-loop")
    locations = sensor_locations(data.node_ids)
    assert locations.shape == (207, 2)
    assert (-119 < locations[:, 0]).all() and (locations[:, 0] < -118).all()  # Los Angeles longitudes
    errors = np.linspace(1, 2, data.num_nodes)
    errors[0] = np.nan
    fig = plot_node_errors(errors, data, unit="mph")
    assert len(fig.axes) == 2  # the map and its colour bar
    assert fig.axes[0].get_xlabel() == "longitude"
    np.testing.assert_allclose(fig.axes[0].collections[1].get_offsets(), locations[1:])
    with pytest.raises(ValueError, match=r"node_error must be \(207,\)"):
        plot_node_errors(errors[:5], data)


def test_graph_layout_puts_linked_nodes_close(chickenpox):
    data, _ = chickenpox
    assert sensor_locations(data.node_ids) is None
    positions = graph_layout(data.adjacency)
    assert positions.shape == (data.num_nodes, 2)
    np.testing.assert_array_equal(positions, graph_layout(data.adjacency))
    distance = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    linked = (data.adjacency + data.adjacency.T > 0) & ~np.eye(data.num_nodes, dtype=bool)
    unlinked = ~linked & ~np.eye(data.num_nodes, dtype=bool)
    assert distance[linked].mean() < 0.6 * distance[unlinked].mean()
    fig = plot_node_errors(np.arange(data.num_nodes, dtype=float), data)
    assert fig.axes[0].get_xlabel() == "graph layout (linked nodes close)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_is_committed_with_its_outputs(path):
    notebook = json.loads(path.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    counts = [cell.get("execution_count") for cell in code]
    assert None not in counts, f"{path.name}: cells never run; run `make notebooks`"
    assert counts == sorted(counts), f"{path.name}: cells were run out of order; run `make notebooks`"
    outputs = [output for cell in code for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output["output_type"] == "error"], f"{path.name}: an error is saved"
    images = [output["data"]["image/png"] for output in outputs if "image/png" in output.get("data", {})]
    assert images, f"{path.name} has no plot among its saved outputs"
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
