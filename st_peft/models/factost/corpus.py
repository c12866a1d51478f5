"""The FactoST pretraining corpus: synthetic, real and mixed univariate windows, streamed and seeded.

Nothing is written to disk. Every batch of windows is a pure function of ``(seed, split, batch
index)``, so a stream restarts anywhere by its batch index alone (resuming a pretraining run needs
no data-loader state) and two processes that draw different indices never see the same window.

A batch holds windows of one context length and one horizon, both drawn per batch:

- the context length is log-uniform in ``[min_context_length, max_context_length]``, or, with
  probability ``long_context_probability``, uniform in its upper half, so long histories are seen
  often enough to be learnt;
- the horizon is uniform in ``[1, max_horizon]``;
- the number of windows keeps the tokens of a batch near ``tokens_per_batch`` (long contexts come
  in small batches), between ``min_batch_size`` and ``max_batch_size``.

Each window is, by the weights ``synthetic_weight`` : ``real_weight`` : ``mixup_weight``,

- **synthetic** (:class:`SyntheticSeriesConfig`): in the manner of Chronos' KernelSynth, a random
  composition of daily and weekly cycles (12 to 1440 steps per day), another periodicity, trend,
  smooth and rough components and noise, joined by sums and products; with what traffic and
  demand data hold: rush-hour peaks or dips, zero-inflated counts, level shifts, spikes, runs of
  missing steps and scattered gaps;
- **real**: a stretch of one series of the real data sets, drawn data set first (each weighs the
  same whatever its number of series), then series, then position;
- **mixup** (TSMixup, Ansari et al. 2024): a convex combination, with Dirichlet weights, of two to
  ``mixup_max_series`` real stretches, each divided by its mean absolute value first.

The real series are split in time: training windows end before the last ``validation_fraction`` of
each series, and validation windows (``split="validation"``) forecast inside it. Synthetic windows
of the validation split come from their own seed stream. A real series that is all missing or
shorter than one patch is skipped and counted in :attr:`PretrainingCorpus.skipped`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import datasets
import numpy as np

SPLITS = {"train": 0, "validation": 1}
"""Seed-stream tag of each split."""


class PretrainingOptionError(ValueError):
    """An option of the corpus, the synthetic generator or the pretraining loop is out of range."""


def check_whole_numbers(options: object, names: Sequence[str], minimum: int) -> None:
    """Refuse any of ``options``' fields ``names`` that is not a whole number >= ``minimum``, naming it."""
    owner = type(options).__name__
    for name in names:
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise PretrainingOptionError(f"{owner}.{name} must be a whole number >= {minimum}, got {value!r}.")


def check_nonnegative_numbers(options: object, names: Sequence[str]) -> None:
    """Refuse any of ``options``' fields ``names`` that is not a finite number >= 0, naming it."""
    owner = type(options).__name__
    for name in names:
        value = getattr(options, name)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
            raise PretrainingOptionError(f"{owner}.{name} must be a finite number >= 0, got {value!r}.")


def check_probability(options: object, name: str) -> None:
    """Refuse ``options``' field ``name`` unless it is a probability in [0, 1], naming it."""
    value = getattr(options, name)
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0.0 <= value <= 1.0):
        raise PretrainingOptionError(f"{type(options).__name__}.{name} must be a probability in [0, 1], got {value!r}.")


def _check_range(owner: str, name: str, value: Sequence[float], low: float, high: float) -> None:
    if (
        len(value) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
        or not low <= value[0] <= value[1] <= high
    ):
        raise PretrainingOptionError(f"{owner}.{name} must be a pair (low, high) with {low} <= low <= high <= {high}, got {value!r}.")


