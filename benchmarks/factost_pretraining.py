"""FactoST pretraining at equal CPU time: three sizes, one corpus, resumable across sessions.

    OMP_NUM_THREADS=1 python benchmarks/factost_pretraining.py                    # run or resume the study
    OMP_NUM_THREADS=1 python benchmarks/factost_pretraining.py --max-minutes 90   # stop (checkpointed) after 90 min
    python benchmarks/factost_pretraining.py --status                              # steps done, validation, choice
    python benchmarks/factost_pretraining.py --ship                                # the chosen size into the package
    OMP_NUM_THREADS=1 python benchmarks/factost_pretraining.py --held-out         # finished sizes zero-shot on held-out sets
    OMP_NUM_THREADS=1 python benchmarks/factost_pretraining.py --quick            # 2-minute smoke test, own folder

Protocol (issue 24):
- Sizes ``small`` (147k parameters), ``medium`` (880k) and ``tiny-long`` (4.4M, the paper's tiny
  widths), all with patches of 8 steps, histories up to 2048 steps and horizons up to 64
  (``FACTOST_SIZES``).
- Corpus (``st_peft.models.factost.corpus``, defaults): half synthetic windows, 30% real, 20%
  TSMixup mixtures of real stretches. Real series: every series of nyc-taxi, etth1 and chickenpox,
  and the exchange-rate and influenza series of ``benchmarks/data/pretraining_corpus``. los-loop,
  sz-taxi and nyc-bike are held out for the evaluation (``benchmarks/factost.py``). Corpus seed 0.
- Equal CPU time: each size gets ``BUDGET_CPU_HOURS`` of one thread. Its ``max_steps`` (which the
  cosine schedule spans) is fixed once from a calibration, the process CPU time of
  ``CALIBRATION_STEPS`` steps of a throwaway model on the same stream, and stored in
  ``calibration.json``: later sessions reuse it, so a resumed run keeps its schedule.
- AdamW, peak lr 1e-3 after a warm-up of 2% of the steps, cosine to 10% of the peak, weight decay
  0.01, gradients clipped at 1, domain prompts on half of the batches, seed 0.
- The shipped size is the one with the lowest pinball loss on the corpus's validation slice
  (``VALIDATION_BATCHES`` batches: synthetic windows of their own seed stream, and real windows
  forecasting the last 10% of every real series, which no training window reaches) at the end of
  its budget. The held-out data sets play no part in the choice.
- ``--held-out`` scores every finished size zero-shot on the held-out sets' test windows with
  ``benchmarks/factost.py``'s units (histories of ``HELD_OUT_CONTEXTS`` steps; results under ``<size>/held_out/``)
  and ``--status`` reports each MAE against seasonal naive's. This says which knob moves the
  zero-shot numbers; it is read after the choice, never in it.

The sizes run one after another in the order above; every run folder under
``benchmarks/results/factost_pretraining/<size>/`` checkpoints every 10 minutes and at a stop, and
is resumed bit for bit by the next invocation. ``--status`` writes
``benchmarks/results/factost_pretraining.json``. ``--ship`` copies the chosen size's model into
``st_peft/checkpoints/factost-<size>/`` with a model card written from the study's records.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from st_peft.models.factost.configuration_factost import FactoSTConfig
from st_peft.models.factost.corpus import read_real_series
from st_peft.models.factost.modeling_factost import FactoSTModel
from st_peft.models.factost.pretraining import PretrainingOptions, build_corpus, pretrain, pretraining_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import factost as held_out_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "factost_pretraining"
QUICK_RESULTS = ROOT / "benchmarks" / "results" / "factost_pretraining_quick"
SUMMARY = ROOT / "benchmarks" / "results" / "factost_pretraining.json"
CORPUS_FILES = ROOT / "benchmarks" / "data" / "pretraining_corpus"
REAL_DATA = ["nyc-taxi", "etth1", "chickenpox", str(CORPUS_FILES / "exchange_rate.csv"),
             str(CORPUS_FILES / "national_illness.csv")]
SIZES = ["small", "medium", "tiny-long"]
BUDGET_CPU_HOURS = 3.0
CALIBRATION_STEPS = 30
VALIDATION_BATCHES = 32
LEARNING_RATE = 1e-3
SEED = 0
HELD_OUT_CONTEXTS = ("12", "256", "1024", "long")  # steps of history; "long" is the size's max_context_length


def calibrate(config: FactoSTConfig, corpus, steps: int) -> float:
    """Process CPU seconds per training step of a throwaway model on the first ``steps`` batches."""
    torch.manual_seed(SEED)
    model = FactoSTModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    pretraining_loss(model, config, corpus.batch(0), False).backward()  # the first step pays one-off costs
    started = time.process_time()
    for index in range(steps):
        loss = pretraining_loss(model, config, corpus.batch(index), index % 2 == 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.process_time() - started) / steps


def run_size(size: str, root: Path, budget_hours: float, calibration_steps: int, max_minutes: float | None,
             validation_batches: int) -> dict:
    """Run (or resume) one size until its budget is spent or ``max_minutes`` pass; return its log."""
    folder = root / size
    folder.mkdir(parents=True, exist_ok=True)
    config = FactoSTConfig.from_size(size)
    corpus = build_corpus(config, read_real_series(REAL_DATA), seed=SEED)
    calibration_path = folder / "calibration.json"
    if calibration_path.exists():
        calibration = json.loads(calibration_path.read_text())
    else:
        seconds = calibrate(config, corpus, calibration_steps)
        calibration = {"cpu_seconds_per_step": seconds, "budget_cpu_hours": budget_hours,
                       "max_steps": max(10, int(budget_hours * 3600 / seconds)), "steps_timed": calibration_steps,
                       "threads": torch.get_num_threads()}
        calibration_path.write_text(json.dumps(calibration, indent=1))
    max_steps = calibration["max_steps"]
    options = PretrainingOptions(max_steps=max_steps, learning_rate=LEARNING_RATE,
                                 warmup_steps=max(1, max_steps // 50), seed=SEED)
    print(f"{size}: {sum(p.numel() for p in FactoSTModel(config).parameters()):,} parameters, "
          f"{max_steps} steps ({calibration['cpu_seconds_per_step']:.3f} CPU s/step)", flush=True)
    return pretrain(config, corpus, folder, options, data=REAL_DATA, max_minutes=max_minutes, cpu=True,
                    validation_batches=validation_batches, validate_every=max(1, max_steps // 10),
                    log_every=max(1, min(200, max_steps // 50)))


def held_out_zero_shot(folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Zero-shot test MAE of a finished size on each held-out set, and its ratio to seasonal naive's.

    ``{dataset: {context: {"mae", "context_steps", "ratio_to_seasonal_naive"}}}`` from the units
    ``--held-out`` wrote under ``folder / "held_out"``; empty where none ran.
    """
    found: dict[str, dict[str, dict[str, float]]] = {}
    for dataset in held_out_benchmark.HELD_OUT:
        naive = held_out_benchmark.RESULTS / f"{held_out_benchmark.Unit('seasonal naive', dataset, '12').key}.json"
        for setting in HELD_OUT_CONTEXTS:
            path = folder / "held_out" / f"{held_out_benchmark.Unit('zero-shot', dataset, setting).key}.json"
            if not path.exists():
                continue
            record = json.loads(path.read_text())
            row = {"mae": record["metrics"]["mae"], "context_steps": record["context"]}
            if naive.exists():
                row["ratio_to_seasonal_naive"] = row["mae"] / json.loads(naive.read_text())["metrics"]["mae"]
            found.setdefault(dataset, {})[setting] = row
    return found


