"""Forecasting windows over an `STData`: splits, few-shot, and a collator that gathers batches.

Windows are never materialised. Each split is a ``datasets.Dataset`` with one column,
``start``, the first step of a window of ``input_len + horizon`` steps; the collator
gathers a whole batch of windows from strided window views of the numpy arrays with one
index per array, about a hundred times faster than indexing torch tensors window by window.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import datasets
import numpy as np
import torch

from st_peft.data.container import STData
from st_peft.data.errors import DataError
from st_peft.data.missing_inputs import MEAN, treat_missing_inputs
from st_peft.data.scaler import StandardScaler

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class WindowCollator:
    """Turns rows ``{"start": s}`` into a batch dict of transformers' time-series names.

    Values stay in original units: every st-peft model scales its inputs itself.

    Attributes:
        inputs: float32 ``(T, N, C_in)`` in original units, missing entries 0.
        input_mask: bool ``(T, N, C_in)``, True where the input was observed.
        targets: float32 ``(T, N, C_out)`` in original units, missing entries 0.
        target_mask: bool ``(T, N, C_out)``, True where observed.
        calendar: int64 ``(T, 2)``: time-of-day slot, day of week.
        input_len: L.
        horizon: H.
    """

    inputs: np.ndarray
    input_mask: np.ndarray
    targets: np.ndarray
    target_mask: np.ndarray
    calendar: np.ndarray
    input_len: int
    horizon: int

    def __post_init__(self) -> None:
        # windows are contiguous runs of time steps: gathering rows of these strided views
        # copies one block per window, about a third faster than a (B, L) fancy index
        past = (("past_values", self.inputs), ("past_observed_mask", self.input_mask),
                ("past_time_features", self.calendar))
        future = (("future_values", self.targets), ("future_observed_mask", self.target_mask),
                  ("future_time_features", self.calendar))
        self._views = {key: _window_view(array, 0, self.input_len) for key, array in past}
        self._views.update({key: _window_view(array, self.input_len, self.horizon) for key, array in future})

    def __getstate__(self) -> dict:
        # a pickled strided view would be materialised (L or H times the data): rebuild the views instead
        return {key: value for key, value in self.__dict__.items() if key != "_views"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Collate rows of a split into a batch (the ``data_collator`` of a Trainer)."""
        if rows and "start" not in rows[0]:
            raise DataError(
                f"the collator needs rows with a 'start' column (window starts); got keys {sorted(rows[0])}. "
                "With transformers.Trainer set TrainingArguments(remove_unused_columns=False): the batch "
                "is built by the collator, not read from the data set's columns"
            )
        return self.gather(np.fromiter((row["start"] for row in rows), dtype=np.int64, count=len(rows)))

    def gather(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        """Gather the windows that begin at ``starts`` ``(B,)``.

        Returns:
            ``past_values`` and ``past_observed_mask`` ``(B, L, N, C_in)``, ``future_values`` and
            ``future_observed_mask`` ``(B, H, N, C_out)``, ``past_time_features`` ``(B, L, 2)``,
            ``future_time_features`` ``(B, H, 2)``.
        """
        starts = np.asarray(starts, dtype=np.int64)
        windows = len(self._views["future_values"])
        if starts.size and (starts.min() < 0 or starts.max() >= windows):
            raise DataError(
                f"window starts must lie in [0, {windows}) for {self.input_len} + {self.horizon} "
                f"steps of a {len(self.inputs)}-step series; got {starts.min()} to {starts.max()}"
            )
        return {key: torch.from_numpy(view[starts]) for key, view in self._views.items()}


def _window_view(array: np.ndarray, offset: int, length: int) -> np.ndarray:
    """Read-only view ``(T - offset - length + 1, length, ...)`` whose row ``s`` is
    ``array[offset + s : offset + s + length]`` (no copy)."""
    tail = array[offset:]
    return np.lib.stride_tricks.as_strided(
        tail, shape=(max(0, len(tail) - length + 1), length, *tail.shape[1:]), strides=(tail.strides[0], *tail.strides),
        writeable=False,
    )


@dataclass
class ForecastingSplits:
    """Train / validation / test windows of one data set and everything needed to use them.

    Attributes:
        data: the source data set.
        train, val, test: ``datasets.Dataset`` of window starts (column ``start``).
        collator: gathers a batch (in original units) from rows of any split.
        scaler: per-channel statistics of every channel of ``data``, fitted on the observed
            values of the training span only; :meth:`model_kwargs` hands them to a model, which
            scales inside.
        input_len, horizon: L and H.
        input_channels, target_channels: channel indices of ``data`` used as x and y.
        missing_inputs: how missing inputs reach the model (:mod:`st_peft.data.missing_inputs`).
        mask_channels: channel indices of ``data`` whose observed mask the model reads as one more input
            channel each, after ``input_channels`` (``mask-channel``).
        input_statistics: the training span's statistics of the inputs as the model reads them, when
            ``missing_inputs`` changes them; None: ``scaler``'s of ``input_channels``.
    """

    data: STData
    train: datasets.Dataset
    val: datasets.Dataset
    test: datasets.Dataset
    collator: WindowCollator
    scaler: StandardScaler
    input_len: int
    horizon: int
    input_channels: list[int]
    target_channels: list[int]
    missing_inputs: str = MEAN
    mask_channels: list[int] = field(default_factory=list)
    input_statistics: StandardScaler | None = None

    @property
    def num_nodes(self) -> int:
        """N."""
        return self.data.num_nodes

    @property
    def in_channels(self) -> int:
        """C_in: the input channels, and one per mask channel."""
        return len(self.input_channels) + len(self.mask_channels)

    @property
    def out_channels(self) -> int:
        """C_out."""
        return len(self.target_channels)

    @property
    def steps_per_day(self) -> int:
        """Time steps per day of the data."""
        return self.data.steps_per_day

    @property
    def adjacency(self) -> np.ndarray | None:
        """float32 ``(N, N)`` adjacency of the data, or None."""
        return self.data.adjacency

    def size_kwargs(self) -> dict[str, int]:
        """The sizes every forecaster and adapter config of this data takes.

        ``num_nodes``, ``input_len``, ``horizon``, ``in_channels``, ``out_channels``.
        """
        return {
            "num_nodes": self.num_nodes,
            "input_len": self.input_len,
            "horizon": self.horizon,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
        }

    def scaling_statistics(self) -> dict[str, list[list[float]]]:
        """The training span's ``loc`` / ``scale`` per node and channel, the ``scaling`` a model carries.

        Returns:
            ``past_loc`` / ``past_scale`` ``(N, C_in)`` and ``future_loc`` / ``future_scale``
            ``(N, C_out)`` as nested lists (one value per channel, repeated for every node:
            the BasicTS convention of a scaler shared by all nodes).
        """
        def per_node(values: np.ndarray, channels: list[int]) -> list[list[float]]:
            return np.broadcast_to(values[channels], (self.num_nodes, len(channels))).tolist()

        if self.input_statistics is None:
            past_loc = per_node(self.scaler.mean, self.input_channels)
            past_scale = per_node(self.scaler.std, self.input_channels)
        else:
            every = list(range(self.in_channels))
            past_loc = per_node(self.input_statistics.mean, every)
            past_scale = per_node(self.input_statistics.std, every)
        return {
            "past_loc": past_loc,
            "past_scale": past_scale,
            "future_loc": per_node(self.scaler.mean, self.target_channels),
            "future_scale": per_node(self.scaler.std, self.target_channels),
        }

    def model_kwargs(self) -> dict:
        """The constructor arguments every forecaster of this data takes: :meth:`size_kwargs` and ``scaling``.

        A model built with them scales its inputs with the training span's statistics and
        forecasts in original units.
        """
        return {**self.size_kwargs(), "scaling": self.scaling_statistics()}

    def split(self, name: str) -> datasets.Dataset:
        """The split called ``name`` (train, val or test)."""
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split '{name}': use one of {SPLIT_NAMES}")
        return getattr(self, name)

    def iter_batches(self, name: str, batch_size: int = 64) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the batches of a split in order, for evaluation and plotting."""
        starts = np.asarray(self.split(name)["start"], dtype=np.int64)
        for begin in range(0, len(starts), batch_size):
            yield self.collator.gather(starts[begin : begin + batch_size])


def build_splits(
    data: STData,
    input_len: int = 12,
    horizon: int = 12,
    ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
    index_file: str | Path | None = None,
    few_shot: float = 1.0,
    input_channels: Sequence[int] | None = None,
    target_channels: Sequence[int] | None = None,
    missing_inputs: str = MEAN,
) -> ForecastingSplits:
    """Cut ``data`` into chronological train / validation / test windows.

    With ``ratios`` the time axis is cut in three spans; a window belongs to the span its
    target lies in (its history may reach back into the span before). With ``index_file``
    the windows are read from an ``.npz`` holding ``train``/``val``/``test`` arrays of
    ``(start, split, end)`` rows (the STAEformer layout); each split's windows must start in
    increasing order, every validation window after the last training one and every test
    window after the last validation one (neighbouring windows share steps, as in
    STAEformer's own files), and none may start before step 0 or end beyond the series.
    ``few_shot`` keeps the most recent fraction of the training windows, as a new city would have them; the scaler is fitted
    on the observed values of the training steps those windows cover, never beyond, and handed
    to models through :meth:`ForecastingSplits.model_kwargs`; batches stay in original units.

    Args:
        data: the data set ``(T, N, C)``.
        input_len: L, history steps of a window.
        horizon: H, future steps of a window.
        ratios: train, validation, test fractions of the time axis.
        index_file: an index ``.npz`` used instead of ``ratios``.
        few_shot: fraction in ``(0, 1]`` of training windows kept.
        input_channels: channels of ``data`` fed to the model (all by default).
        target_channels: channels to forecast (all by default).
        missing_inputs: how missing inputs reach the model: ``mean`` (the training mean, as ever),
            ``carry-forward`` or ``mask-channel`` (:mod:`st_peft.data.missing_inputs`).

    Returns:
        The splits, the collator and the training span's statistics.
    """
    if input_len < 1 or horizon < 1:
        raise DataError(f"input_len and horizon must be >= 1, got {input_len} and {horizon}")
    if not 0.0 < few_shot <= 1.0:
        raise DataError(f"few_shot must be in (0, 1], got {few_shot}")
    input_channels = _channels(input_channels, data)
    target_channels = _channels(target_channels, data)
    if index_file is not None:
        starts = _starts_from_index(Path(index_file), data.num_steps, input_len, horizon)
    else:
        starts = _starts_from_ratios(ratios, data.num_steps, input_len, horizon, data.name)
    kept = max(1, math.ceil(few_shot * len(starts["train"])))
    starts["train"] = starts["train"][-kept:]
    fit_span = slice(int(starts["train"][0]), int(starts["train"][-1]) + input_len + horizon)
    refuse_dominant_values(data, fit_span)
    scaler = StandardScaler.fit(data.values[fit_span], data.mask[fit_span])
    inputs = np.ascontiguousarray(data.values[..., input_channels])
    input_mask = np.ascontiguousarray(data.mask[..., input_channels])
    treated = None
    if missing_inputs != MEAN:
        treated = treat_missing_inputs(inputs, input_mask, scaler.select(input_channels), missing_inputs, fit_span)
        inputs, input_mask = treated.values, treated.mask
    collator = WindowCollator(
        inputs=inputs,
        input_mask=input_mask,
        targets=np.ascontiguousarray(data.values[..., target_channels]),
        target_mask=np.ascontiguousarray(data.mask[..., target_channels]),
        calendar=data.calendar(),
        input_len=input_len,
        horizon=horizon,
    )
    split_sets = {name: datasets.Dataset.from_dict({"start": starts[name]}) for name in SPLIT_NAMES}
    return ForecastingSplits(
        data=data,
        collator=collator,
        scaler=scaler,
        input_len=input_len,
        horizon=horizon,
        input_channels=input_channels,
        target_channels=target_channels,
        missing_inputs=missing_inputs,
        mask_channels=[] if treated is None else [input_channels[c] for c in treated.mask_channels],
        input_statistics=None if treated is None else treated.statistics,
        **split_sets,
    )


DOMINANT_DEVIATIONS = 1e6
"""A value this many robust deviations from its channel's median would dominate the scaler: it is refused."""


def refuse_dominant_values(data: STData, span: slice) -> None:
    """Refuse an observed value of ``data.values[span]`` that would dominate the scaler fitted on it.

    A value more than :data:`DOMINANT_DEVIATIONS` robust deviations (the median absolute deviation,
    or the mean one where most values are equal) from its channel's median sets the channel's
    standard deviation by itself and scales every other value to about 0.

    Raises:
        DataError: naming the step (and time), node, channel and value.
    """
    values, mask = data.values[span], data.mask[span]
    for channel in range(data.num_channels):
        observed = values[..., channel][mask[..., channel]].astype(np.float64)
        if observed.size == 0:
            continue
        median = np.median(observed)
        deviation = np.abs(observed - median)
        robust = np.median(deviation) or deviation.mean()
        if robust == 0 or deviation.max() <= DOMINANT_DEVIATIONS * robust:
            continue
        where = mask[..., channel] & (np.abs(values[..., channel].astype(np.float64) - median)
                                      > DOMINANT_DEVIATIONS * robust)
        step, node = (int(i) for i in np.argwhere(where)[0])
        step += span.start or 0
        when = f"step {step}" + ("" if data.timestamps is None else f" ({str(data.timestamps[step])[:19]})")
        raise DataError(
            f"{data.name}: value {data.values[step, node, channel]:.3g} at {when}, node '{data.node_ids[node]}', "
            f"channel '{data.channel_names[channel]}' is {np.abs(data.values[step, node, channel] - median) / robust:.2g} "
            f"robust deviations from the median {median:.4g} of the training span: it would dominate the scaling of "
            "every node; correct it or mark it missing"
        )


def _channels(channels: Sequence[int] | None, data: STData) -> list[int]:
    if channels is None:
        return list(range(data.num_channels))
    channels = [int(c) for c in channels]
    bad = [c for c in channels if not 0 <= c < data.num_channels]
    if bad or not channels:
        raise DataError(f"{data.name}: channels {channels} out of range for {data.num_channels} channels")
    return channels


def _starts_from_ratios(
    ratios: tuple[float, float, float], num_steps: int, input_len: int, horizon: int, name: str
) -> dict[str, np.ndarray]:
    if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1.0) > 1e-6:
        raise DataError(f"ratios must be three positive fractions summing to 1, got {ratios}")
    window = input_len + horizon
    train_end = round(num_steps * ratios[0])
    val_end = train_end + round(num_steps * ratios[1])
    bounds = {
        "train": (0, train_end - window),
        "val": (train_end - input_len, val_end - window),
        "test": (val_end - input_len, num_steps - window),
    }
    starts = {}
    for split, (first, last) in bounds.items():
        if first < 0 or last < first:
            raise DataError(
                f"{name}: a window of {input_len} + {horizon} steps does not fit the {split} span "
                f"of a series of {num_steps} steps split {ratios}"
            )
        starts[split] = np.arange(first, last + 1, dtype=np.int64)
    return starts


def _starts_from_index(path: Path, num_steps: int, input_len: int, horizon: int) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"index file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            raw = {split: np.asarray(archive[split]) for split in SPLIT_NAMES}
    except KeyError as error:
        raise DataError(f"{path}: an index file needs arrays {SPLIT_NAMES} ({error})") from error
    except Exception as error:
        raise DataError(f"corrupt index file {path}: {error}") from error
    starts = {}
    for split, rows in raw.items():
        if rows.ndim != 2 or rows.shape[1] != 3 or len(rows) == 0:
            raise DataError(f"{path}: '{split}' must be a non-empty (n, 3) array, got {rows.shape}")
        if rows.dtype.kind not in "iu":
            raise DataError(f"{path}: '{split}' holds {rows.dtype} values; window steps must be integers")
        rows = rows.astype(np.int64)
        if not ((rows[:, 1] - rows[:, 0] == input_len).all() and (rows[:, 2] - rows[:, 1] == horizon).all()):
            raise DataError(f"{path}: '{split}' windows are not {input_len} in and {horizon} out")
        negative = np.flatnonzero(rows[:, 0] < 0)
        if negative.size:
            row = int(negative[0])
            raise DataError(f"{path}: '{split}' window {row} starts at step {rows[row, 0]}; starts must be >= 0")
        beyond = np.flatnonzero(rows[:, 2] > num_steps)
        if beyond.size:
            row = int(beyond[0])
            raise DataError(
                f"{path}: '{split}' window {row} ends at step {rows[row, 2]}, beyond the {num_steps}-step series"
            )
        unordered = np.flatnonzero(np.diff(rows[:, 0]) <= 0)
        if unordered.size:
            row = int(unordered[0]) + 1
            raise DataError(
                f"{path}: '{split}' window {row} starts at step {rows[row, 0]}, not after window {row - 1} "
                f"(step {rows[row - 1, 0]}); the windows of a split must be in time order without repeats"
            )
        starts[split] = rows[:, 0]
    for earlier, later in pairwise(SPLIT_NAMES):
        if starts[later][0] <= starts[earlier][-1]:
            raise DataError(
                f"{path}: '{later}' window 0 starts at step {starts[later][0]}, not after the last '{earlier}' "
                f"window (step {starts[earlier][-1]}); train, val and test windows must follow each other "
                "in time without overlapping"
            )
    return starts