@dataclass(frozen=True)
class SyntheticSeriesConfig:
    """Knobs of the synthetic series generator; every probability is per window.

    Attributes:
        steps_per_day: resolutions a window's daily cycle is drawn from (steps per day).
        harmonics: Fourier harmonics of the daily shape.
        daily_probability: a daily cycle is present.
        weekly_probability: the daily cycle changes on two days of every seven (a weekend).
        rush_hour_probability: two peaks (demand) or dips (speed) a day are added to the daily cycle.
        other_period_probability: a cycle of another period (4 to 500 steps) is present.
        trend_probability: a linear or quadratic trend is present.
        smooth_probability: a smooth random component (random Fourier features of an RBF kernel).
        rough_probability: a rough random component (an AR(1) process).
        multiplicative_probability: the cycle multiplies the other components instead of adding to them.
        noise_scale: range of the Gaussian noise's scale, relative to the signal's spread.
        heavy_tail_probability: the noise is Student-t with 3 degrees of freedom instead of Gaussian.
        count_probability: the window is a count series (Poisson draws of the signal as a rate).
        count_rate: range of the mean rate of a count series.
        zero_inflation_probability: a count series has extra zeros (a share up to 60%).
        nonnegative_probability: a non-count window is clipped at zero (speeds, loads).
        level_shift_probability: up to three level shifts.
        spike_probability: up to five spikes.
        missing_run_probability: one to three runs of missing steps (up to a quarter of the window).
        scattered_missing_probability: scattered missing steps (up to 30%).
    """

    steps_per_day: tuple[int, ...] = (12, 24, 48, 96, 144, 288, 1440)
    harmonics: int = 4
    daily_probability: float = 0.8
    weekly_probability: float = 0.5
    rush_hour_probability: float = 0.3
    other_period_probability: float = 0.3
    trend_probability: float = 0.5
    smooth_probability: float = 0.5
    rough_probability: float = 0.5
    multiplicative_probability: float = 0.3
    noise_scale: tuple[float, float] = (0.01, 0.5)
    heavy_tail_probability: float = 0.2
    count_probability: float = 0.25
    count_rate: tuple[float, float] = (0.2, 50.0)
    zero_inflation_probability: float = 0.3
    nonnegative_probability: float = 0.3
    level_shift_probability: float = 0.2
    spike_probability: float = 0.2
    missing_run_probability: float = 0.2
    scattered_missing_probability: float = 0.2

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not self.steps_per_day or any(
            not isinstance(s, int) or isinstance(s, bool) or not 2 <= s <= 86400 for s in self.steps_per_day
        ):
            raise PretrainingOptionError(f"{owner}.steps_per_day must be whole numbers in [2, 86400], got {self.steps_per_day!r}.")
        if not isinstance(self.harmonics, int) or not 1 <= self.harmonics <= 16:
            raise PretrainingOptionError(f"{owner}.harmonics must be a whole number in [1, 16], got {self.harmonics!r}.")
        for item in fields(self):
            if item.name.endswith("_probability"):
                check_probability(self, item.name)
        _check_range(owner, "noise_scale", self.noise_scale, 0.0, 10.0)
        _check_range(owner, "count_rate", self.count_rate, 1e-3, 1e6)


@dataclass(frozen=True)
class CorpusConfig:
    """How windows are drawn: lengths, batch sizes, the mixture of sources and the seed.

    Attributes:
        max_context_length: longest history of a window (the backbone's ``max_context_length``).
        max_horizon: longest horizon of a window (the backbone's ``max_horizon``).
        min_context_length: shortest history (at least the backbone's patch length).
        long_context_probability: share of batches whose context is uniform in the upper half of
            ``[min_context_length, max_context_length]`` rather than log-uniform over all of it.
        tokens_per_batch: target of ``windows x (context + horizon) / patch_length`` per batch.
        patch_length: steps per token, for ``tokens_per_batch``.
        min_batch_size: fewest windows in a batch.
        max_batch_size: most windows in a batch.
        synthetic_weight: relative share of synthetic windows.
        real_weight: relative share of real windows.
        mixup_weight: relative share of TSMixup windows.
        mixup_max_series: most real stretches in one mixture (at least 2).
        mixup_alpha: concentration of the Dirichlet mixture weights.
        validation_fraction: share at the end of every real series kept for validation windows.
        seed: seed of every draw.
    """

    max_context_length: int = 2048
    max_horizon: int = 64
    min_context_length: int = 8
    long_context_probability: float = 0.25
    tokens_per_batch: int = 4096
    patch_length: int = 8
    min_batch_size: int = 8
    max_batch_size: int = 256
    synthetic_weight: float = 0.5
    real_weight: float = 0.3
    mixup_weight: float = 0.2
    mixup_max_series: int = 3
    mixup_alpha: float = 1.5
    validation_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_whole_numbers(self, ("max_context_length", "max_horizon", "min_context_length", "tokens_per_batch",
                                   "patch_length", "min_batch_size", "max_batch_size", "mixup_max_series"), 1)
        check_whole_numbers(self, ("seed",), 0)
        if self.min_context_length < self.patch_length:
            raise PretrainingOptionError(
                f"{owner}.min_context_length ({self.min_context_length}) must be at least patch_length "
                f"({self.patch_length}): a history shorter than one patch cannot be forecast from."
            )
        if self.max_context_length < self.min_context_length:
            raise PretrainingOptionError(
                f"{owner}.max_context_length ({self.max_context_length}) must be at least min_context_length "
                f"({self.min_context_length})."
            )
        if self.max_batch_size < self.min_batch_size:
            raise PretrainingOptionError(
                f"{owner}.max_batch_size ({self.max_batch_size}) must be at least min_batch_size ({self.min_batch_size})."
            )
        if self.mixup_max_series < 2:
            raise PretrainingOptionError(f"{owner}.mixup_max_series must be at least 2, got {self.mixup_max_series}.")
        check_nonnegative_numbers(self, ("synthetic_weight", "real_weight", "mixup_weight", "mixup_alpha"))
        if self.mixup_alpha <= 0:
            raise PretrainingOptionError(f"{owner}.mixup_alpha must be above 0, got {self.mixup_alpha}.")
        if self.synthetic_weight + self.real_weight + self.mixup_weight <= 0:
            raise PretrainingOptionError(f"{owner}: synthetic_weight, real_weight and mixup_weight are all 0; no window can be drawn.")
        check_probability(self, "long_context_probability")
        if not 0.0 < self.validation_fraction < 1.0:
            raise PretrainingOptionError(f"{owner}.validation_fraction must be in (0, 1), got {self.validation_fraction!r}.")