def status(root: Path) -> dict:
    """Steps done, CPU hours and validation of every size, and the choice once every size is finished."""
    rows = {}
    for size in SIZES:
        folder = root / size
        state_path = folder / "checkpoint" / "state.json"
        if not state_path.exists():
            rows[size] = {"started": False}
            continue
        state = json.loads(state_path.read_text())
        calibration = json.loads((folder / "calibration.json").read_text())
        config = FactoSTConfig.from_size(size)
        rows[size] = {
            "started": True,
            "parameters": sum(p.numel() for p in FactoSTModel(config).parameters()),
            "steps": state["step"],
            "max_steps": calibration["max_steps"],
            "finished": state["step"] >= calibration["max_steps"],
            "cpu_hours": state["cpu_seconds"] / 3600,
            "windows": state["windows"],
            "windows_per_cpu_second": state["windows"] / max(state["cpu_seconds"], 1e-9),
            "peak_rss_mib": state.get("peak_rss_mib"),
            "validation": state["validation"][-1] if state["validation"] else None,
            "calibration": calibration,
            "held_out_zero_shot": held_out_zero_shot(folder),
        }
    finished = {size: row for size, row in rows.items() if row.get("finished")}
    choice = None
    if len(finished) == len(SIZES):
        choice = min(finished, key=lambda size: finished[size]["validation"]["all"])
    return {"budget_cpu_hours_per_size": BUDGET_CPU_HOURS, "real_data": [Path(name).name for name in REAL_DATA],
            "sizes": rows, "chosen": choice}


