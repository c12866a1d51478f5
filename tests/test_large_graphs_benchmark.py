"""The large-graph benchmark's own machinery (benchmarks/large_graphs.py --train): the synthetic
signal's cycles and spatial correlation, the growth fits and the skip estimate."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from script_module import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "large_graphs.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def graph_and_signal(bench):
    graph = bench.knn_graph(300)
    return graph, bench.synthetic_signal(graph, steps=28 * bench.STEPS_PER_DAY)


def test_signal_has_daily_and_weekly_cycles(bench, graph_and_signal):
    _, signal = graph_and_signal
    days = signal.reshape(4, 7, bench.STEPS_PER_DAY, -1)  # (weeks, days, slots, N)
    weekday, weekend = days[:, :5].mean(axis=(0, 1)), days[:, 5:].mean(axis=(0, 1))  # (slots, N)
    rush, night = 8 * bench.STEPS_PER_DAY // 24, 2 * bench.STEPS_PER_DAY // 24
    assert (weekday[rush] < weekday[night] - 3).mean() > 0.9  # the morning rush slows most nodes
    assert (weekend[rush] > weekday[rush]).mean() > 0.9  # and less so at weekends
    assert signal.dtype == np.float32 and signal.shape == (28 * bench.STEPS_PER_DAY, 300)


def test_noise_is_correlated_along_the_graph(bench, graph_and_signal):
    graph, signal = graph_and_signal
    days = signal.reshape(28, bench.STEPS_PER_DAY, -1)
    weekdays = np.arange(28) % 7 < 5
    noise = (days[weekdays] - days[weekdays].mean(axis=0)).reshape(-1, signal.shape[1])
    correlation = np.corrcoef(noise.T)
    sources, targets = np.nonzero(graph)
    rng = np.random.default_rng(0)
    assert correlation[sources, targets].mean() > 0.5
    assert abs(correlation[rng.integers(0, 300, 500), rng.integers(0, 300, 500)].mean()) < 0.5 * correlation[
        sources, targets].mean()


def test_growth_recovers_a_power_law_and_the_largest_fitting_size(bench):
    cells = [{"nodes": n, "peak_rss_mb": 2.0 * n, "rss_after_imports_mb": 0.0} for n in (716, 2352, 3834, 8600)]
    a, b = bench.growth([(c["nodes"], c["peak_rss_mb"]) for c in cells])
    assert a == pytest.approx(2.0) and b == pytest.approx(1.0)
    fit = bench.largest_fitting(cells)
    assert fit["largest_n"] == pytest.approx(bench.MEMORY_BUDGET_MB / 2, abs=1)
    assert bench.largest_fitting(cells[:1]) is None
    fixed_cost = [{**c, "peak_rss_mb": 500.0 + 0.25 * c["nodes"]} for c in cells]  # sublinear as a power law
    assert bench.largest_fitting(fixed_cost)["largest_n"] == pytest.approx((bench.MEMORY_BUDGET_MB - 500) / 0.25, abs=2)


def test_cells_estimated_past_the_limits_are_skipped(bench):
    options = argparse.Namespace(max_step_s=60.0)
    done = [{"nodes": 1000, "step_cpu_s": 1.0, "peak_rss_mb": 100.0},
            {"nodes": 2000, "step_cpu_s": 4.0, "peak_rss_mb": 200.0}]
    assert bench.predicted_skip(done, 4000, options) is None  # about 16 CPU s, 400 MB
    assert "CPU s a step" in bench.predicted_skip(done, 8000, options)  # about 64 CPU s
    assert "GB" in bench.predicted_skip([{**d, "step_cpu_s": 0.1} for d in done], 300_000, options)
    assert bench.predicted_skip([], 8000, options) is None
    # memory growing slower than N (a fixed cost first) is extrapolated linearly from the largest cell
    sublinear = [{"nodes": 716, "step_cpu_s": 0.1, "peak_rss_mb": 650.0},
                 {"nodes": 2352, "step_cpu_s": 0.1, "peak_rss_mb": 1000.0}]
    assert bench.predicted_skip(sublinear, 8600, options) is None  # about 3.7 GB
    assert "about 25 GB" in bench.predicted_skip(sublinear, 60_000, options)
