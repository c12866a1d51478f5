"""Speed of the data pipeline and the Trainer's overhead over a bare training loop.

    python benchmarks/pipeline.py [--loader-repeats 15] [--repeats 5] [--steps 40]

1. Data pipeline: batches per second of 64 windows (12 in, 12 out) over the 200 nodes of
   nyc-taxi, through a ``torch.utils.data.DataLoader`` over the split's ``datasets.Dataset``
   of window starts with the collator (shuffled, one process), one epoch (31 batches) per
   repeat, ``--loader-repeats`` times: a single epoch varies by +-15% on a shared machine.
2. Trainer overhead: the same STID on los-loop trained for ``--steps`` steps by a bare loop
   (AdamW, the model's own masked MAE in original units, gradient clipping at 5) and by
   ``STTrainer`` (no evaluation, no checkpoint, no logging), alternated, ``--repeats`` times;
   the ratio of medians is reported.
3. With ``--baseline-tree DIR`` (a checkout of another revision, e.g. ``git worktree add
   ../old <rev>``), the loader is also timed side by side against that tree's code: each
   round runs three epochs with this tree's package and three with ``DIR``'s (in fresh
   processes, alternating), so that a busy machine slows both alike; the ratio of medians
   is reported.
Writes ``benchmarks/results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_backbone, markdown_table, timed, write_results  # noqa: E402

from st_peft.data import build_splits, load  # noqa: E402
from st_peft.training import STTrainer, st_training_args  # noqa: E402

BATCH_SIZE = 64


def pipeline_batches_per_second(repeats: int) -> list[float]:
    """Batches per second of one shuffled epoch over nyc-taxi, per repeat."""
    splits = build_splits(load("nyc-taxi"), input_len=12, horizon=12)
    loader = DataLoader(splits.train, batch_size=BATCH_SIZE, shuffle=True, collate_fn=splits.collator)
    batches = len(loader)

    def epoch() -> None:
        for _ in loader:
            pass

    return [batches / seconds for seconds in timed(epoch, repeats)]


def loader_side_by_side(baseline_tree: str, rounds: int) -> dict[str, list[float]]:
    """Batches per second of this tree's loader and ``baseline_tree``'s, alternating in fresh processes."""
    here = str(Path(__file__).resolve().parent.parent)
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import pipeline; "
        "print(json.dumps(pipeline.pipeline_batches_per_second(3)))"
    )
    rates: dict[str, list[float]] = {"this tree": [], "baseline tree": []}
    for _ in range(rounds):
        for label, tree in (("this tree", here), ("baseline tree", baseline_tree)):
            env = {**os.environ, "PYTHONPATH": tree}
            done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).resolve().parent)], env=env,
                                  capture_output=True, text=True, check=True)
            rates[label] += json.loads(done.stdout.strip().splitlines()[-1])
    return rates


def bare_loop(model, splits, steps: int, seed: int) -> None:
    """Train ``steps`` steps the way a hand-written loop would."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loader = DataLoader(splits.train, batch_size=BATCH_SIZE, shuffle=True, collate_fn=splits.collator)
    done = 0
    while done < steps:
        for batch in loader:
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            done += 1
            if done == steps:
                return


def trainer_loop(model, splits, steps: int, seed: int) -> None:
    """Train ``steps`` steps with STTrainer, evaluation and checkpoints off."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = st_training_args(output_dir, batch_size=BATCH_SIZE, lr=2e-3, seed=seed, max_steps=steps,
                                eval_strategy="no", save_strategy="no", logging_strategy="no",
                                load_best_model_at_end=False, disable_tqdm=True)
        STTrainer(model, args, train_dataset=splits.train, data_collator=splits.collator).train()


def main() -> None:
    """Run both measurements, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loader-repeats", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--baseline-tree", help="a checkout of another revision to time the loader against")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds of the side-by-side loader timing")
    options = parser.parse_args()

    pipeline = pipeline_batches_per_second(options.loader_repeats)
    splits = build_splits(load("los-loop"), input_len=12, horizon=12)
    bare, trainer = [], []
    for repeat in range(options.repeats):
        for loop, times in ((bare_loop, bare), (trainer_loop, trainer)):
            model = build_backbone("stid", splits, repeat)
            times += timed(partial(loop, model, splits, options.steps, repeat), 1)
    overhead = statistics.median(trainer) / statistics.median(bare) - 1
    rows = [
        [f"data pipeline, nyc-taxi (200 nodes), 64 windows (median of {options.loader_repeats} epochs)", "batches/s",
         statistics.median(pipeline), ">= 1000"],
        [f"bare loop, STID on los-loop, {options.steps} steps", "s", statistics.median(bare), "-"],
        ["STTrainer, same model and steps", "s", statistics.median(trainer), "-"],
        ["Trainer overhead (ratio of medians - 1)", "%", 100 * overhead, "<= 10"],
    ]
    side_by_side = None
    if options.baseline_tree:
        side_by_side = loader_side_by_side(options.baseline_tree, options.rounds)
        ratio = statistics.median(side_by_side["this tree"]) / statistics.median(side_by_side["baseline tree"])
        rows.append([f"loader, this tree / {options.baseline_tree} (side by side, {options.rounds} rounds)", "ratio",
                     ratio, "-"])
    table = markdown_table(["measurement", "unit", f"median of {options.repeats}", "target"], rows)
    print(table)
    path = write_results("pipeline", {"protocol": __doc__, "pipeline_batches_per_second": pipeline,
                                      "bare_loop_seconds": bare, "trainer_seconds": trainer,
                                      "trainer_overhead": overhead, "loader_side_by_side": side_by_side,
                                      "load_average": os.getloadavg(), "table": table})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
