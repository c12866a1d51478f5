"""Does node batching keep the accuracy of full-graph training? STID on nyc-taxi and sz-taxi.

    python benchmarks/node_batching_accuracy.py              # every run (resumes: finished runs are kept)
    python benchmarks/node_batching_accuracy.py --quick      # one short run per arm on sz-taxi (smoke test)
    python benchmarks/node_batching_accuracy.py --table      # the table of what is done so far

Protocol (issue 22): 12 steps in, 12 out, chronological splits 7:1:2 with the training span's
scaling (``load_splits`` of ``st_lora_convergence.py``); STID at its paper widths, initialised from
the seed. Two arms train the same model with the same ``STTrainer`` recipe (``common.train_and_test``:
AdamW lr 2e-3, weight decay 1e-4, linear decay over the epoch budget, batch 32 windows, gradients
clipped at 5), evaluate the whole validation split after every epoch, keep the best and stop after
:data:`PATIENCE` epochs without a lower validation MAE (budget :data:`EPOCHS`), then score the
whole test split:

- ``full``: every batch carries all ``N`` nodes; an epoch is one pass over the training windows;
- ``nodes``: every batch carries ``K = round(N / 3)`` nodes drawn uniformly anew per batch
  (``STTrainer(node_sampler=NodeSampler(N, K))``), evaluated over every node in chunks of ``K``;
  an epoch is ``ceil(N / K)`` passes over the training windows (the trainer's node-batched epoch),
  so both arms see every (window, node) pair about once per epoch.

Each run's JSON keeps its validation MAE after every epoch (``val_mae_per_epoch``), from which its
best epoch can be checked. Node-batched runs made before the node-batched epoch covered
``ceil(N / K)`` passes (one pass per epoch) are kept under ``node_batching_accuracy_one_pass/``.

Seeds 0, 1, 2 (weights, batch order and node draws). Target: the node-batched test MAE (mean over
seeds) within 2% of full-graph training, that is at most 2% above it: accuracy holds when node
batching loses at most 2%, and a lower MAE is not a miss (the table shows the signed change, so a
gain of more than 2% stays visible). Each run is a JSON under ``benchmarks/results/node_batching_accuracy/``
(runs there are skipped, so an interrupted study resumes); the table is printed and written to
``benchmarks/results/node_batching_accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, train_and_test, write_results  # noqa: E402
from st_lora_convergence import build_backbone, load_splits  # noqa: E402

from st_peft.data.node_batching import NodeSampler  # noqa: E402
from st_peft.runs import write_json_atomic  # noqa: E402

DATASETS = ("sz-taxi", "nyc-taxi")
ARMS = ("full", "nodes")
SEEDS = (0, 1, 2)
EPOCHS, PATIENCE, BATCH, LR = 100, 10, 32, 2e-3
QUICK_EPOCHS, QUICK_PATIENCE = 3, 2
TOLERANCE = 0.02
RUNS = RESULTS / "node_batching_accuracy"
QUICK_RUNS = RESULTS / "node_batching_accuracy_quick"


def nodes_per_batch(num_nodes: int) -> int:
    """``K``: a third of the graph's nodes."""
    return round(num_nodes / 3)


