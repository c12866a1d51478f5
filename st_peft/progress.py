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


def format_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``1.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class ProgressPrinter(TrainerCallback):
    """Prints one line per epoch (or per log when nothing is evaluated) on the main process, a line with
    the step and an ETA whenever ``interval`` seconds pass without one, and why training stopped early.

    ``epoch 3/20  step 66/440  loss 4.123  val MAE 3.456 (best 3.401)  12 s``
    ``  step 70/440 (epoch 3.2/20)  14 s  ETA 1.5 min``
    ``early stopping after epoch 9: no better val MAE for 5 evaluations; kept epoch 4 (val MAE 3.401)``

    Args:
        stream: where to print (standard output by default).
        interval: seconds without a line after which a step line is printed (so a slow first epoch
            shows progress within seconds, not at its end).
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.stream = stream
        self.interval = interval
        self.start = time.monotonic()
        self.last_line = self.start
        self.first_step = 0
        self.loss: float | None = None
        self.best: float | None = None

    def _print(self, text: str) -> None:
        self.last_line = time.monotonic()
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.last_line = time.monotonic()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        now = time.monotonic()
        if not state.is_world_process_zero or now - self.last_line < self.interval:
            return
        elapsed = now - self.start
        done = state.global_step - self.first_step
        eta = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
        self._print(f"  step {state.global_step}/{state.max_steps} (epoch {format_number(state.epoch or 0)}/"
                    f"{format_number(state.num_train_epochs)})  {format_duration(elapsed)}  "
                    f"ETA {format_duration(eta)}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if not state.is_world_process_zero or state.global_step >= state.max_steps:
            return
        evaluations = [log for log in state.log_history if "eval_mae" in log]
        if not evaluations or state.best_metric is None:
            return
        kept = min(evaluations, key=lambda log: log["eval_mae"])
        since = len(evaluations) - evaluations.index(kept) - 1
        self._print(f"early stopping after epoch {format_number(state.epoch or 0)}: no better val MAE for {since} "
                    f"evaluations; kept epoch {format_number(kept['epoch'])} (val MAE "
                    f"{format_number(kept['eval_mae'])})")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.start = self.last_line = time.monotonic()
        self.first_step = state.global_step
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
