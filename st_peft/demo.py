"""`make demo`: train STID on a built-in real data set and compare it with naive forecasts.

Run as ``python -m st_peft.demo [--dataset los-loop] [--epochs 15] [--output-dir outputs/demo]``.
Prints test MAE / RMSE / MAPE at horizons 3, 6, 12 and averaged, for STID, seasonal
naive and last value, and saves a plot of forecast against truth for a few nodes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from st_peft.backbones import STID  # noqa: E402
from st_peft.baselines import baseline_metrics, seasonal_naive_forecast, split_targets  # noqa: E402
from st_peft.data import build_splits, load  # noqa: E402
from st_peft.metrics import horizon_metrics  # noqa: E402
from st_peft.progress import ProgressPrinter, format_table  # noqa: E402
from st_peft.training import STTrainer, st_training_args  # noqa: E402

HORIZONS = (3, 6, 12)


def plot_forecasts(
    truth: np.ndarray, forecast: np.ndarray, naive: np.ndarray, nodes: list[int], step: int, path: Path, title: str
) -> None:
    """Plot the ``step``-ahead forecast against truth over the test span for a few nodes.

    Args:
        truth, forecast, naive: ``(W, H, N, C)`` arrays in original units (channel 0 is drawn).
        nodes: node indices to draw, one panel each.
        step: 1-based forecast step drawn as a continuous series.
        path: PNG file to write.
        title: figure title.
    """
    figure, axes = plt.subplots(len(nodes), 1, figsize=(11, 2.4 * len(nodes)), sharex=True)
    for axis, node in zip(np.atleast_1d(axes), nodes, strict=True):
        axis.plot(truth[:, step - 1, node, 0], color="black", lw=1.2, label="truth")
        axis.plot(forecast[:, step - 1, node, 0], color="tab:blue", lw=1.0, label="STID")
        axis.plot(naive[:, step - 1, node, 0], color="tab:orange", lw=0.8, ls="--", label="seasonal naive")
        axis.set_ylabel(f"node {node}")
    np.atleast_1d(axes)[0].legend(loc="upper right", ncol=3)
    np.atleast_1d(axes)[-1].set_xlabel("test window")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Train, evaluate, print the table and save the plot; return the metrics per forecaster."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="los-loop")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    data = load(options.dataset)
    splits = build_splits(data, input_len=12, horizon=12)
    print(f"{data.name}: {data.num_steps} steps x {data.num_nodes} nodes x {data.num_channels} channels, "
          f"{len(splits.train)}/{len(splits.val)}/{len(splits.test)} train/val/test windows")
    model = STID(**splits.model_kwargs(), steps_per_day=splits.steps_per_day)
    args = st_training_args(str(output_dir / "checkpoints"), epochs=options.epochs, batch_size=64, lr=2e-3,
                            seed=options.seed, disable_tqdm=True)
    trainer = STTrainer(model, args, train_dataset=splits.train, eval_dataset=splits.val,
                        data_collator=splits.collator, early_stopping_patience=5, callbacks=[ProgressPrinter()])
    trainer.remove_callback(PrinterCallback)  # ProgressPrinter prints one line per epoch instead
    print(f"training STID for at most {options.epochs} epochs (early stopping on validation MAE)...", flush=True)
    trainer.train()

    forecast = trainer.predict(splits.test).predictions
    truth, mask = split_targets(splits, "test")
    rows = {"STID": horizon_metrics(forecast, truth, mask, horizons=HORIZONS), **baseline_metrics(splits)}
    print(f"\nTest set of {data.name}, 12 steps in, 12 out (MAPE in %):")
    print(format_table(rows, HORIZONS))

    plot_path = output_dir / "forecast.png"
    busiest = np.argsort(truth[..., 0].std(axis=(0, 1)))[-3:].tolist()
    plot_forecasts(truth, forecast, seasonal_naive_forecast(splits), busiest, step=3, path=plot_path,
                   title=f"{data.name}: 3-step-ahead forecasts on the test span")
    model.save_pretrained(output_dir / "stid")
    print(f"\nPlot: {plot_path}\nModel: {output_dir / 'stid'}")
    return rows


if __name__ == "__main__":
    main()
