"""FactoST benchmark: zero-, few- and full-shot forecasting on data sets held out from pretraining.

Protocol (defaults; every number is a flag):

- data: ``los-loop``, ``sz-taxi`` and ``nyc-bike`` (not in the shipped backbone's pretraining corpus),
  12 steps in, 12 out, chronological 7:1:2 splits (STID and GWNet scale with the training
  span's statistics, FactoST normalises every window itself);
  few-shot keeps the latest 10% of the training windows (``build_splits(..., few_shot=0.1)``);
  seeds change initialisation and batch order;
- evaluation: every ``--eval-stride``-th window of the test split (12 = non-overlapping
  horizons), masked MAE / RMSE / MAPE in original units averaged over the 12 steps; model
  selection on every ``--val-stride``-th validation window;
- methods: last value and seasonal naive; the shipped FactoST backbone zero-shot (and, as an
  extra row outside the 12-in protocol, zero-shot with a ``--long-history`` history ending at
  the same step, so the targets are the same); the
  backbone + FACTOST adapter trained on 10% and 100% of the training windows; STID and a
  narrow Graph WaveNet trained from scratch on the same windows; three seeds for every
  trained method;
- training (all trained methods alike): Adam, the models' own loss (masked MAE in original
  units; FactoST's ``config.loss`` is ``"mae"``), batches of
  ``--batch-size`` windows, at most ``--few-steps`` / ``--full-steps`` optimiser steps,
  validation every ``--eval-every`` steps, the best validation state kept, stop after
  ``--patience`` evaluations without improvement. FactoST batches cover ``--train-nodes``
  random nodes (its backbone forecasts each series on its own; the adapter gets the
  ``node_index``), STID and GWNet see the whole graph. FactoST batches use the memory-replay
  sampler (20% earliest windows, 30% of every batch);
- ablation: few-shot FactoST with each adapter part off in turn, seed 0;
- cost: trainable share of parameters, and forward time of one test batch (full graph)
  for FactoST + adapter, STID and GWNet, median of ``--timing-repeats`` runs, side by side.

Prints markdown tables and writes ``benchmarks/results/factost.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model
from torch import nn

import st_peft
from st_peft.backbones import STID, GWNet
from st_peft.baselines import last_value_forecast, seasonal_naive_forecast
from st_peft.data import build_splits, load
from st_peft.metrics import horizon_metrics
from st_peft.models.factost import FactoSTModel
from st_peft.outputs import TARGET_NAMES, prediction_of
from st_peft.tuners.factost import FactoSTAdapterConfig

SHIPPED = Path(st_peft.__file__).parent / "checkpoints" / "factost-cpu"
RESULTS = Path(__file__).parent / "results" / "factost.json"
GWNET_SIZE = {"residual_channels": 16, "dilation_channels": 16, "skip_channels": 64, "end_channels": 128}
ABLATIONS = {
    "no metadata fusion": {"use_metadata": False},
    "no interaction filtering": {"use_interaction": False},
    "no domain prompts": {"use_prompts": False},
    "no memory replay": {"use_memory_replay": False},
}


def strided_starts(splits, split: str, stride: int) -> np.ndarray:
    """Every ``stride``-th window start of a split."""
    return np.asarray(splits.split(split)["start"], dtype=np.int64)[::stride]


def without_targets(batch: dict) -> dict:
    """The batch's inputs: a model given no targets computes no loss."""
    return {k: v for k, v in batch.items() if k not in TARGET_NAMES}


def predict(model: nn.Module, splits, starts: np.ndarray, batch_size: int) -> tuple[np.ndarray, ...]:
    """Forecasts in original units, targets and masks ``(W, H, N, C)`` for the windows ``starts``."""
    model.eval()
    predictions, targets, masks = [], [], []
    with torch.no_grad():
        for begin in range(0, len(starts), batch_size):
            batch = splits.collator.gather(starts[begin : begin + batch_size])
            predictions.append(prediction_of(model(**without_targets(batch))).numpy())
            targets.append(batch["future_values"].numpy())
            masks.append(batch["future_observed_mask"].numpy())
    return np.concatenate(predictions), np.concatenate(targets), np.concatenate(masks)


