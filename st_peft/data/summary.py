"""What a run is about to learn from: the data summary printed before training and kept in the run folder.

It names every choice that changes the numbers a user will read: which channels the model
reads and which it forecasts and scores, what counts as missing (and so leaves the loss and
the metrics), and where the steps per day came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from st_peft.data.container import calendar_like
from st_peft.data.missing_inputs import describe
from st_peft.data.windows import ForecastingSplits

STEPS_PER_DAY_GIVEN = "given with --steps-per-day"
STEPS_PER_DAY_FROM_DATES = "inferred from the dates"
STEPS_PER_DAY_BUILT_IN = "built into the data set"
STEPS_PER_DAY_STORED = "stored with the data set"

# what each reader counts as missing when the user does not say (``missing_value`` of its signature)
_FORMAT_MISSING = {
    ".npz": "0 (the PEMS convention; --missing-value none makes zeros real)",
    ".h5": "empty cells and 0 (--missing-value none makes zeros real)",
    ".hdf5": "empty cells and 0 (--missing-value none makes zeros real)",
    ".csv": "empty cells only (--missing-value 0 makes zeros missing too)",
}


def missing_rule(dataset: str, missing_value: float | str | None, built_in: dict[str, str]) -> str:
    """What counts as missing in ``dataset`` read with ``--missing-value`` (a number, ``"none"`` or not given).

    Args:
        dataset: ``--dataset``: a built-in name, a file or a saved / Hub data set.
        missing_value: the user's choice; None leaves the reader's default.
        built_in: the rule of each built-in data set, by name.
    """
    if dataset in built_in:
        return built_in[dataset]
    suffix = Path(dataset).suffix.lower()
    empty = "empty cells" if suffix in (".csv", ".h5", ".hdf5") else ""
    if missing_value == "none":
        return f"{empty or 'nothing'}{' only' if empty else ''}: zeros are real values"
    if missing_value is not None:
        return f"{float(missing_value):g}" + (f" and {empty}" if empty else "")
    return _FORMAT_MISSING.get(suffix, "the data set's mask column (or NaN where it has none)")


def data_summary(splits: ForecastingSplits, *, steps_per_day_from: str, missing: str) -> dict[str, Any]:
    """The data summary of ``splits`` as JSON values.

    Args:
        splits: the windows a run trains and scores on.
        steps_per_day_from: where the steps per day came from (``STEPS_PER_DAY_*``).
        missing: what counts as missing (:func:`missing_rule`).

    Returns:
        ``name``, ``shape`` (T, N, C), per channel its ``name``, observed ``min`` / ``max`` / ``mean``,
        ``observed`` fraction, ``zeros`` (fraction of observed values that are 0) and ``clock`` (every
        node's series repeats exactly every day or week: a time-of-day or day-of-week channel); ``steps_per_day``
        and ``steps_per_day_from``; ``dates`` (first and last, or None); ``observed`` and ``zeros``
        over all channels; ``missing``; ``inputs`` and ``targets`` (channel names the model reads and
        the ones it forecasts and is scored on); ``missing_inputs`` (the treatment) and ``mask_channels``
        (the channels whose observed mask the model reads as one more input); ``windows`` per split.
    """
    data = splits.data
    channels = []
    for index, name in enumerate(data.channel_names):
        observed = data.values[..., index][data.mask[..., index]]
        stats = {"min": float(observed.min()), "max": float(observed.max()), "mean": float(observed.mean())} \
            if observed.size else {"min": None, "max": None, "mean": None}
        clock = bool(calendar_like(data.values[..., index], data.mask[..., index], data.steps_per_day).all())
        channels.append({"name": name, **stats, "observed": float(data.mask[..., index].mean()),
                         "zeros": float((observed == 0).mean()) if observed.size else None, "clock": clock})
    observed_values = data.values[data.mask]
    stamps = data.timestamps
    return {
        "name": data.name,
        "shape": list(data.values.shape),
        "channels": channels,
        "steps_per_day": data.steps_per_day,
        "steps_per_day_from": steps_per_day_from,
        "dates": None if stamps is None else [str(stamps[0])[:19], str(stamps[-1])[:19]],
        "observed": float(data.mask.mean()),
        "zeros": float((observed_values == 0).mean()) if observed_values.size else None,
        "missing": missing,
        "inputs": [data.channel_names[i] for i in splits.input_channels],
        "targets": [data.channel_names[i] for i in splits.target_channels],
        "missing_inputs": splits.missing_inputs,
        "mask_channels": [data.channel_names[i] for i in splits.mask_channels],
        "windows": {name: len(splits.split(name)) for name in ("train", "val", "test")},
    }


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary of :func:`data_summary` as the lines a run prints before it trains."""
    t, n, c = summary["shape"]
    dates = f"{summary['dates'][0]} to {summary['dates'][1]}" if summary["dates"] else \
        "no dates (day of week counts from the first step; --start gives them)"
    lines = [
        f"data {summary['name']}: {t} steps x {n} nodes x {c} channels, {summary['steps_per_day']} steps a day "
        f"({summary['steps_per_day_from']}), {dates}",
        f"  missing: {summary['missing']}; observed {summary['observed']:.1%} of entries; "
        f"{_percent(summary['zeros'])} of observed values are 0",
    ]
    for channel in summary["channels"]:
        lines.append(f"  channel {channel['name']}: {_number(channel['min'])} to {_number(channel['max'])} "
                     f"(mean {_number(channel['mean'])}), observed {channel['observed']:.1%}, "
                     f"zeros {_percent(channel['zeros'])}")
    windows = summary["windows"]
    lines.append(f"  the model reads {', '.join(summary['inputs'])}; it forecasts and is scored on "
                 f"{', '.join(summary['targets'])} (--channels, --target-channels); windows: "
                 f"{windows['train']} train, {windows['val']} val, {windows['test']} test")
    lines.append(f"  missing inputs (--missing-inputs): {describe(summary['missing_inputs'], summary['mask_channels'])}")
    clocks = [channel["name"] for channel in summary["channels"]
              if channel["clock"] and channel["name"] in summary["targets"]]
    if clocks:
        named = f"{', '.join(clocks)} repeat" if len(clocks) > 1 else f"{clocks[0]} repeats"
        lines.append(f"  warning: {named} exactly every day or week (a clock, not a reading), yet forecast and "
                     "scored; keep it out with --channels or --target-channels")
    return "\n".join(lines)