MAX_SHIPPED_BYTES = 20 * 1024 * 1024
CARD = """# factost-{size}: the shipped FactoST backbone

A `FactoSTModel` (model type `factost`) of the named size `{size}`: patches of {patch} steps, width
{width}, {layers} rotary encoder layers, {heads} heads, 9 quantiles (the median is the point
forecast), histories up to {context} steps, horizons up to {horizon} steps in one pass (longer by
rollout), a codebook of domain prompts; {parameters:,} parameters. Load it with

```python
from transformers import AutoModel
import st_peft  # registers the model type

model = AutoModel.from_pretrained(st_peft.shipped_checkpoint("factost-{size}"))
```

## Pretraining

- Corpus (`st_peft/models/factost/corpus.py`, streamed, seed 0): synthetic series (weight
  {synthetic}), real series (weight {real}) and TSMixup mixtures of real stretches (weight {mixup}).
  Real series: {real_sources}. Skipped series: {skipped}.
- **Held out**: los-loop, sz-taxi and nyc-bike are in no part of the corpus; `benchmarks/factost.py`
  evaluates zero- and few-shot forecasting on them.
- {steps:,} steps of AdamW (peak lr {lr:g}, cosine to 10%), {windows:,} windows,
  {cpu_hours:.2f} CPU-hours on one thread ({throughput:.0f} windows per CPU second), peak memory
  {peak_rss}.
- Chosen by the equal-CPU-time scaling study (`benchmarks/factost_pretraining.py`, {budget:g}
  CPU-hours per size) as the size with the lowest pinball loss on the corpus's validation slice:

{sizes_table}

## Reproducing this checkpoint

```bash
OMP_NUM_THREADS=1 python benchmarks/factost_pretraining.py     # resumable; repeat until every size is done
python benchmarks/factost_pretraining.py --ship
```
"""


