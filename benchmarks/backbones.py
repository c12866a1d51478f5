"""Accuracy of the reference backbones against naive forecasts on built-in real data.

    python benchmarks/backbones.py [--datasets los-loop sz-taxi nyc-bike] [--seeds 0 1 2] [--epochs 20]
                                   [--calendar-channels]

Protocol: 12 steps in, 12 out, chronological 7:1:2 split, the training span's statistics
carried by the model (which scales inside), masked MAE loss in original units (AdamW, lr 2e-3, batch 64), evaluation every
epoch, early stopping after ``--patience`` epochs without a better validation MAE, best
epoch reloaded, test metrics averaged over the 12 horizons (MAPE in %). Last value and
seasonal naive (one week earlier when the history reaches back that far, else one day)
need no training. Graph WaveNet runs at the CPU widths of ``common.CPU_WIDTHS``. With
``--calendar-channels`` GWNet and STGCN get time of day and day of week as two more input
channels, as Graph WaveNet's reference data pipeline feeds the time of day.
Prints a markdown table and writes ``benchmarks/results/backbones.json`` after every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_backbone, markdown_table, parameter_count, train_and_test, write_results  # noqa: E402

from st_peft.baselines import baseline_metrics  # noqa: E402
from st_peft.data import build_splits, load  # noqa: E402

METRICS = ("mae", "rmse", "mape", "mae@3", "mae@6", "mae@12")


def main() -> None:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["los-loop", "sz-taxi", "nyc-bike"])
    parser.add_argument("--models", nargs="+", default=["stid", "gwnet", "stgcn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--max-steps-per-epoch", type=int, default=None,
                        help="evaluate every this many steps; an epoch of the budget is then this many steps")
    parser.add_argument("--calendar-channels", action="store_true",
                        help="feed GWNet and STGCN time of day and day of week as input channels")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='extra constructor arguments for every model, as JSON: \'{"if_node": false}\'')
    parser.add_argument("--output", default="backbones")
    options = parser.parse_args()

    splits = {dataset: build_splits(load(dataset), input_len=12, horizon=12) for dataset in options.datasets}
    naive = {dataset: baseline_metrics(splits[dataset]) for dataset in options.datasets}
    runs: dict[tuple[str, str], list[dict]] = {}
    parameters: dict[str, int] = {}
    # seeds outermost: an interrupted run still has every data set and model at least once
    for seed in options.seeds:
        for dataset in options.datasets:
            for model_name in options.models:
                model = build_backbone(model_name, splits[dataset], seed,
                                       calendar_channels=options.calendar_channels, **options.model_kwargs)
                parameters[f"{dataset}/{model_name}"] = parameter_count(model)
                metrics, trainer = train_and_test(model, splits[dataset], seed=seed, epochs=options.epochs,
                                                  patience=options.patience,
                                                  max_steps_per_epoch=options.max_steps_per_epoch)
                metrics["epochs_run"] = trainer.state.epoch
                runs.setdefault((dataset, model_name), []).append(metrics)
                print(f"{dataset} {model_name} seed {seed}: MAE {metrics['mae']:.3f} after "
                      f"{trainer.state.epoch:.0f} epochs", flush=True)
                report(options, naive, runs, parameters)


def report(options: argparse.Namespace, naive: dict, runs: dict, parameters: dict) -> None:
    """Print the table of medians over the seeds run so far and write the JSON."""
    rows, results = [], {}
    for dataset in options.datasets:
        results[dataset] = {name: {"median": metrics} for name, metrics in naive[dataset].items()}
        for name, metrics in naive[dataset].items():
            rows.append([dataset, name, "-", "-", *[metrics[m] for m in METRICS], "-"])
        for model_name in options.models:
            model_runs = runs.get((dataset, model_name), [])
            if not model_runs:
                continue
            median = {m: statistics.median(run[m] for run in model_runs) for m in METRICS}
            beats = median["mae"] < naive[dataset]["seasonal naive"]["mae"]
            count = parameters[f"{dataset}/{model_name}"]
            results[dataset][model_name] = {"median": median, "runs": model_runs, "parameters": count,
                                            "beats_seasonal_naive": beats}
            rows.append([dataset, model_name, count, len(model_runs), *[median[m] for m in METRICS],
                         "yes" if beats else "NO"])
    header = ["data set", "forecaster", "params", "seeds", "MAE", "RMSE", "MAPE %", "MAE@3", "MAE@6", "MAE@12",
              "beats seasonal naive"]
    table = markdown_table(header, rows)
    print(f"\nMedian over the seeds run so far (of {options.seeds}), at most {options.epochs} epochs:\n")
    print(table, flush=True)
    write_results(options.output, {"protocol": __doc__, "options": vars(options), "results": results,
                                   "table": table})


if __name__ == "__main__":
    main()
