"""What a run prints: one line per epoch while it trains, and a table of test metrics at the end.

Numbers keep four significant digits, so a small loss prints as ``3.2e-06``, never as ``0``,
and a NaN prints as ``nan``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

TABLE_METRICS = ("mae", "rmse", "mape")
TABLE_NAMES = {"mae": "MAE", "rmse": "RMSE", "mape": "MAPE%"}


def format_number(value: float) -> str:
    """``value`` with four significant digits: ``4.123``, ``3.2e-06``, ``nan``."""
    return f"{value:.4g}"


def format_table(rows: Mapping[str, Mapping[str, float]], horizons: Sequence[int] = (3, 6, 12)) -> str:
    """A markdown table of MAE / RMSE / MAPE at each step of ``horizons`` and averaged, one row per forecaster.

    Args:
        rows: metrics by forecaster, with the keys of :func:`st_peft.metrics.horizon_metrics`
            (``"mae@3"``, ..., ``"mae"``, ``"rmse"``, ``"mape"``).
        horizons: the 1-based forecast steps reported.
    """
    columns = [f"{metric}@{h}" for h in horizons for metric in TABLE_METRICS] + list(TABLE_METRICS)
    header = ["forecaster", *[f"{TABLE_NAMES[m]}@{h}" for h in horizons for m in TABLE_METRICS],
              *[TABLE_NAMES[m] for m in TABLE_METRICS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in rows.items():
        lines.append("| " + " | ".join([name, *[f"{metrics[c]:.3f}" for c in columns]]) + " |")
    return "\n".join(lines)


class ProgressPrinter(TrainerCallback):
    """Prints one line per epoch (or per log when nothing is evaluated) on the main process.

    ``epoch 3/20  step 66/440  loss 4.123  val MAE 3.456 (best 3.401)  12 s``

    Args:
        stream: where to print (standard output by default).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.start = time.monotonic()
        self.loss: float | None = None
        self.best: float | None = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.start = time.monotonic()
        self.best = state.best_metric
        if state.is_world_process_zero:
            self._print(f"training {state.max_steps} steps ({state.num_train_epochs:g} epochs), "
                        f"starting at step {state.global_step}")

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Mapping[str, float] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.loss = logs["loss"]
            if args.eval_strategy != "no":
                return  # printed with the evaluation that follows
        elif "eval_mae" not in logs:
            return
        parts = [f"epoch {format_number(state.epoch or 0)}/{format_number(state.num_train_epochs)}",
                 f"step {state.global_step}/{state.max_steps}"]
        if self.loss is not None:
            parts.append(f"loss {format_number(self.loss)}")
        if "eval_mae" in logs:
            current = logs["eval_mae"]
            self.best = current if self.best is None or current < self.best else self.best
            parts.append(f"val MAE {format_number(current)} (best {format_number(self.best)})")
        parts.append(f"{time.monotonic() - self.start:.0f} s")
        self._print("  ".join(parts))
