"""ST-LoRA on STID, GWNet and STGCN: accuracy of three training variants, parameters, speed.

    python benchmarks/st_lora.py [--quick] [--datasets chickenpox nyc-bike sz-taxi] [--seeds 0 1 2]

Variants, for every backbone, data set and seed (12 steps in, 12 out, chronological 7:1:2
split, scaling statistics of the training span carried by the backbone):

1. ``backbone``: the backbone trained to early stopping;
2. ``+ST-LoRA``: variant 1's backbone frozen, ST-LoRA (default ``STLoraConfig``: one predictor
   block of 4 NALLs, rank 4) trained on top;
3. ``joint``: backbone and ST-LoRA trained together from scratch (``train_backbone=True``) with
   variant 1's budget;

and a control, ``1b continued``: variant 1's backbone trained further, without ST-LoRA, with
variant 2's budget, so that variant 2's gain can be told apart from its extra training.

Training uses ``STTrainer`` directly: masked MAE in original units, AdamW (lr 2e-3 for 1 and 3,
5e-3 for the small adapter in 2), batch 32, an evaluation on (at most 128 evenly spaced windows
of) the validation split every ``--steps`` steps, early stopping after 3 evaluations without a
better validation MAE, best evaluation reloaded, test metrics on the whole test split averaged
over the 12 horizons (MAPE in %). To fit a shared two-core CPU the backbones are scaled down
(``BENCH_SIZES``) and every run is capped at ``--epochs`` evaluations and ``--time-limit``
seconds of training (variant 2 gets the same cap as 1 and 3); backbones are therefore far from
converged on the larger data sets, and the table says how many steps each variant trained.
The shares of added parameters are also reported at the papers' backbone sizes. Speed: median
seconds of interleaved repeats of one training step (variant 2 against variant 1) and of
inference (adapted against plain), measured side by side in one run on the last data set.
Prints markdown tables and writes
``benchmarks/results/st_lora.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, parameter_count, timed, write_results  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from st_peft.backbones import BACKBONES  # noqa: E402
from st_peft.data import ForecastingSplits, build_splits, load  # noqa: E402
from st_peft.training import STTrainer, st_training_args  # noqa: E402
from st_peft.tuners.st_lora import STLoraConfig  # noqa: E402

METRICS = ("mae", "rmse", "mape")
BENCH_SIZES = {
    "stid": {"embed_dim": 16, "node_dim": 16, "tod_dim": 16, "dow_dim": 16, "num_layers": 2},
    "gwnet": {"residual_channels": 8, "dilation_channels": 8, "skip_channels": 32, "end_channels": 64},
    "stgcn": {"block_channels": (16, 8, 16)},
}
BATCH = 32
VAL_WINDOWS = 128
VARIANTS = {"backbone": "1 backbone", "st_lora": "2 +ST-LoRA", "continued": "1b continued", "joint": "3 joint"}


class TimeLimit(TrainerCallback):
    """Stop training after ``seconds`` of wall-clock time, evaluating (and saving) the last step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True
            control.should_evaluate = True
            control.should_save = True
        return control


def fit(model: torch.nn.Module, splits: ForecastingSplits, seed: int, lr: float, options: argparse.Namespace) -> dict:
    """Train ``model`` under the benchmark's budget with early stopping; test metrics of the best evaluation."""
    val = splits.val.select(np.linspace(0, len(splits.val) - 1, min(VAL_WINDOWS, len(splits.val))).astype(int))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        args = st_training_args(
            output_dir, epochs=1, batch_size=BATCH, lr=lr, seed=seed, disable_tqdm=True, logging_strategy="no",
            save_total_limit=1, eval_strategy="steps", save_strategy="steps", eval_steps=options.steps,
            save_steps=options.steps, max_steps=options.steps * options.epochs,
        )
        trainer = STTrainer(model, args, train_dataset=splits.train, eval_dataset=val,
                            data_collator=splits.collator, early_stopping_patience=3,
                            callbacks=[TimeLimit(options.time_limit)])
        trainer.train()
        seconds = time.perf_counter() - start
        metrics = trainer.evaluate_test(splits.test)
    return {**metrics, "steps": trainer.state.global_step, "train_seconds": seconds}


def build(name: str, splits: ForecastingSplits, seed: int, paper_size: bool = False) -> torch.nn.Module:
    """Backbone ``name`` for ``splits``, at the benchmark's size (or the paper's), seeded."""
    torch.manual_seed(seed)
    kwargs = splits.model_kwargs()
    kwargs.update({} if paper_size else BENCH_SIZES[name])
    if name == "stid":
        kwargs["steps_per_day"] = splits.steps_per_day
    else:
        kwargs["adjacency"] = splits.adjacency
    return BACKBONES[name](**kwargs)


