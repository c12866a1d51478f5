"""Plots that show whether a forecaster is any good, and what they need, shared by the notebooks.

A model's forecasts of a whole split (:func:`split_forecasts`), the nodes worth looking at
(:func:`active_nodes`), the model next to seasonal naive and last value with a sentence
saying which wins (:func:`compare_with_baselines`), and three figures: forecast against
truth with an error band, error per horizon step, error per node on the graph.

Every array is laid out as the splits lay it out: forecasts, targets and masks are
``(W, H, N, C)`` (windows of a split in time order, horizon steps, nodes, channels), in
original units. The plot functions build a ``matplotlib.figure.Figure`` without pyplot, so
they work with any backend (Agg included) and leave no global state; a notebook shows the
figure by ending a cell with it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from torch import nn

from st_peft.data.container import STData
from st_peft.data.windows import ForecastingSplits
from st_peft.metrics import horizon_metrics
from st_peft.outputs import TARGET_NAMES, prediction_of

DPI = 80
"""Resolution of every figure: small enough to commit, sharp enough to read."""

SENSOR_LOCATIONS = Path(__file__).resolve().parent / "builtin_data" / "metr-la-graph" / "graph_sensor_locations.csv"
"""Latitude and longitude of the METR-LA sensors (los-loop's nodes), by sensor id."""


@dataclass
class SplitForecasts:
    """A model's forecasts of every window of a split, with the truth they are scored against.

    Attributes:
        prediction: float32 ``(W, H, N, C_out)`` point forecasts in original units.
        truth: float32 ``(W, H, N, C_out)`` targets in original units.
        mask: bool ``(W, H, N, C_out)``, True where the target was observed.
        quantiles: float32 ``(W, H, N, C_out, Q)`` quantile forecasts, or None when the model has none.
    """

    prediction: np.ndarray
    truth: np.ndarray
    mask: np.ndarray
    quantiles: np.ndarray | None = None

    def metrics(self) -> dict[str, float]:
        """:func:`~st_peft.metrics.horizon_metrics` at every horizon step (``mae@1`` .. ``mae@H``) and overall."""
        steps = tuple(range(1, self.prediction.shape[1] + 1))
        return horizon_metrics(self.prediction, self.truth, self.mask, horizons=steps)

    def node_mae(self) -> np.ndarray:
        """Masked MAE of each node over windows, steps and channels: float ``(N,)``, NaN where nothing was observed."""
        errors = np.where(self.mask, np.abs(self.prediction.astype(np.float64) - self.truth), 0.0)
        counts = self.mask.sum(axis=(0, 1, 3))
        return np.where(counts > 0, errors.sum(axis=(0, 1, 3)) / np.maximum(counts, 1), np.nan)


def split_forecasts(
    model: nn.Module, splits: ForecastingSplits, split: str = "test", batch_size: int = 64
) -> SplitForecasts:
    """Forecast every window of a split, in time order, from the history alone.

    Args:
        model: any st-peft forecaster (wrapped by ``get_peft_model`` or not), called as
            ``model(**inputs)``; it is put in eval mode.
        splits: the data's splits.
        split: ``"train"``, ``"val"`` or ``"test"``.
        batch_size: windows per forward pass.
    """
    model.eval()
    predictions, quantiles, truths, masks = [], [], [], []
    with torch.no_grad():
        for batch in splits.iter_batches(split, batch_size):
            output = model(**{key: value for key, value in batch.items() if key not in TARGET_NAMES})
            predictions.append(prediction_of(output).numpy())
            quantiles.append(getattr(output, "quantile_outputs", None))
            truths.append(batch["future_values"].numpy())
            masks.append(batch["future_observed_mask"].numpy())
    has_quantiles = all(q is not None for q in quantiles)
    return SplitForecasts(
        np.concatenate(predictions), np.concatenate(truths), np.concatenate(masks),
        np.concatenate([q.numpy() for q in quantiles]) if has_quantiles else None,
    )


def active_nodes(truth: np.ndarray, mask: np.ndarray, count: int = 3, min_observed: float = 0.5) -> np.ndarray:
    """Nodes where something happens: the largest variance of the observed truth.

    A node whose observed truth never changes (all zeros, say) or that is observed in less
    than ``min_observed`` of its entries is never chosen, so a plot of it shows a signal.

    Args:
        truth: targets ``(W, H, N, C)`` (or any ``(..., N, C)``).
        mask: bool, same shape, True where observed.
        count: how many nodes to return at most.
        min_observed: least share of a node's entries that must be observed.

    Returns:
        int64 ``(k,)`` node indices, ``k <= count``, the most variable first.

    Raises:
        ValueError: when no node qualifies.
    """
    truth, mask = np.asarray(truth, dtype=np.float64), np.asarray(mask, dtype=bool)
    nodes_last = (truth.reshape(-1, *truth.shape[-2:]), mask.reshape(-1, *mask.shape[-2:]))
    values, observed = (np.moveaxis(array, 1, 0).reshape(truth.shape[-2], -1) for array in nodes_last)
    share = observed.mean(axis=1)
    counts = observed.sum(axis=1)
    sums = np.where(observed, values, 0.0).sum(axis=1)
    means = sums / np.maximum(counts, 1)
    variance = np.where(observed, (values - means[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(counts, 1)
    eligible = (share >= min_observed) & (variance > 0)
    if not eligible.any():
        raise ValueError(
            f"no node is observed in at least {min_observed:.0%} of its entries with a truth that changes"
        )
    order = np.argsort(-np.where(eligible, variance, -np.inf), kind="stable")
    return order[: min(count, int(eligible.sum()))].astype(np.int64)


def residual_band(
    forecast: np.ndarray, truth: np.ndarray, mask: np.ndarray, coverage: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """The central ``coverage`` share of the observed errors ``truth - forecast``, per step, node and channel.

    Computed on the validation split, ``forecast + low`` to ``forecast + high`` is an error
    band for the test forecasts that held ``coverage`` of the validation errors.

    Args:
        forecast, truth: ``(W, H, N, C)`` in original units.
        mask: bool ``(W, H, N, C)``, True where observed.
        coverage: share of errors inside the band, in ``(0, 1)``.

    Returns:
        ``(low, high)``, each float ``(H, N, C)``; NaN where nothing was observed.
    """
    errors = np.where(mask, np.asarray(truth, dtype=np.float64) - forecast, np.nan)
    tail = (1 - coverage) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an unobserved node is NaN, as documented
        low, high = np.nanquantile(errors, [tail, 1 - tail], axis=0)
    return low, high


def verdict(scores: Mapping[str, float], baselines: Mapping[str, float], metric: str = "MAE") -> str:
    """Plain sentences saying which baselines each model beats and which it loses to (lower is better).

    Args:
        scores: model name -> its error.
        baselines: baseline name (``"seasonal naive"``, ``"last value"``) -> its error.
        metric: the error's name, for the sentence.

    Returns:
        one sentence per model, then which of all has the lowest error, e.g. ``"STID (test MAE
        5.760) beats last value (10.100) but loses to seasonal naive (3.440). Lowest test MAE:
        seasonal naive."``
    """
    sentences = []
    for model, score in scores.items():
        groups: dict[str, list[str]] = {"beats": [], "ties with": [], "loses to": [], "cannot be compared with": []}
        for name, reference in baselines.items():
            if math.isnan(score) or math.isnan(reference):
                word = "cannot be compared with"
            elif math.isclose(score, reference, rel_tol=1e-9, abs_tol=1e-12):
                word = "ties with"
            else:
                word = "beats" if score < reference else "loses to"
            groups[word].append(f"{name} ({reference:.3f})")
        clauses = [f"{word} {' and '.join(names)}" for word, names in groups.items() if names]
        link = " but " if groups["beats"] and groups["loses to"] else " and "
        sentences.append(f"{model} (test {metric} {score:.3f}) {link.join(clauses)}.")
    finite = {name: value for name, value in {**scores, **baselines}.items() if not math.isnan(value)}
    if finite:
        sentences.append(f"Lowest test {metric}: {min(finite, key=finite.get)}.")
    return " ".join(sentences)


def compare_with_baselines(
    models: Mapping[str, Mapping[str, float]], baselines: Mapping[str, Mapping[str, float]], metric: str = "mae"
) -> tuple[pd.DataFrame, str]:
    """Put every model's metrics next to the baselines', and say which wins.

    Args:
        models: model name -> :func:`~st_peft.metrics.horizon_metrics` dict (e.g.
            :meth:`SplitForecasts.metrics` or ``trainer.evaluate_test(splits.test)``).
        baselines: :func:`st_peft.baselines.baseline_metrics` of the same windows.
        metric: the metric the sentence compares (lower is better).

    Returns:
        a table (one row per model and baseline; columns ``metric@3``, ``@6``, ``@12`` where
        present, ``metric`` and ``rmse``) and the sentences of :func:`verdict`, followed, for a
        model that beats a baseline overall, by the horizon steps at which it still loses to it
        (:func:`losing_steps`).
    """
    rows = {**models, **baselines}
    columns = [f"{metric}@{h}" for h in (3, 6, 12)] + [metric, "rmse"]
    columns = list(dict.fromkeys(c for c in columns if all(c in row for row in rows.values())))
    table = pd.DataFrame({name: [row[c] for c in columns] for name, row in rows.items()}, index=columns).T
    sentences = [verdict(
        {name: row[metric] for name, row in models.items()},
        {name: row[metric] for name, row in baselines.items()},
        metric.upper(),
    )]
    for model, row in models.items():
        for baseline, reference in baselines.items():
            worse = losing_steps(row, reference, metric)
            if worse and row[metric] < reference[metric]:
                steps = ", ".join(map(str, worse[:-1])) + " and " + str(worse[-1]) if len(worse) > 1 else str(worse[0])
                sentences.append(f"{model} still loses to {baseline} at horizon step{'s' if len(worse) > 1 else ''} {steps}.")
    return table.round(3), " ".join(sentences)


def losing_steps(scores: Mapping[str, float], reference: Mapping[str, float], metric: str = "mae") -> list[int]:
    """Horizon steps ``h`` at which ``scores[f"{metric}@{h}"]`` is higher (worse) than ``reference``'s.

    Args:
        scores, reference: :func:`~st_peft.metrics.horizon_metrics` dicts; steps missing from either are skipped.
        metric: the metric compared (lower is better).
    """
    steps = sorted(int(key.split("@")[1]) for key in scores if key.startswith(f"{metric}@"))
    return [h for h in steps if f"{metric}@{h}" in reference and scores[f"{metric}@{h}"] > reference[f"{metric}@{h}"]]


def plot_forecasts(
    truth: np.ndarray,
    mask: np.ndarray,
    forecasts: Mapping[str, np.ndarray],
    nodes: Sequence[int],
    step: int = 0,
    channel: int = 0,
    band: tuple[np.ndarray, np.ndarray] | None = None,
    band_label: str = "error band",
    windows: slice = slice(0, 288),
    node_names: Sequence[str] | None = None,
    node_label: str = "node",
    xlabel: str = "time step into the test span",
    ylabel: str = "",
) -> Figure:
    """Forecast against truth, ``step + 1`` steps ahead, over consecutive windows: one panel per node.

    Window ``w``'s forecast for step ``step`` is drawn at time ``w``, so the curves are what
    the model said ``step + 1`` steps before each time. Unobserved truth is left blank.

    Args:
        truth: targets ``(W, H, N, C)``.
        mask: bool ``(W, H, N, C)``, True where observed.
        forecasts: label -> forecast ``(W, H, N, C)``; the first gets the band.
        nodes: node indices, one panel each (see :func:`active_nodes`).
        step: 0-based horizon step shown.
        channel: channel shown.
        band: ``(lower, upper)`` values that broadcast to ``(W, H, N, C)`` (e.g. forecast plus
            :func:`residual_band`, or the lowest and highest quantile forecasts).
        band_label: the band's legend entry.
        windows: which windows to show.
        node_names: one name per node of the graph, for the titles.
        node_label: what a node is ("sensor", "region"), for the titles.
        xlabel, ylabel: axis labels.

    Returns:
        a figure with ``len(nodes)`` axes, stacked.
    """
    fig = Figure(figsize=(10, 0.4 + 2.0 * len(nodes)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(nodes), 1, squeeze=False, sharex=True)[:, 0]
    first = next(iter(forecasts))
    ahead = f"{step + 1} step{'s' if step else ''} ahead"
    for ax, node in zip(axes, nodes, strict=True):
        observed = np.asarray(mask)[windows, step, node, channel]
        time = np.arange(len(observed))
        ax.plot(time, np.where(observed, truth[windows, step, node, channel], np.nan), color="black", lw=1.3,
                label="truth", zorder=len(forecasts) + 2)
        for index, (label, forecast) in enumerate(forecasts.items()):
            # the first forecast, the one with the band, is drawn on top of the others
            ax.plot(time, forecast[windows, step, node, channel], color=f"C{index}", lw=1.1, label=label,
                    zorder=len(forecasts) + 1 - index)
        if band is not None:
            shape = np.shape(forecasts[first])
            lower, upper = (np.broadcast_to(edge, shape)[windows, step, node, channel] for edge in band)
            ax.fill_between(time, lower, upper, color="C0", alpha=0.25, lw=0, label=band_label, zorder=0)
        name = node_names[node] if node_names is not None else str(node)
        ax.set_title(f"{node_label} {name}, forecast {ahead}", fontsize=10)
        ax.set_ylabel(ylabel)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncol=len(forecasts) + 2, fontsize=9)
    axes[-1].set_xlabel(xlabel)
    return fig


def plot_error_per_step(
    metrics: Mapping[str, Mapping[str, float]], metric: str = "mae", step_label: str = "steps ahead", unit: str = ""
) -> Figure:
    """Error against horizon step, one line per model or baseline.

    Args:
        metrics: label -> a dict holding ``metric@1`` .. ``metric@H``: :meth:`SplitForecasts.metrics`,
            or ``baseline_metrics(splits, horizons=range(1, H + 1))``.
        metric: which metric to draw.
        step_label: the x axis label.
        unit: the metric's unit, for the y axis.

    Returns:
        a figure with one axes.
    """
    fig = Figure(figsize=(6.5, 3.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for index, (label, values) in enumerate(metrics.items()):
        steps = sorted(int(key.split("@")[1]) for key in values if key.startswith(f"{metric}@"))
        style = "--" if label in ("seasonal naive", "last value") else "-"
        ax.plot(steps, [values[f"{metric}@{s}"] for s in steps], style, marker="o", ms=3, color=f"C{index}",
                label=label)
    ax.set(xlabel=step_label, ylabel=f"test {metric.upper()}" + (f" ({unit})" if unit else ""),
           title=f"test {metric.upper()} per horizon step")
    ax.legend(fontsize=8)
    return fig


def sensor_locations(node_ids: Sequence[str]) -> np.ndarray | None:
    """Longitude and latitude ``(N, 2)`` of nodes that are METR-LA sensors (los-loop), else None."""
    locations = pd.read_csv(SENSOR_LOCATIONS, dtype={"sensor_id": str}).set_index("sensor_id")
    if not set(node_ids) <= set(locations.index):
        return None
    where = locations.loc[list(node_ids)]
    return where[["longitude", "latitude"]].to_numpy(dtype=np.float64)


def graph_layout(adjacency: np.ndarray, iterations: int = 200, seed: int = 0) -> np.ndarray:
    """Positions ``(N, 2)`` of a graph's nodes: the spectral layout, relaxed by a Fruchterman-Reingold force layout.

    Linked nodes attract, all nodes repel, so neighbours end up close; direction and weights
    are ignored. Deterministic for a given ``seed``.

    Args:
        adjacency: ``(N, N)``, nonzero where two nodes are linked.
        iterations: steps of the layout.
        seed: seed of the initial positions.
    """
    linked = np.asarray(adjacency) != 0
    linked = (linked | linked.T) & ~np.eye(len(linked), dtype=bool)
    count = len(linked)
    # start from the spectral layout (a grid comes out as a grid), jittered so no two nodes coincide
    laplacian = np.diag(linked.sum(axis=1)) - linked
    _, vectors = np.linalg.eigh(laplacian.astype(np.float64))
    positions = vectors[:, 1:3] if count > 2 else np.zeros((count, 2))
    span = np.ptp(positions, axis=0)
    positions = (positions - positions.min(axis=0)) / np.where(span > 0, span, 1.0)
    positions += np.random.default_rng(seed).uniform(-0.01, 0.01, size=(count, 2))
    ideal = math.sqrt(1.0 / count)
    temperature = 0.1
    for _ in range(iterations):
        delta = positions[:, None, :] - positions[None, :, :]
        distance = np.maximum(np.linalg.norm(delta, axis=-1), 1e-3)
        force = ideal**2 / distance**2 - linked * distance / ideal
        # a weak pull to the centre keeps a graph's separate pieces from drifting apart
        displacement = np.einsum("ijk,ij->ik", delta, force) - (positions - positions.mean(axis=0))
        length = np.maximum(np.linalg.norm(displacement, axis=-1, keepdims=True), 1e-9)
        positions += displacement / length * np.minimum(length, temperature)
        temperature -= 0.1 / (iterations + 1)
    return positions


def plot_node_errors(node_error: np.ndarray, data: STData, unit: str = "", title: str = "test MAE per node") -> Figure:
    """Each node's error as a colour at its place on the graph.

    Nodes sit at their coordinates where the data set has them (los-loop's sensors), else
    where :func:`graph_layout` puts them; edges come from ``data.adjacency``. A node with no
    error (NaN: never observed) is drawn as a grey cross.

    Args:
        node_error: float ``(N,)``, e.g. :meth:`SplitForecasts.node_mae`.
        data: the data set, for node ids and adjacency.
        unit: the error's unit, for the colour bar.
        title: the axes title.

    Returns:
        a figure with the map's axes and a colour bar's axes.
    """
    node_error = np.asarray(node_error, dtype=np.float64)
    if node_error.shape != (data.num_nodes,):
        raise ValueError(f"node_error must be ({data.num_nodes},) for {data.name}; got {node_error.shape}")
    adjacency = data.adjacency if data.adjacency is not None else np.zeros((data.num_nodes,) * 2)
    positions = sensor_locations(data.node_ids)
    geographic = positions is not None
    if positions is None:
        positions = graph_layout(adjacency)
    fig = Figure(figsize=(7, 5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    edges = np.argwhere(np.triu((adjacency != 0) | (adjacency.T != 0), 1))
    ax.add_collection(LineCollection(positions[edges], colors="0.8", linewidths=0.6, zorder=1))
    known = ~np.isnan(node_error)
    points = ax.scatter(*positions[known].T, c=node_error[known], cmap="magma_r", s=28, zorder=2)
    if (~known).any():
        ax.scatter(*positions[~known].T, marker="x", color="0.6", s=20, zorder=2, label="never observed")
        ax.legend(fontsize=8)
    fig.colorbar(points, ax=ax, label=title + (f" ({unit})" if unit else ""))
    if geographic:
        ax.set(xlabel="longitude", ylabel="latitude")
    else:
        ax.set(xticks=[], yticks=[], xlabel="graph layout (linked nodes close)")
    ax.set_title(f"{title} on the graph of {data.name}")
    ax.autoscale_view()
    return fig