def run(dataset: str, arm: str, seed: int, epochs: int, patience: int) -> dict:
    """Train one arm of one seed on ``dataset``; its test metrics, epochs and cost."""
    splits = load_splits(dataset)
    model = build_backbone("stid", splits, seed)
    sampler = NodeSampler(splits.num_nodes, nodes_per_batch(splits.num_nodes), seed=seed) if arm == "nodes" else None
    wall, cpu = time.perf_counter(), time.process_time()
    metrics, trainer = train_and_test(model, splits, seed, epochs, patience=patience, lr=LR, batch_size=BATCH,
                                      trainer_kwargs={"node_sampler": sampler})
    passes = sampler.passes_per_epoch if sampler else 1
    steps_per_epoch = -(-passes * len(splits.train) // BATCH)
    best_step = trainer.state.best_global_step or trainer.state.global_step
    curve = [entry["eval_mae"] for entry in trainer.state.log_history if "eval_mae" in entry]
    return {
        "dataset": dataset, "arm": arm, "seed": seed, "num_nodes": splits.num_nodes,
        "nodes_per_batch": sampler.nodes_per_batch if sampler else splits.num_nodes,
        "test": metrics, "best_val_mae": trainer.state.best_metric,
        "passes_per_epoch": passes, "steps_per_epoch": steps_per_epoch, "optimizer_steps": trainer.state.global_step,
        "best_epoch": best_step // steps_per_epoch, "epochs_run": round(trainer.state.global_step / steps_per_epoch),
        "val_mae_per_epoch": curve,
        "epoch_budget": epochs, "patience": patience,
        "train_seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
    }


def run_all(folder: Path, datasets: tuple[str, ...], seeds: tuple[int, ...], epochs: int, patience: int) -> None:
    """Run every (data set, seed, arm) not already in ``folder``, writing one JSON per run."""
    folder.mkdir(parents=True, exist_ok=True)
    for dataset in datasets:
        for seed in seeds:
            for arm in ARMS:
                path = folder / f"{dataset}-{arm}-seed{seed}.json"
                if path.exists():
                    continue
                record = run(dataset, arm, seed, epochs, patience)
                write_json_atomic(path, record)
                print(f"{dataset} {arm} seed {seed}: test MAE {record['test']['mae']:.4f}, best epoch "
                      f"{record['best_epoch']} of {record['epochs_run']}, {record['cpu_seconds'] / 60:.1f} CPU-min",
                      flush=True)


def table(folder: Path) -> dict:
    """Per data set: both arms' test MAE over the seeds done, and the node-batched change."""
    records = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    rows, summary = [], {}
    for dataset in DATASETS:
        mine = [r for r in records if r["dataset"] == dataset]
        seeds = sorted({r["seed"] for r in mine if r["arm"] == "full"} & {r["seed"] for r in mine if r["arm"] == "nodes"})
        if not seeds:
            continue
        mae = {arm: [next(r["test"]["mae"] for r in mine if r["arm"] == arm and r["seed"] == s) for s in seeds]
               for arm in ARMS}
        epochs = {arm: [next(r["best_epoch"] for r in mine if r["arm"] == arm and r["seed"] == s) for s in seeds]
                  for arm in ARMS}
        cpu = {arm: sum(r["cpu_seconds"] for r in mine if r["arm"] == arm and r["seed"] in seeds) / 60 for arm in ARMS}
        changes = [b / a - 1 for a, b in zip(mae["full"], mae["nodes"], strict=True)]
        change = statistics.mean(mae["nodes"]) / statistics.mean(mae["full"]) - 1
        k = next(r["nodes_per_batch"] for r in mine if r["arm"] == "nodes")
        n = next(r["num_nodes"] for r in mine)
        summary[dataset] = {"num_nodes": n, "nodes_per_batch": k, "seeds": seeds, "mae": mae, "best_epoch": epochs,
                            "change_of_mean": change, "changes": changes, "cpu_minutes": cpu,
                            "within_target": change <= TOLERANCE}
        rows.append([dataset, n, k, len(seeds), f"{statistics.mean(mae['full']):.4f}",
                     f"{statistics.mean(mae['nodes']):.4f}", f"{100 * change:+.2f}%",
                     " ".join(f"{100 * c:+.1f}" for c in changes),
                     f"{statistics.mean(epochs['full']):.0f} / {statistics.mean(epochs['nodes']):.0f}",
                     f"{cpu['full']:.1f} / {cpu['nodes']:.1f}", "yes" if change <= TOLERANCE else "no"])
    header = ["data", "N", "K", "seeds", "full MAE", "node-batched MAE", "change", "per seed (%)",
              "best epoch (full / nodes)", "CPU-min (full / nodes)", "at most 2% worse"]
    print(markdown_table(header, rows))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"sz-taxi, seed 0, {QUICK_EPOCHS} epochs")
    parser.add_argument("--table", action="store_true", help="print the table of the runs done; run nothing")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    options = parser.parse_args()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" at every checkpoint
    folder = QUICK_RUNS if options.quick else RUNS
    if not options.table:
        if options.quick:
            run_all(folder, ("sz-taxi",), (0,), QUICK_EPOCHS, QUICK_PATIENCE)
        else:
            run_all(folder, tuple(options.datasets), tuple(options.seeds), EPOCHS, PATIENCE)
    summary = table(folder)
    if not options.quick:
        path = write_results("node_batching_accuracy", {"protocol": {"epochs": EPOCHS, "patience": PATIENCE,
                                                                     "batch_size": BATCH, "lr": LR},
                                                        "datasets": summary})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