def adapter_config(splits: ForecastingSplits, **overrides) -> STLoraConfig:
    """The default ST-LoRA configuration for ``splits``."""
    return STLoraConfig(**splits.size_kwargs(), **overrides)


def added_parameters(model: torch.nn.Module) -> int:
    """Parameters ST-LoRA added to the backbone."""
    return sum(p.numel() for n, p in model.named_parameters() if "stlora_" in n)


def run_setting(name: str, splits: ForecastingSplits, seed: int, options: argparse.Namespace) -> dict:
    """Variants 1-3 for one backbone, data set and seed; test metrics and parameter counts."""
    backbone = build(name, splits, seed)
    backbone_params = parameter_count(backbone)
    plain = fit(backbone, splits, seed, 2e-3, options)

    adapted_model = get_peft_model(copy.deepcopy(backbone), adapter_config(splits))
    trainable_adapter = parameter_count(adapted_model, trainable_only=True)
    added = added_parameters(adapted_model)
    adapted = fit(adapted_model, splits, seed, 5e-3, options)

    continued = fit(copy.deepcopy(backbone), splits, seed, 2e-3, options)

    joint_model = get_peft_model(build(name, splits, seed), adapter_config(splits, train_backbone=True))
    trainable_joint = parameter_count(joint_model, trainable_only=True)
    joint = fit(joint_model, splits, seed, 2e-3, options)
    return {
        "backbone": plain,
        "st_lora": adapted,
        "continued": continued,
        "joint": joint,
        "backbone_parameters": backbone_params,
        "added_parameters": added,
        "trainable": {"backbone": backbone_params, "st_lora": trainable_adapter, "continued": backbone_params,
                      "joint": trainable_joint},
    }


def speed(name: str, splits: ForecastingSplits, repeats: int, paper_size: bool = False) -> dict:
    """Median seconds of a training step and of inference, with and without ST-LoRA, interleaved."""
    batch = splits.collator.gather(np.asarray(splits.split("train")["start"])[:BATCH])
    inputs = {key: batch[key] for key in ("past_values", "past_observed_mask", "past_time_features",
                                          "future_time_features")}
    plain = build(name, splits, 0, paper_size)
    adapted = get_peft_model(build(name, splits, 0, paper_size), adapter_config(splits))

    def step(model: torch.nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        loss = model(**batch).loss  # masked MAE in original units
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param.sub_(1e-6 * grad)

    def infer(model: torch.nn.Module) -> None:
        with torch.no_grad():
            model(**inputs)

    times = {"train_backbone": [], "train_st_lora": [], "infer_backbone": [], "infer_st_lora": []}
    for model in (plain, adapted):
        model.train()
        step(model)
        infer(model)
    for _ in range(repeats):
        times["train_backbone"] += timed(lambda: step(plain), 1)
        times["train_st_lora"] += timed(lambda: step(adapted), 1)
        times["infer_backbone"] += timed(lambda: infer(plain.eval()), 1)
        times["infer_st_lora"] += timed(lambda: infer(adapted.eval()), 1)
        plain.train()
        adapted.train()
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        **medians,
        "train_ratio": medians["train_st_lora"] / medians["train_backbone"],
        "infer_ratio": medians["infer_st_lora"] / medians["infer_backbone"],
        "repeats": repeats,
    }


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def speed_table(results: dict, options: argparse.Namespace) -> str:
    """The speed measurements as a titled markdown table."""
    rows = [[name, s["train_backbone"], s["train_st_lora"], f"{s['train_ratio']:.2f}x", s["infer_backbone"],
             s["infer_st_lora"], f"{s['infer_ratio']:.2f}x"] for name, s in results["speed"].items()]
    size = "the papers' backbone sizes" if options.paper_size else "benchmark-size backbones"
    title = (f"\nSpeed on {options.datasets[-1]}, {size}, batch {BATCH}, median of {options.repeats} interleaved "
             "repeats (seconds; targets: train <= 0.6x, inference <= 1.1x)\n\n")
    return title + markdown_table(["backbone", "train step 1", "train step 2", "ratio", "inference",
                                   "inference + ST-LoRA", "ratio"], rows)


