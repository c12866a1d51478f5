"""Pieces every benchmark script shares: training a forecaster, tables, JSON results."""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from st_peft.backbones import BACKBONES
from st_peft.data import ForecastingSplits
from st_peft.training import STTrainer, st_training_args

RESULTS = Path(__file__).resolve().parent / "results"

# Graph WaveNet at the paper's widths costs about 60 GFLOP per training step of 64 windows
# over 207 nodes, out of reach of a 2-core benchmark; these widths keep its structure
# (8 layers, diffusion order 2, adaptive adjacency) at about a sixth of the cost.
CPU_WIDTHS = {"gwnet": {"residual_channels": 16, "dilation_channels": 16, "skip_channels": 64, "end_channels": 128}}


def build_backbone(
    name: str,
    splits: ForecastingSplits,
    seed: int,
    cpu_widths: bool = True,
    calendar_channels: bool = False,
    **overrides,
) -> nn.Module:
    """A reference backbone (``stid``, ``gwnet``, ``stgcn``) sized for ``splits``, seeded.

    ``cpu_widths`` uses :data:`CPU_WIDTHS` instead of the paper's widths where they differ;
    ``calendar_channels`` feeds GWNet and STGCN time of day and day of week as input channels
    (STID has its own calendar embeddings); ``overrides`` are further constructor arguments.
    """
    torch.manual_seed(seed)
    kwargs = {**splits.model_kwargs(), **(CPU_WIDTHS.get(name, {}) if cpu_widths else {})}
    kwargs["steps_per_day"] = splits.steps_per_day
    if name != "stid":
        kwargs.update(adjacency=splits.adjacency, calendar_channels=calendar_channels)
    kwargs.update(overrides)
    return BACKBONES[name](**kwargs)


def train_and_test(
    model: nn.Module,
    splits: ForecastingSplits,
    seed: int,
    epochs: int,
    patience: int = 3,
    lr: float = 2e-3,
    batch_size: int = 64,
    max_steps_per_epoch: int | None = None,
    trainer_kwargs: dict | None = None,
) -> tuple[dict[str, float], STTrainer]:
    """Train with early stopping on validation MAE, reload the best epoch, return test metrics.

    Args:
        model: any forecaster the trainer accepts (plain module, ``PeftModel``, ``PreTrainedModel``).
        splits: data splits; the validation split picks the best epoch.
        seed: training seed.
        epochs: the epoch budget.
        patience: epochs without a better validation MAE before stopping.
        lr, batch_size: optimiser settings.
        max_steps_per_epoch: evaluate every this many steps instead of every epoch (an
            "epoch" of the budget then means this many steps), for large training sets.
        trainer_kwargs: extra :class:`STTrainer` arguments (a ``train_sampler``, say).

    Returns:
        Test metrics (``mae@3`` ... ``mae``, ``rmse``, ``mape``, ``wape``) and the trainer.
    """
    steps_per_epoch = -(-len(splits.train) // batch_size)
    schedule = {}
    if max_steps_per_epoch is not None and max_steps_per_epoch < steps_per_epoch:
        schedule = {"eval_strategy": "steps", "save_strategy": "steps", "eval_steps": max_steps_per_epoch,
                    "save_steps": max_steps_per_epoch, "max_steps": max_steps_per_epoch * epochs}
    with tempfile.TemporaryDirectory() as output_dir:
        args = st_training_args(output_dir, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                disable_tqdm=True, logging_strategy="no", save_total_limit=1, **schedule)
        trainer = STTrainer(model, args, train_dataset=splits.train, eval_dataset=splits.val,
                            data_collator=splits.collator, early_stopping_patience=patience,
                            **(trainer_kwargs or {}))
        trainer.train()
        metrics = trainer.evaluate_test(splits.test)
    return metrics, trainer


def parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def median_of(runs: Sequence[dict[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """Per-key median over runs (seeds or repeats)."""
    return {key: statistics.median(run[key] for run in runs) for key in keys}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats get three decimals."""
    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, content: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine it ran on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    content = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()}, **content}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(content, indent=2))
    return path


def timed(function: Callable[[], object], repeats: int, clock: Callable[[], float] | None = None) -> list[float]:
    """Seconds of ``repeats`` calls of ``function`` by ``clock`` (wall-clock ``time.perf_counter`` by default;
    ``time.process_time`` for the process's CPU seconds)."""
    import time

    clock = clock or time.perf_counter
    times = []
    for _ in range(repeats):
        start = clock()
        function()
        times.append(clock() - start)
    return times