def ship(root: Path, checkpoints: Path) -> Path:
    """Copy the chosen size's model into ``checkpoints/factost-<size>`` with its card; return the folder.

    Raises:
        SystemExit: the study is not finished, or the weights exceed ``MAX_SHIPPED_BYTES``.
    """
    summary = status(root)
    size = summary["chosen"]
    if size is None:
        unfinished = [name for name, row in summary["sizes"].items() if not row.get("finished")]
        raise SystemExit(f"the scaling study is not finished ({', '.join(unfinished)} still to run); nothing shipped")
    source = root / size
    weights = source / "model.safetensors"
    if weights.stat().st_size > MAX_SHIPPED_BYTES:
        raise SystemExit(f"{weights} has {weights.stat().st_size:,} bytes, more than the {MAX_SHIPPED_BYTES:,} a wheel may carry")
    target = checkpoints / f"factost-{size}"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "pretraining_log.json"):
        shutil.copyfile(source / name, target / name)
    options = json.loads((source / "options.json").read_text())
    row = summary["sizes"][size]
    config = FactoSTConfig.from_size(size)
    sizes_table = "\n".join(
        ["| size | parameters | steps | CPU-hours | validation pinball |", "|---|---|---|---|---|"]
        + [f"| {name} | {other['parameters']:,} | {other['steps']:,} | {other['cpu_hours']:.2f} | "
           f"{other['validation']['all']:.4f} |" for name, other in summary["sizes"].items()]
    )
    corpus = options["corpus"]
    (target / "README.md").write_text(CARD.format(
        size=size, patch=config.patch_length, width=config.hidden_size, layers=config.num_hidden_layers,
        heads=config.num_attention_heads, context=config.max_context_length, horizon=config.max_horizon,
        parameters=row["parameters"], synthetic=corpus["synthetic_weight"], real=corpus["real_weight"],
        mixup=corpus["mixup_weight"],
        real_sources=", ".join(f"{name} ({count})" for name, count in options["real_sources"].items()),
        skipped=options["skipped_series"] or "none", steps=row["steps"], lr=options["options"]["learning_rate"],
        windows=row["windows"], cpu_hours=row["cpu_hours"], throughput=row["windows_per_cpu_second"],
        peak_rss=f"{row['peak_rss_mib']:.0f} MiB" if row.get("peak_rss_mib") else "not recorded",
        budget=summary["budget_cpu_hours_per_size"], sizes_table=sizes_table,
    ))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop, checkpointed, after this wall time")
    parser.add_argument("--status", action="store_true", help="print and write the study's state")
    parser.add_argument("--quick", action="store_true", help="a smoke test of a few CPU seconds per size")
    parser.add_argument("--ship", action="store_true", help="copy the chosen size into the package, with its card")
    parser.add_argument("--held-out", action="store_true",
                        help="score every finished size zero-shot on the held-out sets (after the choice, not in it)")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "st_peft" / "checkpoints",
                        help="where --ship puts the chosen backbone")
    args = parser.parse_args()
    root = QUICK_RESULTS if args.quick else RESULTS
    if args.ship:
        print(f"shipped {ship(root, args.checkpoints)}")
        return
    if args.held_out:
        torch.set_num_threads(1)
        for size, row in status(root)["sizes"].items():
            if row.get("finished"):
                todo = [held_out_benchmark.Unit("zero-shot", dataset, context)
                        for dataset in held_out_benchmark.HELD_OUT for context in HELD_OUT_CONTEXTS]
                held_out_benchmark.run_units(root / size / "held_out", todo, root / size)
        return
    if args.status:
        summary = status(root)
        print(json.dumps(summary, indent=1))
        if not args.quick:
            SUMMARY.write_text(json.dumps(summary, indent=1))
        return
    started = time.perf_counter()
    for size in SIZES:
        left = None if args.max_minutes is None else args.max_minutes - (time.perf_counter() - started) / 60
        if left is not None and left <= 0:
            break
        if args.quick:
            log = run_size(size, root, budget_hours=10 / 3600, calibration_steps=2, max_minutes=left,
                           validation_batches=2)
        else:
            log = run_size(size, root, BUDGET_CPU_HOURS, CALIBRATION_STEPS, left, VALIDATION_BATCHES)
        if not log["finished"]:
            print(f"{size}: stopped at step {log['steps']} of {log['max_steps']}; run again to resume", flush=True)
            sys.exit(0)
    print(json.dumps(status(root), indent=1))


if __name__ == "__main__":
    main()
