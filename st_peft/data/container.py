"""`STData`: the one in-memory container of a spatio-temporal data set."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from st_peft.data.errors import DataError

MINUTES_PER_DAY = 1440
SECONDS_PER_DAY = 86400
# a step this many times the typical step is a gap (daily and coarser data keep calendar
# months of 28 to 31 days below it)
GAP_FACTOR = 1.5


@dataclass
class STData:
    """Values of N nodes over T time steps, with what is needed to forecast them.

    Attributes:
        values: float32 ``(T, N, C)``; missing entries hold 0.
        mask: bool ``(T, N, C)``, True where the value was observed.
        steps_per_day: time steps in one day (288 for 5 minutes; 1 for daily or coarser data).
        name: the data set's name.
        timestamps: datetime64[ns] ``(T,)``, or None when only the step length is known.
        start_day_of_week: day of week (Monday = 0) of step 0 when ``timestamps`` is None.
        adjacency: float32 ``(N, N)`` weighted or binary adjacency, or None.
        node_ids: one id per node; defaults to ``"0" .. "N-1"``.
        channel_names: one name per channel; defaults to ``"c0" ..``.

    Refused at construction, each naming the first offending step, node and channel (or index):
    an observed value that is NaN or inf, or that overflows float32 (1e39 in float64 input);
    ``steps_per_day`` that is not a whole number in ``[1, 86400]``; timestamps that repeat, go
    backwards, or leave a gap (a step over 1.5 times the median step). Gaps are refused rather
    than bridged so that no window spans one: insert the missing steps as missing values.
    """

    values: np.ndarray
    mask: np.ndarray
    steps_per_day: int
    name: str = "data"
    timestamps: np.ndarray | None = None
    start_day_of_week: int = 0
    adjacency: np.ndarray | None = None
    node_ids: list[str] = field(default_factory=list)
    channel_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        values = np.asarray(self.values)
        if values.ndim != 3:
            raise DataError(f"{self.name}: values must be (T, N, C), got shape {values.shape}")
        mask = np.asarray(self.mask, dtype=bool)
        if mask.shape != values.shape:
            raise DataError(f"{self.name}: mask shape {mask.shape} differs from values shape {values.shape}")
        t, n, c = values.shape
        self.steps_per_day = checked_steps_per_day(self.steps_per_day, self.name)
        if self.timestamps is not None:
            self.timestamps = np.asarray(self.timestamps, dtype="datetime64[ns]")
            if self.timestamps.shape != (t,):
                raise DataError(f"{self.name}: {self.timestamps.shape[0]} timestamps for {t} time steps")
            _check_regular(self.timestamps, self.name)
        self.node_ids = [str(i) for i in self.node_ids] or [str(i) for i in range(n)]
        if len(self.node_ids) != n:
            raise DataError(f"{self.name}: {len(self.node_ids)} node ids for {n} nodes")
        self.channel_names = list(self.channel_names) or [f"c{i}" for i in range(c)]
        if len(self.channel_names) != c:
            raise DataError(f"{self.name}: {len(self.channel_names)} channel names for {c} channels")
        non_finite = mask & ~np.isfinite(values)
        if non_finite.any():
            raise DataError(
                f"{self.name}: NaN or inf at {self._position(non_finite)}, an observed position; "
                "mark it missing in `mask` or use a reader that treats it as missing"
            )
        # a float64 value beyond float32's range is finite here but inf once stored: a model
        # trained on it learns NaN
        if values.dtype.kind == "f" and values.dtype.itemsize > 4:
            too_large = mask & (np.abs(values) > np.finfo(np.float32).max)
            if too_large.any():
                first = tuple(np.argwhere(too_large)[0])
                raise DataError(
                    f"{self.name}: value {values[first]:.3g} at {self._position(too_large)} overflows float32 "
                    f"(largest {np.finfo(np.float32).max:.3g}); rescale the data or mark the value missing"
                )
        self.values = np.where(mask, values, 0).astype(np.float32)
        self.mask = mask
        if self.adjacency is not None:
            self.adjacency = np.ascontiguousarray(self.adjacency, dtype=np.float32)
            if self.adjacency.shape != (n, n):
                raise DataError(f"{self.name}: adjacency is {self.adjacency.shape} but the data has {n} nodes")
            if not np.isfinite(self.adjacency).all():
                raise DataError(f"{self.name}: adjacency holds NaN or inf")

    def _position(self, where: np.ndarray) -> str:
        """The first True entry of a ``(T, N, C)`` bool array, as step (and time), node and channel."""
        step, node, channel = (int(i) for i in np.argwhere(where)[0])
        when = f"step {step}" if self.timestamps is None else f"step {step} ({self.timestamps[step]})"
        return f"{when}, node '{self.node_ids[node]}', channel '{self.channel_names[channel]}'"

    @property
    def num_steps(self) -> int:
        """T, the number of time steps."""
        return self.values.shape[0]

    @property
    def num_nodes(self) -> int:
        """N, the number of nodes."""
        return self.values.shape[1]

    @property
    def num_channels(self) -> int:
        """C, the number of channels."""
        return self.values.shape[2]

    def calendar(self) -> np.ndarray:
        """Calendar features of every step.

        Returns:
            int64 ``(T, 2)``: time-of-day slot in ``[0, steps_per_day)`` and day of week in ``[0, 7)``.
        """
        if self.timestamps is not None:
            stamps = pd.DatetimeIndex(self.timestamps)
            minutes = stamps.hour * 60 + stamps.minute
            slot = (np.asarray(minutes) * self.steps_per_day) // MINUTES_PER_DAY
            day = np.asarray(stamps.dayofweek)
        else:
            steps = np.arange(self.num_steps)
            slot = steps % self.steps_per_day
            day = (steps // self.steps_per_day + self.start_day_of_week) % 7
        return np.stack([slot, day], axis=-1).astype(np.int64)

    def select_nodes(self, node_index: np.ndarray) -> STData:
        """Return a copy restricted to the nodes ``node_index`` (int array), adjacency included."""
        node_index = np.asarray(node_index, dtype=np.int64)
        adjacency = None if self.adjacency is None else self.adjacency[np.ix_(node_index, node_index)]
        return STData(
            values=self.values[:, node_index],
            mask=self.mask[:, node_index],
            steps_per_day=self.steps_per_day,
            name=self.name,
            timestamps=self.timestamps,
            start_day_of_week=self.start_day_of_week,
            adjacency=adjacency,
            node_ids=[self.node_ids[i] for i in node_index],
            channel_names=self.channel_names,
        )

    def to_hf_dataset(self):
        """Convert to a ``datasets.Dataset`` with one row per time step.

        Columns: ``values`` and ``mask`` (each ``(N, C)`` per row) and, when known,
        ``timestamp``. Graph and metadata travel as JSON in ``info.description``, so the
        data set can be pushed to and pulled from the Hub whole.
        """
        import datasets

        t, n, c = self.values.shape
        columns = {
            "values": self.values,
            "mask": self.mask,
        }
        features = {
            "values": datasets.Array2D(shape=(n, c), dtype="float32"),
            "mask": datasets.Array2D(shape=(n, c), dtype="bool"),
        }
        if self.timestamps is not None:
            columns["timestamp"] = self.timestamps.astype("datetime64[ns]")
            features["timestamp"] = datasets.Value("timestamp[ns]")
        metadata = {
            "st_peft": {
                "name": self.name,
                "steps_per_day": self.steps_per_day,
                "start_day_of_week": self.start_day_of_week,
                "node_ids": self.node_ids,
                "channel_names": self.channel_names,
                "adjacency": None if self.adjacency is None else self.adjacency.tolist(),
            }
        }
        dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        dataset.info.description = json.dumps(metadata)
        return dataset

    @classmethod
    def from_hf_dataset(cls, dataset, name: str | None = None, steps_per_day: int | None = None) -> STData:
        """Build from a ``datasets.Dataset`` made by :meth:`to_hf_dataset` (or shaped like one).

        ``Dataset.push_to_hub`` keeps the columns but not the st-peft metadata (graph, ids,
        steps per day) that :meth:`to_hf_dataset` stores in ``info.description``; ``save_to_disk``
        keeps both. Without metadata the steps per day come from the timestamps.

        Args:
            dataset: rows of ``values`` ``(N, C)``, optional ``mask`` and ``timestamp``.
            name: overrides the stored name.
            steps_per_day: overrides the stored value; required when the data set carries neither
                st-peft metadata nor timestamps.
        """
        try:
            metadata = json.loads(dataset.info.description or "{}").get("st_peft", {})
        except json.JSONDecodeError:
            metadata = {}
        if "values" not in dataset.column_names:
            raise DataError(f"the dataset has no 'values' column (columns: {dataset.column_names})")
        table = dataset.with_format("numpy")
        values = np.asarray(table["values"][:], dtype=np.float32)
        if values.ndim == 2:
            values = values[..., None]
        mask = (
            np.asarray(table["mask"][:], dtype=bool).reshape(values.shape)
            if "mask" in dataset.column_names
            else np.isfinite(values)
        )
        timestamps = np.asarray(table["timestamp"][:]) if "timestamp" in dataset.column_names else None
        spd = steps_per_day or metadata.get("steps_per_day")
        if timestamps is not None and (spd is None or steps_per_day is not None):
            spd = agreed_steps_per_day(steps_per_day, pd.DatetimeIndex(timestamps), name or metadata.get("name", "data"))
        if spd is None:
            raise DataError(
                "steps_per_day is unknown: the dataset has neither st-peft metadata nor timestamps; "
                "pass steps_per_day=... (command line: --steps-per-day)"
            )
        adjacency = metadata.get("adjacency")
        return cls(
            # a NaN where the mask says observed stays NaN, and is refused naming its position
            values=np.where(mask, values, 0.0),
            mask=mask,
            steps_per_day=spd,
            name=name or metadata.get("name", "data"),
            timestamps=timestamps,
            start_day_of_week=int(metadata.get("start_day_of_week", 0)),
            adjacency=None if adjacency is None else np.asarray(adjacency, dtype=np.float32),
            node_ids=metadata.get("node_ids", []),
            channel_names=metadata.get("channel_names", []),
        )


def steps_per_day_of(timestamps: pd.DatetimeIndex, source: str = "data") -> int:
    """Infer steps per day from the median step between increasing timestamps (1 for daily or coarser).

    Raises:
        DataError: for fewer than two timestamps, or timestamps that repeat, go backwards or leave a gap.
    """
    if len(timestamps) < 2:
        raise DataError(f"{source}: at least two timestamps are needed to infer the step length")
    stamps = timestamps.to_numpy(dtype="datetime64[ns]")
    _check_regular(stamps, source)
    step_seconds = np.median(np.diff(stamps).astype(np.int64)) / 1e9
    return max(1, int(SECONDS_PER_DAY // step_seconds))


def agreed_steps_per_day(steps_per_day: int | None, timestamps: pd.DatetimeIndex, source: str = "data") -> int:
    """The steps per day of dated data: ``steps_per_day`` when given and the dates agree, else the dates'.

    Raises:
        DataError: a given ``steps_per_day`` that contradicts the dates, naming both.
    """
    implied = steps_per_day_of(timestamps, source)
    if steps_per_day is not None and steps_per_day != implied:
        raise DataError(
            f"{source}: steps_per_day {steps_per_day} contradicts the dates, which step every "
            f"{pd.Timedelta(86400 / implied, unit='s')} ({implied} a day); drop --steps-per-day, the dates give it"
        )
    return implied


def calendar_like(values: np.ndarray, mask: np.ndarray, steps_per_day: int) -> np.ndarray:
    """Which series repeat exactly every day, or every week: a clock (time of day, day of week), not a signal.

    Args:
        values: ``(T, ...)`` series along axis 0 (a node's column, or one channel at every node).
        mask: ``(T, ...)`` observed entries; pairs a period apart are compared where both are observed.
        steps_per_day: the series' steps in a day.

    Returns:
        ``values.shape[1:]`` booleans: True for a series with at least three distinct observed values
        whose every observed pair a day (or a week) apart is equal. Real readings never are; a
        constant or on/off series is left alone.
    """
    flat = values.reshape(len(values), -1)
    observed = mask.reshape(len(mask), -1)
    clocks = np.zeros(flat.shape[1], dtype=bool)
    for period in (steps_per_day, 7 * steps_per_day):
        if len(flat) < 2 * period:
            continue
        both = observed[period:] & observed[:-period]
        equal = (flat[period:] == flat[:-period]) | ~both
        clocks |= equal.all(axis=0) & (both.sum(axis=0) >= period)
    for column in np.flatnonzero(clocks):  # few or none: real readings fail the test above
        clocks[column] = np.unique(flat[observed[:, column], column]).size >= 3
    return clocks.reshape(values.shape[1:])


def checked_steps_per_day(steps_per_day, source: str = "data") -> int:
    """``steps_per_day`` as an int, refused unless it is a whole number in ``[1, 86400]``.

    1 is daily or coarser data; 86400 is one step a second, the finest st-peft's calendar resolves.

    Raises:
        DataError: naming ``source``, the value and the fix (the command line's ``--steps-per-day``).
    """
    number = isinstance(steps_per_day, (int, float, np.integer, np.floating)) and not isinstance(steps_per_day, bool)
    if not (number and float(steps_per_day).is_integer() and 1 <= steps_per_day <= SECONDS_PER_DAY):
        raise DataError(
            f"{source}: steps_per_day must be a whole number of steps in a day, from 1 (daily or coarser) to "
            f"{SECONDS_PER_DAY} (one a second), got {steps_per_day!r}; pass steps_per_day=288 for 5-minute "
            "steps (command line: --steps-per-day 288)"
        )
    return int(steps_per_day)


def _check_regular(timestamps: np.ndarray, source: str) -> None:
    """Refuse timestamps ``(T,)`` that repeat, go backwards or leave a gap, naming the first offending index.

    A gap is a step longer than ``GAP_FACTOR`` times the median step. It is refused rather than
    bridged, so that no window ever spans one: the fix is to insert the missing steps as
    missing values, which the masks then skip.
    """
    if len(timestamps) < 2:
        return
    steps = np.diff(timestamps).astype(np.int64)
    backwards = np.flatnonzero(steps <= 0)
    if backwards.size:
        i = int(backwards[0]) + 1
        what = "repeats" if steps[i - 1] == 0 else "goes back from"
        raise DataError(
            f"{source}: timestamp {i} ({timestamps[i]}) {what} timestamp {i - 1} ({timestamps[i - 1]}); "
            "timestamps must increase: sort the rows and drop duplicates (local times repeat an hour when "
            "daylight saving ends: use UTC)"
        )
    typical = pd.Timedelta(int(np.median(steps)), unit="ns")
    gaps = np.flatnonzero(steps > GAP_FACTOR * typical.value)
    if gaps.size:
        i = int(gaps[0]) + 1
        raise DataError(
            f"{source}: a gap of {pd.Timedelta(int(steps[i - 1]), unit='ns')} before timestamp {i} "
            f"({timestamps[i]}) in steps of {typical}; windows must not span it: insert the missing steps "
            f"as missing values (pandas: frame.asfreq('{pd.tseries.frequencies.to_offset(typical).freqstr}'))"
        )


def observed_mask(values: np.ndarray, missing_value: float | None, tolerance: float = 0.0) -> np.ndarray:
    """Mask of observed entries: finite values farther than ``tolerance`` from ``missing_value``.

    Args:
        values: any array.
        missing_value: the value the format uses for "missing" (0 for traffic sensors), or None
            when every finite value is real.
        tolerance: values this close to ``missing_value`` are missing too (float residues
            such as 1e-17 that some published files hold instead of an exact 0).

    Returns:
        bool array of the same shape, True where observed.
    """
    mask = np.isfinite(values)
    if missing_value is not None:
        mask &= np.abs(values - missing_value) > tolerance
    return mask