@dataclass
class RealSeries:
    """One univariate real series.

    Attributes:
        source: the data set it comes from.
        values: ``(T,)`` float32, NaN where missing.
    """

    source: str
    values: np.ndarray


@dataclass
class CorpusBatch:
    """Windows of one context length and one horizon.

    Attributes:
        values: ``(S, context_length + horizon)`` float32, 0 where missing.
        observed: bool, same shape, True where observed.
        context_length: steps of history; the rest of each window is the target.
        horizon: steps of target.
        sources: ``(S,)`` ``"synthetic"``, ``"mixup"`` or the real data set's name.
        index: the batch's index in its stream.
    """

    values: np.ndarray
    observed: np.ndarray
    context_length: int
    horizon: int
    sources: np.ndarray
    index: int


def synthesize(rng: np.random.Generator, size: int, length: int, config: SyntheticSeriesConfig) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``size`` synthetic series of ``length`` steps.

    Args:
        rng: the generator of every draw.
        size: number of series ``S``.
        length: steps ``T`` per series.
        config: the generator's knobs.

    Returns:
        ``values (S, T)`` float64 (0 where missing) and ``observed (S, T)`` bool.
    """
    time = np.arange(length, dtype=np.float64)[None, :] + rng.integers(0, 100_000, size)[:, None]

    def chance(probability: float) -> np.ndarray:
        return (rng.random(size) < probability)[:, None]

    steps_per_day = rng.choice(np.asarray(config.steps_per_day, dtype=np.float64), size)[:, None]
    day_phase = (time % steps_per_day) / steps_per_day
    harmonics = np.arange(1, config.harmonics + 1, dtype=np.float64)
    amplitude = np.abs(rng.normal(size=(size, config.harmonics))) * harmonics[None, :] ** -rng.uniform(0.5, 2.0, (size, 1))
    phase = rng.uniform(0, 2 * np.pi, (size, config.harmonics))
    daily = np.einsum(
        "sk,skt->st", amplitude, np.cos(2 * np.pi * harmonics[None, :, None] * day_phase[:, None, :] + phase[..., None])
    )
    centres = np.stack((rng.uniform(0.28, 0.38, size), rng.uniform(0.68, 0.78, size)), axis=1)
    widths = rng.uniform(0.02, 0.08, (size, 2))
    distance = np.abs(day_phase[:, None, :] - centres[..., None])
    distance = np.minimum(distance, 1.0 - distance)
    rush = (rng.uniform(0.5, 3.0, (size, 2))[..., None] * np.exp(-0.5 * (distance / widths[..., None]) ** 2)).sum(1)
    daily = daily + chance(config.rush_hour_probability) * np.where(chance(0.5), rush, -rush)
    weekend = (np.floor(time / steps_per_day) % 7) >= 5
    daily = np.where(chance(config.weekly_probability) & weekend, daily * rng.uniform(0.0, 0.8, (size, 1)), daily)
    daily = daily * chance(config.daily_probability)

    period = np.exp(rng.uniform(np.log(4), np.log(500), (size, 1)))
    other = rng.normal(size=(size, 1)) * np.cos(2 * np.pi * time / period + rng.uniform(0, 2 * np.pi, (size, 1)))
    cycle = daily + chance(config.other_period_probability) * other

    span = time - time[:, :1]
    unit = span / max(length, 1)
    trend = rng.normal(0, 1, (size, 1)) * unit + chance(0.3) * rng.normal(0, 1, (size, 1)) * unit**2
    # random Fourier features of an RBF kernel: a smooth Gaussian-process-like path in O(T) per series
    lengthscale = np.exp(rng.uniform(np.log(max(length / 50, 2.0)), np.log(max(length, 3.0)), (size, 1, 1)))
    frequencies = rng.normal(size=(size, 8, 1)) / lengthscale
    smooth = (np.cos(frequencies * span[:, None, :] + rng.uniform(0, 2 * np.pi, (size, 8, 1))).sum(1)) / 2.0
    rough = np.empty((size, length))
    coefficient = rng.uniform(0.5, 0.99, size)
    shocks = rng.normal(size=(size, length)) * np.sqrt(1 - coefficient**2)[:, None]
    rough[:, 0] = rng.normal(size=size)
    for step in range(1, length):
        rough[:, step] = coefficient * rough[:, step - 1] + shocks[:, step]
    other_parts = (
        chance(config.trend_probability) * trend
        + chance(config.smooth_probability) * smooth
        + chance(config.rough_probability) * rough * rng.uniform(0.1, 1.0, (size, 1))
    )
    multiplicative = chance(config.multiplicative_probability)
    signal = np.where(multiplicative, (1.0 + 0.5 * np.tanh(cycle)) * (2.0 + other_parts), cycle + other_parts)

    spread = signal.std(axis=1, keepdims=True) + 1e-3
    noise = np.where(chance(config.heavy_tail_probability), rng.standard_t(3, (size, length)), rng.normal(size=(size, length)))
    signal = signal + noise * spread * rng.uniform(*config.noise_scale, (size, 1))

    shifts = np.zeros((size, length))
    for _ in range(3):
        at = rng.integers(0, length, (size, 1))
        shifts += (rng.random((size, 1)) < 0.5) * (span >= at) * rng.normal(0, 2, (size, 1))
    signal = signal + chance(config.level_shift_probability) * shifts * spread

    standardised = (signal - signal.mean(axis=1, keepdims=True)) / (signal.std(axis=1, keepdims=True) + 1e-6)
    rate = np.exp(np.clip(standardised * rng.uniform(0.2, 1.0, (size, 1)), -10, 10))
    rate = rate / rate.mean(axis=1, keepdims=True) * np.exp(rng.uniform(*np.log(config.count_rate), (size, 1)))
    counts = rng.poisson(rate).astype(np.float64)
    counts = np.where(chance(config.zero_inflation_probability) & (rng.random((size, length)) < rng.uniform(0, 0.6, (size, 1))),
                      0.0, counts)
    level = rng.normal(0, 5, (size, 1)) * spread
    scale = np.exp(rng.uniform(np.log(0.01), np.log(1000.0), (size, 1)))
    continuous = (signal + level) * scale / spread
    # a clipped series is first shifted so that only its lowest 0-30% of values reach zero, never all of them
    clipped = np.flatnonzero(rng.random(size) < config.nonnegative_probability)
    position = (rng.uniform(0.0, 0.3, len(clipped)) * (length - 1)).astype(int)
    floor = np.partition(continuous[clipped], position, axis=1)[np.arange(len(clipped)), position]
    continuous[clipped] = np.maximum(continuous[clipped] - floor[:, None], 0.0)
    values = np.where(chance(config.count_probability), counts, continuous)

    spikes = (rng.random((size, length)) < rng.uniform(0, 5, (size, 1)) / length) & chance(config.spike_probability)
    values = np.where(spikes, values + np.abs(values).mean(axis=1, keepdims=True) * rng.uniform(3, 10, (size, 1)) + 1.0,
                      values)

    observed = np.ones((size, length), dtype=bool)
    runs = chance(config.missing_run_probability)
    for _ in range(3):
        start = rng.integers(0, length, (size, 1))
        run_length = rng.integers(1, max(length // 4, 2), (size, 1))
        observed &= ~(runs & (rng.random((size, 1)) < 0.6) & (span >= start) & (span < start + run_length))
    observed &= ~(chance(config.scattered_missing_probability) & (rng.random((size, length)) < rng.uniform(0, 0.3, (size, 1))))
    return np.where(observed, values, 0.0), observed


class PretrainingCorpus:
    """A seeded stream of pretraining batches, synthetic, real and mixed (see the module docstring).

    Args:
        config: lengths, batch sizes, mixture weights and seed.
        real_series: the real series; without any, ``real_weight`` and ``mixup_weight`` must be 0.
        synthetic: the synthetic generator's knobs.
    """

    def __init__(
        self,
        config: CorpusConfig,
        real_series: Sequence[RealSeries] = (),
        synthetic: SyntheticSeriesConfig | None = None,
    ):
        self.config = config
        self.synthetic = synthetic or SyntheticSeriesConfig()
        self.skipped: dict[str, int] = {}
        self.series: dict[str, list[np.ndarray]] = {}
        for series in real_series:
            values = np.asarray(series.values, dtype=np.float32)
            if values.ndim != 1 or len(values) < config.patch_length or not np.isfinite(values).any():
                self.skipped[series.source] = self.skipped.get(series.source, 0) + 1
                continue
            self.series.setdefault(series.source, []).append(values)
        if not self.series and (config.real_weight > 0 or config.mixup_weight > 0):
            raise PretrainingOptionError(
                "the pretraining corpus has no usable real series (all were missing, too short, or none was given); "
                "give some or set real_weight and mixup_weight to 0."
            )
        self.sources = sorted(self.series)

    @property
    def num_series(self) -> int:
        """Number of usable real series."""
        return sum(len(series) for series in self.series.values())

    def batch(self, index: int, split: str = "train") -> CorpusBatch:
        """The batch ``index`` of ``split`` (``"train"`` or ``"validation"``), the same on every call."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"a batch index is a whole number >= 0, got {index!r}.")
        config = self.config
        rng = np.random.default_rng([config.seed, SPLITS[split], int(index)])
        low, high = config.min_context_length, config.max_context_length
        if rng.random() < config.long_context_probability:
            context = int(rng.integers((low + high) // 2, high + 1))
        else:
            context = int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
        horizon = int(rng.integers(1, config.max_horizon + 1))
        length = context + horizon
        tokens = -(-context // config.patch_length) + -(-horizon // config.patch_length)
        size = int(np.clip(config.tokens_per_batch // tokens, config.min_batch_size, config.max_batch_size))
        weights = np.array([config.synthetic_weight, config.real_weight if self.series else 0.0,
                            config.mixup_weight if self.series else 0.0])
        kind = rng.choice(3, size=size, p=weights / weights.sum())
        values = np.zeros((size, length), dtype=np.float32)
        observed = np.zeros((size, length), dtype=bool)
        sources = np.empty(size, dtype=object)
        synthetic = np.flatnonzero(kind == 0)
        if len(synthetic):
            drawn, drawn_observed = synthesize(rng, len(synthetic), length, self.synthetic)
            values[synthetic], observed[synthetic] = drawn, drawn_observed
            sources[synthetic] = "synthetic"
        for row in np.flatnonzero(kind == 1):
            source, stretch = self._real_stretch(rng, length, horizon, split)
            values[row], observed[row], sources[row] = np.nan_to_num(stretch), np.isfinite(stretch), source
        for row in np.flatnonzero(kind == 2):
            stretch = self._mixup(rng, length, horizon, split)
            values[row], observed[row], sources[row] = np.nan_to_num(stretch), np.isfinite(stretch), "mixup"
        return CorpusBatch(values, observed, context, horizon, sources.astype(str), int(index))

    def batches(self, start: int = 0, split: str = "train") -> Iterator[CorpusBatch]:
        """Batches ``start, start + 1, ...`` of ``split``, without end."""
        index = start
        while True:
            yield self.batch(index, split)
            index += 1

    def _real_stretch(self, rng: np.random.Generator, length: int, horizon: int, split: str) -> tuple[str, np.ndarray]:
        """``length`` steps of one real series, NaN-padded on the left where the series is shorter."""
        source = self.sources[rng.integers(len(self.sources))]
        series = self.series[source][rng.integers(len(self.series[source]))]
        boundary = int(len(series) * (1.0 - self.config.validation_fraction))
        if split == "train":
            # the target ends at the boundary at the latest and follows at least one patch of history
            first, last = min(self.config.patch_length + horizon, boundary), boundary
        else:
            # the whole target lies in the held-out tail where the tail is long enough for it
            first, last = min(boundary + horizon, len(series)), len(series)
        end = int(rng.integers(first, last + 1))
        stretch = series[max(0, end - length) : end]
        if len(stretch) < length:
            stretch = np.concatenate((np.full(length - len(stretch), np.nan, dtype=np.float32), stretch))
        return source, stretch

    def _mixup(self, rng: np.random.Generator, length: int, horizon: int, split: str) -> np.ndarray:
        """A convex combination of 2 to ``mixup_max_series`` real stretches, each mean-scaled first."""
        count = int(rng.integers(2, self.config.mixup_max_series + 1))
        weights = rng.dirichlet(np.full(count, self.config.mixup_alpha))
        mixed = np.zeros(length, dtype=np.float64)
        for weight in weights:
            _, stretch = self._real_stretch(rng, length, horizon, split)
            scale = np.nanmean(np.abs(stretch)) if np.isfinite(stretch).any() else 1.0
            mixed = mixed + weight * stretch / (scale if scale > 0 else 1.0)
        return mixed.astype(np.float32)

    def as_iterable_dataset(self, start: int = 0, split: str = "train") -> datasets.IterableDataset:
        """The stream as a ``datasets.IterableDataset``, one row per window, from batch ``start`` on.

        Columns: ``past_values`` / ``past_observed_mask`` (the history), ``future_values`` /
        ``future_observed_mask`` (the target), ``source`` and ``batch_index`` (the windows of one
        batch share their lengths; resuming from batch ``b`` is ``as_iterable_dataset(start=b)``).
        """
        return datasets.IterableDataset.from_generator(
            _window_rows, gen_kwargs={"corpus": self, "start": start, "split": split}
        )

    def describe(self) -> dict:
        """The corpus's settings, real sources with their series counts, and skipped series."""
        return {
            "corpus": asdict(self.config),
            "synthetic": asdict(self.synthetic),
            "real_sources": {source: len(series) for source, series in self.series.items()},
            "skipped_series": dict(self.skipped),
        }


def _window_rows(corpus: PretrainingCorpus, start: int, split: str) -> Iterator[dict]:
    for batch in corpus.batches(start, split):
        context = batch.context_length
        for row in range(len(batch.values)):
            yield {
                "past_values": batch.values[row, :context],
                "past_observed_mask": batch.observed[row, :context],
                "future_values": batch.values[row, context:],
                "future_observed_mask": batch.observed[row, context:],
                "source": batch.sources[row],
                "batch_index": batch.index,
            }


def read_real_series(names: Sequence[str | Path]) -> list[RealSeries]:
    """Every (node, channel) series of the named data sets.

    Args:
        names: built-in data set names (``"nyc-taxi"``, ``"etth1"``, ``"chickenpox"``, ...), files
            that ``st_peft.data.load`` reads, or CSV files of dated columns (a ``date`` column, then
            one numeric column per series, as the exchange-rate and influenza files); a CSV that
            ``load`` cannot place in time is read as plain columns.

    Returns:
        The series, NaN where missing, each named by its data set (the file's stem for files).
    """
    from st_peft.data import load
    from st_peft.data.errors import DataError

    series = []
    for name in names:
        path = Path(name)
        source = path.stem if path.suffix else str(name)
        try:
            data = load(name)
            values = np.where(data.mask, data.values, np.nan).astype(np.float32)
        except DataError:
            if path.suffix != ".csv":
                raise
            values = _csv_columns(path)[:, :, None]
        for node in range(values.shape[1]):
            for channel in range(values.shape[2]):
                series.append(RealSeries(source, values[:, node, channel]))
    return series


def _csv_columns(path: Path) -> np.ndarray:
    """``(T, K)`` float32 of a CSV's numeric columns (dates and text columns left out), NaN where empty."""
    import pandas as pd

    from st_peft.data.errors import DataError

    frame = pd.read_csv(path)
    numeric = frame.select_dtypes(include="number")
    if numeric.shape[1] == 0:
        raise DataError(f"{path} has no numeric column to pretrain on.")
    return numeric.to_numpy(dtype=np.float32)


__all__ = [
    "CorpusBatch",
    "CorpusConfig",
    "PretrainingOptionError",
    "PretrainingCorpus",
    "RealSeries",
    "SyntheticSeriesConfig",
    "read_real_series",
    "synthesize",
]