def score(model: nn.Module, splits, starts: np.ndarray, batch_size: int) -> dict[str, float]:
    prediction, target, mask = predict(model, splits, starts, batch_size)
    return horizon_metrics(prediction, target, mask)


def node_subset(batch: dict, nodes: int, rng: np.random.Generator) -> dict:
    """The batch restricted to ``nodes`` random nodes, with their ``node_index``."""
    total = batch["past_values"].shape[2]
    if nodes >= total:
        return batch
    index = torch.from_numpy(np.sort(rng.choice(total, size=nodes, replace=False)))
    per_node = ("past_values", "past_observed_mask", "future_values", "future_observed_mask")
    subset = {key: batch[key][:, :, index] for key in per_node if key in batch}
    return {**batch, **subset, "node_index": index}


def batches(order: Callable[[int], Iterator[list[int]]], starts: np.ndarray) -> Iterator[np.ndarray]:
    """Endless stream of window-start batches; ``order(epoch)`` yields row-index lists."""
    epoch = 0
    while True:
        for rows in order(epoch):
            yield starts[np.asarray(rows)]
        epoch += 1


def fit(
    model: nn.Module,
    splits,
    val_starts: np.ndarray,
    args: argparse.Namespace,
    steps: int,
    lr: float,
    seed: int,
    train_nodes: int | None = None,
    sampler=None,
) -> dict:
    """Train the trainable parameters of ``model``; keep the best validation state. Returns a log."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    starts = np.asarray(splits.train["start"], dtype=np.int64)
    if sampler is not None:

        def order(epoch: int) -> Iterator[list[int]]:
            sampler.set_epoch(epoch)
            return iter(sampler)

    else:

        def order(epoch: int) -> Iterator[list[int]]:
            permutation = np.random.default_rng([seed, epoch]).permutation(len(starts))
            return (permutation[i : i + args.batch_size].tolist() for i in range(0, len(starts), args.batch_size))

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    best = (float("inf"), copy.deepcopy(model.state_dict()), 0)
    stale, done = 0, 0
    started = time.perf_counter()
    stream = batches(order, starts)
    while done < steps:
        model.train()
        batch = splits.collator.gather(next(stream))
        if train_nodes is not None:
            batch = node_subset(batch, train_nodes, rng)
        # every model's own loss: masked MAE in original units by default
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 5.0)
        optimizer.step()
        done += 1
        if done % args.eval_every == 0 or done == steps:
            val_mae = score(model, splits, val_starts, args.eval_batch)["mae"]
            if val_mae < best[0]:
                best, stale = (val_mae, copy.deepcopy(model.state_dict()), done), 0
            else:
                stale += 1
                if stale >= args.patience:
                    break
    model.load_state_dict(best[1])
    return {"steps": done, "best_step": best[2], "val_mae": best[0], "train_seconds": time.perf_counter() - started}


def factost_model(backbone: FactoSTModel, splits, **switches) -> nn.Module:
    config = FactoSTAdapterConfig(**splits.size_kwargs(), steps_per_day=splits.steps_per_day, **switches)
    return get_peft_model(copy.deepcopy(backbone), config)


def expert(name: str, splits) -> nn.Module:
    kwargs = dict(splits.model_kwargs())
    if name == "STID":
        return STID(**kwargs, steps_per_day=splits.steps_per_day)
    return GWNet(**kwargs, adjacency=splits.adjacency, **GWNET_SIZE)


def run_factost(backbone, splits, val, test, args, seed, steps, **switches) -> dict:
    model = factost_model(backbone, splits, **switches)
    config = model.peft_config["default"]
    sampler = config.replay_sampler(np.asarray(splits.train["start"]), batch_size=args.batch_size, seed=seed)
    log = fit(model, splits, val, args, steps, args.factost_lr, seed, train_nodes=args.train_nodes, sampler=sampler)
    return {**score(model, splits, test, args.eval_batch), **log}


def run_expert(name, splits, val, test, args, seed, steps) -> dict:
    torch.manual_seed(seed)
    model = expert(name, splits)
    log = fit(model, splits, val, args, steps, args.expert_lr, seed)
    return {**score(model, splits, test, args.eval_batch), **log}


def baselines(splits, stride: int) -> dict[str, dict[str, float]]:
    test_rows = slice(None, None, stride)
    target = splits.collator.targets
    starts = strided_starts(splits, "test", stride)
    future = starts[:, None] + splits.input_len + np.arange(splits.horizon)
    truth, mask = target[future], splits.collator.target_mask[future]
    return {
        "last value": horizon_metrics(last_value_forecast(splits)[test_rows], truth, mask),
        "seasonal naive": horizon_metrics(seasonal_naive_forecast(splits)[test_rows], truth, mask),
    }


def forward_seconds(model: nn.Module, batch: dict, repeats: int) -> float:
    """Median forward time of ``model`` on ``batch`` (no gradients), after one warm-up call."""
    inputs = without_targets(batch)
    model.eval()
    times = []
    with torch.no_grad():
        model(**inputs)
        for _ in range(repeats):
            started = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def summarise(runs: list[dict]) -> dict[str, float]:
    maes = [run["mae"] for run in runs]
    return {
        "mae": statistics.median(maes),
        "mae_min": min(maes),
        "mae_max": max(maes),
        "rmse": statistics.median(run["rmse"] for run in runs),
        "mape": statistics.median(run["mape"] for run in runs),
        "seeds": len(runs),
    }


def benchmark_dataset(name: str, backbone: FactoSTModel, args: argparse.Namespace) -> dict:
    data = load(name)
    full = build_splits(data, input_len=12, horizon=12)
    val, test = strided_starts(full, "val", args.val_stride), strided_starts(full, "test", args.eval_stride)
    result = {"baselines": baselines(full, args.eval_stride), "runs": {}, "ablation": {}}
    result["zero-shot FactoST"] = score(backbone, full, test, args.eval_batch)
    if args.long_history:
        # Same target steps as the 12-step test windows, with a longer history for the backbone.
        long = build_splits(data, input_len=args.long_history, horizon=12)
        shifted = test - (args.long_history - 12)
        result[f"zero-shot FactoST, {args.long_history}-step history"] = score(backbone, long, shifted, args.eval_batch)
    runs = result["runs"]
    few = build_splits(data, input_len=12, horizon=12, few_shot=0.1)
    for seed in args.seeds:
        plans = [
            ("FactoST 10%", "factost", few, args.few_steps),
            ("FactoST 100%", "factost", full, args.full_steps),
            ("STID 10%", "STID", few, args.few_steps),
            ("STID 100%", "STID", full, args.full_steps),
            ("GWNet 10%", "GWNet", few, args.few_steps),
            ("GWNet 100%", "GWNet", full, args.full_steps),
        ]
        for method, kind, splits, steps in plans:
            if kind == "factost":
                metrics = run_factost(backbone, splits, val, test, args, seed, steps)
            else:
                metrics = run_expert(kind, splits, val, test, args, seed, steps)
            runs.setdefault(method, []).append({"seed": seed, **metrics})
            print(f"{name} seed {seed} {method}: MAE {metrics['mae']:.3f} ({metrics['train_seconds']:.0f} s)", flush=True)
        if seed == args.seeds[0] and not args.no_ablation:
            for label, switches in ABLATIONS.items():
                result["ablation"][label] = run_factost(backbone, few, val, test, args, seed, args.few_steps, **switches)
                print(f"{name} ablation {label}: MAE {result['ablation'][label]['mae']:.3f}", flush=True)
    result["summary"] = {method: summarise(method_runs) for method, method_runs in runs.items()}
    result["cost"] = cost(backbone, full, test, args)
    return result


def cost(backbone: FactoSTModel, splits, test: np.ndarray, args: argparse.Namespace) -> dict:
    adapted = factost_model(backbone, splits)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in adapted.parameters())
    batch = splits.collator.gather(test[: args.batch_size])
    models = {"FactoST + adapter": adapted, "STID": expert("STID", splits), "GWNet": expert("GWNet", splits)}
    seconds = {label: forward_seconds(model, batch, args.timing_repeats) for label, model in models.items()}
    return {
        "adapter_parameters": trainable,
        "total_parameters": total,
        "adapter_share": trainable / total,
        "forward_seconds": seconds,
        "forward_batch_windows": int(len(batch["past_values"])),
        "expert_parameters": {
            label: sum(p.numel() for p in model.parameters()) for label, model in models.items() if label != "FactoST + adapter"
        },
    }


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"FactoST, 12 in / 12 out, test = every {args.eval_stride}th test window, median MAE over seeds "
        f"{list(args.seeds)} (min-max); trained methods: at most {args.few_steps} (10%) / {args.full_steps} (100%) "
        f"steps of {args.batch_size} windows, best of validation every {args.eval_every} steps.",
        "",
    ]
    for name, result in results["datasets"].items():
        lines += [f"### {name}", "", "| method | MAE | RMSE | MAPE |", "|---|---|---|---|"]
        for label, metrics in result["baselines"].items():
            lines.append(f"| {label} | {metrics['mae']:.3f} | {metrics['rmse']:.3f} | {metrics['mape']:.3f} |")
        zero = result["zero-shot FactoST"]
        lines.append(f"| FactoST zero-shot | {zero['mae']:.3f} | {zero['rmse']:.3f} | {zero['mape']:.3f} |")
        if args.long_history:
            long = result[f"zero-shot FactoST, {args.long_history}-step history"]
            lines.append(
                f"| FactoST zero-shot, {args.long_history}-step history (same targets) | {long['mae']:.3f} "
                f"| {long['rmse']:.3f} | {long['mape']:.3f} |"
            )
        for label, summary in result["summary"].items():
            lines.append(
                f"| {label} | {summary['mae']:.3f} ({summary['mae_min']:.3f}-{summary['mae_max']:.3f}) "
                f"| {summary['rmse']:.3f} | {summary['mape']:.3f} |"
            )
        if result["ablation"]:
            lines += ["", f"Ablation (few-shot, seed {args.seeds[0]}):", "", "| adapter | MAE |", "|---|---|"]
            lines.append(f"| all parts | {result['runs']['FactoST 10%'][0]['mae']:.3f} |")
            for label, metrics in result["ablation"].items():
                lines.append(f"| {label} | {metrics['mae']:.3f} |")
        cost_ = result["cost"]
        lines += [
            "",
            f"Adapter: {cost_['adapter_parameters']:,} trainable of {cost_['total_parameters']:,} parameters "
            f"({100 * cost_['adapter_share']:.1f}%). Forward time of {cost_['forward_batch_windows']} test windows "
            f"(median of {args.timing_repeats}):",
            "",
            "| model | seconds | ratio to STID |",
            "|---|---|---|",
        ]
        stid = cost_["forward_seconds"]["STID"]
        for label, seconds in cost_["forward_seconds"].items():
            lines.append(f"| {label} | {seconds:.4f} | {seconds / stid:.1f} |")
        lines.append("")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["los-loop", "sz-taxi", "nyc-bike"])
    parser.add_argument("--backbone", default=str(SHIPPED), help="pretrained FactoST folder")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--few-steps", type=int, default=30)
    parser.add_argument("--full-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--eval-stride", type=int, default=12, help="every n-th test window is scored")
    parser.add_argument("--val-stride", type=int, default=24, help="every n-th validation window selects models")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--train-nodes", type=int, default=32)
    parser.add_argument("--factost-lr", type=float, default=3e-3)
    parser.add_argument("--expert-lr", type=float, default=3e-3)
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument(
        "--long-history", type=int, default=96, help="extra zero-shot row with this history (0: off)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation runs")
    parser.add_argument("--output", default=str(RESULTS))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    backbone = FactoSTModel.from_pretrained(args.backbone).eval()
    started = time.perf_counter()
    results = {"protocol": vars(args), "datasets": {}}
    for name in args.datasets:
        results["datasets"][name] = benchmark_dataset(name, backbone, args)
    results["wall_minutes"] = (time.perf_counter() - started) / 60
    results["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads}
    table = markdown(results, args)
    results["table"] = table
    print(table)
    print(f"wall time {results['wall_minutes']:.1f} min")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
