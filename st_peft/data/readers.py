"""Readers for the signal formats people have: PEMS npz, METR-LA/PEMS-BAY h5, wide CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from st_peft.data.container import STData, agreed_steps_per_day, calendar_like, observed_mask
from st_peft.data.errors import DataError


def read_npz(
    path: str | Path,
    steps_per_day: int,
    key: str = "data",
    channels: list[int] | None = None,
    missing_value: float | None = 0.0,
    missing_tolerance: float = 0.0,
    name: str | None = None,
    **metadata,
) -> STData:
    """Read a PEMS-style ``.npz`` whose ``key`` array is ``(T, N, C)`` (or ``(T, N)``).

    NaN is an error in this format (it has no notion of a missing cell); ``missing_value``
    (0 for traffic sensors) marks missing readings.

    Args:
        path: the file.
        steps_per_day: time steps in a day (288 for PEMS' 5 minutes).
        key: the array's name inside the archive.
        channels: which channels to keep (all by default).
        missing_value: the value that means "missing", or None.
        missing_tolerance: values this close to ``missing_value`` are missing too.
        name: the data set's name (default: the file's stem).
        **metadata: passed on to :class:`STData` (adjacency, timestamps, node_ids, ...).
    """
    path = Path(path)
    values = _load_npz_array(path, key)
    if values.ndim == 2:
        values = values[..., None]
    if values.ndim != 3:
        raise DataError(f"{path}: '{key}' must be (T, N, C), got shape {values.shape}")
    if channels is not None:
        values = values[..., channels]
    if np.isnan(values).any():
        raise DataError(f"{path}: '{key}' holds NaN, which this format does not use for missing values")
    _refuse_inf(values, path)
    mask = observed_mask(values, missing_value, missing_tolerance)
    return STData(values=values, mask=mask, steps_per_day=steps_per_day, name=name or path.stem, **metadata)


def read_h5(
    path: str | Path,
    key: str | None = None,
    missing_value: float | None = 0.0,
    name: str | None = None,
    **metadata,
) -> STData:
    """Read a METR-LA / PEMS-BAY ``.h5``: a pandas frame, datetime index, one column per sensor.

    Empty cells (NaN) and ``missing_value`` are missing. Needs PyTables (``pip install tables``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        frame = pd.read_hdf(path, key=key)
    except ImportError as error:
        raise DataError(f"reading {path} needs PyTables: pip install tables ({error})") from error
    except Exception as error:
        raise DataError(f"corrupt h5 file {path}: {error}") from error
    return _from_frame(frame, path, missing_value, name, **metadata)


def read_wide_csv(
    path: str | Path,
    date_column: str | None = "date",
    steps_per_day: int | None = None,
    missing_value: float | None = None,
    name: str | None = None,
    columns: list[str] | None = None,
    **metadata,
) -> STData:
    """Read a wide CSV: an optional date column and one column per node (or variable).

    Empty cells are missing, and so is ``missing_value`` when given. With ``date_column=None``
    every column is a node and ``steps_per_day`` must be given; otherwise it is inferred from
    the timestamps, and a ``steps_per_day`` that disagrees with them is refused.

    Args:
        columns: the node columns to keep, in this order (all but the date column by default).
            A column that is not numeric, or that looks like a row id (consecutive whole
            numbers, or named ``id`` / ``index`` / ``Unnamed: 0``), or, unless chosen here, that
            repeats exactly every day or week (a time-of-day or day-of-week column), is refused
            naming it, so it never becomes a sensor unnoticed.

    Raises:
        DataError: one line naming the file, the column and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        frame = pd.read_csv(path)
    except Exception as error:
        raise DataError(f"corrupt CSV file {path}: {error}") from error
    if date_column is not None:
        if date_column not in frame.columns:
            raise DataError(f"{path}: no date column '{date_column}' (columns: {_first_columns(frame)}); name it "
                            "with --date-column, or --date-column none when the file has no dates")
        try:
            dates = pd.to_datetime(frame.pop(date_column))
        except (TypeError, ValueError) as error:
            raise DataError(f"{path}: column '{date_column}' does not hold dates ({error}); name the date column "
                            "with --date-column") from error
        frame = frame.set_index(dates)
    elif steps_per_day is None:
        raise DataError(f"{path}: pass steps_per_day when the CSV has no date column")
    if columns is not None:
        unknown = [column for column in columns if column not in frame.columns]
        if unknown or not columns:
            raise DataError(f"{path}: no columns {unknown} (columns: {_first_columns(frame)})")
        frame = frame[list(columns)]
    _refuse_non_node_columns(frame, path, chosen=columns is not None)
    data = _from_frame(frame, path, missing_value, name, steps_per_day=steps_per_day, **metadata)
    if columns is None:
        _refuse_clock_columns(data, path)
    return data


_ID_NAMES = {"id", "index", "row", "row_id", "rowid", "idx", "unnamed: 0"}


def _first_columns(frame: pd.DataFrame, count: int = 8) -> str:
    names = [str(column) for column in frame.columns]
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _refuse_non_node_columns(frame: pd.DataFrame, path: Path, chosen: bool) -> None:
    """Refuse a column that holds text, or (unless the user ``chosen`` the columns) that looks like a row id
    rather than a signal, naming it."""
    for column in frame.columns:
        series = frame[column]
        fix = "choose the node columns with --columns (Python: columns=[...])"
        if not pd.api.types.is_numeric_dtype(series) and not series.isna().all():
            example = series[pd.to_numeric(series, errors="coerce").isna() & series.notna()].iloc[0]
            raise DataError(f"{path}: column '{column}' is not numeric (e.g. {example!r}); {fix}")
        whole = series.dropna()
        consecutive = len(whole) > 2 and (whole.diff().iloc[1:] == 1).all() and (whole % 1 == 0).all()
        if not chosen and (str(column).strip().lower() in _ID_NAMES or consecutive):
            raise DataError(f"{path}: column '{column}' looks like a row id ({', '.join(map(str, whole[:3].tolist()))}"
                            f", ...), not a sensor; {fix}")


def _refuse_clock_columns(data: STData, path: Path) -> None:
    """Refuse a node of a one-channel ``data`` read from columns that repeats exactly every day or week (a clock),
    naming its column."""
    clocks = np.flatnonzero(calendar_like(data.values[..., 0], data.mask[..., 0], data.steps_per_day))
    if clocks.size:
        column = data.node_ids[clocks[0]]
        shown = ", ".join(f"{value:.4g}" for value in data.values[:3, clocks[0], 0])
        raise DataError(f"{path}: column '{column}' repeats exactly every day or week ({shown}, ...): a clock, not "
                        "a sensor; choose the node columns with --columns (Python: columns=[...])")


def _from_frame(
    frame: pd.DataFrame,
    path: Path,
    missing_value: float | None,
    name: str | None,
    steps_per_day: int | None = None,
    **metadata,
) -> STData:
    try:
        values = frame.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: non-numeric values ({error})") from error
    _refuse_inf(values, path)
    timestamps = None
    if isinstance(frame.index, pd.DatetimeIndex):
        timestamps = frame.index.to_numpy(dtype="datetime64[ns]")
        steps_per_day = agreed_steps_per_day(steps_per_day, frame.index, str(path))
    values = values[..., None]
    return STData(
        values=np.nan_to_num(values),
        mask=observed_mask(values, missing_value),
        steps_per_day=int(steps_per_day),
        name=name or path.stem,
        timestamps=timestamps,
        node_ids=metadata.pop("node_ids", [str(c) for c in frame.columns]),
        **metadata,
    )


def _load_npz_array(path: Path, key: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise DataError(f"{path}: no array '{key}' (arrays: {archive.files})")
            return np.asarray(archive[key], dtype=np.float64)
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"corrupt npz file {path}: {error}") from error


def _refuse_inf(values: np.ndarray, path: Path) -> None:
    if np.isinf(values).any():
        raise DataError(f"{path}: values hold inf, which no format uses for missing data")