def main() -> None:
    """Run the benchmark, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["chickenpox", "nyc-bike", "sz-taxi"])
    parser.add_argument("--models", nargs="+", default=["stid", "gwnet", "stgcn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10, help="evaluations in the budget")
    parser.add_argument("--steps", type=int, default=8, help="training steps between evaluations")
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds of training per run")
    parser.add_argument("--repeats", type=int, default=7, help="repeats of the speed measurement")
    parser.add_argument("--quick", action="store_true", help="smoke test: chickenpox, one seed, tiny budget")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the speed measurement, on the last data set; writes <output>_speed.json")
    parser.add_argument("--paper-size", action="store_true",
                        help="with --speed-only: time the backbones at the papers' sizes; writes <output>_speed_paper_size.json")
    parser.add_argument("--output", default="st_lora")
    options = parser.parse_args()
    if options.quick:
        options.datasets, options.seeds, options.epochs, options.steps, options.repeats = ["chickenpox"], [0], 2, 2, 2
        options.time_limit = 5.0
        options.output = options.output + "_quick"
    # tiny models on a shared CPU: one thread each is faster than threads fighting for two cores
    torch.set_num_threads(1)
    began = time.perf_counter()

    results: dict = {"protocol": __doc__.split("\n\n", 2)[2].strip(), "options": vars(options), "rows": {}}
    if options.speed_only:
        splits = build_splits(load(options.datasets[-1]), input_len=12, horizon=12)
        results["speed"] = {name: speed(name, splits, options.repeats, options.paper_size) for name in options.models}
        print(speed_table(results, options))
        suffix = "_speed_paper_size" if options.paper_size else "_speed"
        print(f"\nwrote {write_results(options.output + suffix, results)}")
        return
    rows, shares = [], []
    for dataset in options.datasets:
        splits = build_splits(load(dataset), input_len=12, horizon=12)
        for name in options.models:
            runs = [run_setting(name, splits, seed, options) for seed in options.seeds]
            row = {"runs": runs}
            for variant in VARIANTS:
                row[variant] = {m: statistics.mean(run[variant][m] for run in runs) for m in METRICS}
            for variant in list(VARIANTS)[1:]:
                row[f"{variant}_mae_change_percent"] = 100 * (row[variant]["mae"] / row["backbone"]["mae"] - 1)
            params = runs[0]["backbone_parameters"]
            row["added_percent"] = 100 * runs[0]["added_parameters"] / params
            row["trainable_percent"] = {k: 100 * v / params for k, v in runs[0]["trainable"].items()}
            results["rows"][f"{dataset}/{name}"] = row
            for variant, label in VARIANTS.items():
                cells = [mean_std([run[variant][m] for run in runs]) for m in METRICS]
                cells.append(f"{statistics.mean(run[variant]['steps'] for run in runs):.0f}")
                change = "-" if variant == "backbone" else f"{row[f'{variant}_mae_change_percent']:+.1f}%"
                added = "-" if variant in ("backbone", "continued") else f"{row['added_percent']:.2f}%"
                rows.append([dataset, name, label, *cells, change, f"{row['trainable_percent'][variant]:.1f}%", added])
            print(f"{dataset} {name}: MAE {row['backbone']['mae']:.3f} -> ST-LoRA {row['st_lora']['mae']:.3f}, "
                  f"joint {row['joint']['mae']:.3f} ({time.perf_counter() - began:.0f}s)", flush=True)
            paper = build(name, splits, 0, paper_size=True)
            paper_added = added_parameters(get_peft_model(paper, adapter_config(splits)))
            share = 100 * paper_added / parameter_count(paper)
            results["rows"][f"{dataset}/{name}"]["added_percent_paper_size"] = share
            shares.append([dataset, name, parameter_count(paper), paper_added, f"{share:.2f}%"])

    changes = [row["st_lora_mae_change_percent"] for row in results["rows"].values()]
    results["mean_st_lora_mae_change_percent"] = statistics.mean(changes)
    for variant in ("continued", "joint"):
        results[f"mean_{variant}_mae_change_percent"] = statistics.mean(
            row[f"{variant}_mae_change_percent"] for row in results["rows"].values()
        )
    results["speed"] = {name: speed(name, splits, options.repeats) for name in options.models}
    results["seconds"] = time.perf_counter() - began

    header = ["data", "backbone", "variant", "MAE", "RMSE", "MAPE %", "steps", "MAE vs 1", "trainable / backbone",
              "added / backbone"]
    print(f"\nST-LoRA, mean ± std over seeds {options.seeds}; budget per run: at most {options.epochs} evaluations "
          f"x {options.steps} steps of {BATCH} windows and {options.time_limit:.0f} s of training "
          "(benchmark-size backbones; steps = mean steps trained)\n")
    print(markdown_table(header, rows))
    print(f"\nMean MAE change against 1: ST-LoRA {results['mean_st_lora_mae_change_percent']:+.2f}%, "
          f"continued {results['mean_continued_mae_change_percent']:+.2f}%, "
          f"joint {results['mean_joint_mae_change_percent']:+.2f}% (target: -7% with <= 2% added parameters)")
    print("\nAdded parameters at the papers' backbone sizes\n")
    print(markdown_table(["data", "backbone", "backbone parameters", "ST-LoRA parameters", "added"], shares))
    print(speed_table(results, options))
    path = write_results(options.output, results)
    print(f"\nwrote {path} in {results['seconds']:.0f}s")


if __name__ == "__main__":
    main()
