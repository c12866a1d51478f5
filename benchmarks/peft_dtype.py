"""bfloat16 against float32 for trained st-peft adapters: forecast error and training-step time.

    python benchmarks/peft_dtype.py [--quick] [--dataset los-loop] [--backbone-steps 300]
                                    [--adapter-steps 300] [--repeats 5]

1. **Forecast error.** On the data set (12 steps in, 12 out), STID is trained for
   ``--backbone-steps`` steps (AdamW, lr 2e-3, batch 32, masked MAE) and frozen; each adapter is
   then trained for ``--adapter-steps`` steps (lr 5e-3): ST-LoRA (default config plus NALLs on
   ``fc1``) and, as the control, peft's LoRA (rank 4 on ``fc1`` and ``fc2``) on STID, and FACTOST
   (default config, batch 8) on the shipped pretrained FactoST backbone (``checkpoints/factost-cpu``,
   which never saw los-loop). Each model forecasts the first 512 test windows in float32, under
   ``torch.autocast("cpu", dtype=torch.bfloat16)`` and cast to bfloat16 (``model.to(torch.bfloat16)``);
   the table gives the largest and the mean absolute difference from the float32 forecast, both
   also relative to the mean absolute float32 forecast, and the masked MAE of each forecast.
2. **Training-step time.** One ST-LoRA training step (forward, loss, backward, AdamW step; NALLs
   on ``fc1`` / ``filter_conv``) on STID and on GWNet, batch 32, in float32 and under bfloat16
   autocast: the median, over ``--repeats`` interleaved repeats, of the mean of 3 steps.

Backbone sizes are ``benchmarks/common.py``'s (STID at the paper's widths, GWNet at its CPU
widths). Prints markdown tables and writes ``benchmarks/results/peft_dtype.json``
(``peft_dtype_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_backbone, markdown_table, write_results  # noqa: E402

from st_peft.data import ForecastingSplits, build_splits, load  # noqa: E402
from st_peft.forecasting import forecast_loss  # noqa: E402
from st_peft.losses import masked_mae  # noqa: E402
from st_peft.models.factost import FactoSTModel  # noqa: E402
from st_peft.shipped import shipped_checkpoint  # noqa: E402
from st_peft.tuners.factost import FactoSTAdapterConfig  # noqa: E402
from st_peft.tuners.st_lora import STLoraConfig  # noqa: E402

BATCH = 32
FACTOST_BATCH = 8  # a FactoST step over 207 nodes costs about ten STID steps on two cores
TEST_WINDOWS = 512
NALL_TARGETS = {"stid": ["fc1"], "gwnet": ["filter_conv"]}


def training_batches(splits: ForecastingSplits, seed: int, batch_size: int = BATCH) -> Iterator[dict]:
    """Endless batches of training windows drawn at random (with a seeded generator)."""
    starts = np.asarray(splits.train["start"], dtype=np.int64)
    generator = np.random.default_rng(seed)
    while True:
        yield splits.collator.gather(np.sort(generator.choice(starts, size=batch_size, replace=False)))


def train(model: nn.Module, splits: ForecastingSplits, steps: int, lr: float, seed: int,
          batch_size: int = BATCH) -> float:
    """``steps`` AdamW steps of the model's trainable weights on its own loss; returns the seconds it took."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = training_batches(splits, seed, batch_size)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(**next(batches)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return time.perf_counter() - start


def forecasts(model: nn.Module, splits: ForecastingSplits, mode: str) -> tuple[torch.Tensor, float]:
    """The model's float32-or-wider forecast of the first test windows in ``mode``, and its masked MAE."""
    if mode == "cast":
        model = copy.deepcopy(model).to(torch.bfloat16)
    predictions, errors, counts = [], [], []
    seen = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        for batch in splits.iter_batches("test", batch_size=64):
            prediction = model(**batch).prediction_outputs.float()
            predictions.append(prediction)
            mask = batch["future_observed_mask"]
            errors.append(float(forecast_loss(prediction, batch["future_values"], mask, masked_mae, model="bench")))
            counts.append(int(mask.sum()))
            seen += len(prediction)
            if seen >= TEST_WINDOWS:
                break
    return torch.cat(predictions), float(np.average(errors, weights=counts))


def error_row(name: str, model: nn.Module, splits: ForecastingSplits, seconds: float) -> dict:
    """bfloat16 forecasts (autocast and cast) against the float32 forecast of the trained ``model``."""
    reference, reference_mae = forecasts(model, splits, "float32")
    scale = float(reference.abs().mean())
    row = {"model": name, "train_seconds": seconds, "mae_float32": reference_mae, "mean_abs_forecast": scale}
    for mode in ("autocast", "cast"):
        prediction, mae = forecasts(model, splits, mode)
        difference = (prediction - reference).abs()
        row[mode] = {"max_abs": float(difference.max()), "mean_abs": float(difference.mean()),
                     "max_rel": float(difference.max()) / scale, "mean_rel": float(difference.mean()) / scale,
                     "mae": mae, "dtype": str(prediction.dtype)}
    return row


def trained_backbone(name: str, splits: ForecastingSplits, steps: int) -> tuple[nn.Module, float]:
    backbone = build_backbone(name, splits, seed=0)
    seconds = train(backbone, splits, steps, lr=2e-3, seed=0)
    return backbone.requires_grad_(False), seconds


def accuracy(splits: ForecastingSplits, backbone_steps: int, adapter_steps: int) -> list[dict]:
    sizes = splits.size_kwargs()
    backbone, seconds = trained_backbone("stid", splits, backbone_steps)
    rows = [error_row(f"STID (backbone, {backbone_steps} steps)", backbone, splits, seconds)]
    torch.manual_seed(1)
    st_lora = get_peft_model(copy.deepcopy(backbone), STLoraConfig(**sizes, target_modules=["fc1"]))
    rows.append(error_row("STLORA on STID", st_lora, splits, train(st_lora, splits, adapter_steps, 5e-3, 1)))
    torch.manual_seed(1)
    lora = get_peft_model(copy.deepcopy(backbone), LoraConfig(target_modules=["fc1", "fc2"], r=4))
    rows.append(error_row("LORA on STID (control)", lora, splits, train(lora, splits, adapter_steps, 5e-3, 1)))
    pretrained = FactoSTModel.from_pretrained(shipped_checkpoint("factost-cpu")).eval()
    rows.append(error_row("FactoST (shipped backbone, zero-shot)", pretrained, splits, 0.0))
    torch.manual_seed(1)
    factost = get_peft_model(copy.deepcopy(pretrained), FactoSTAdapterConfig(**sizes,
                                                                             steps_per_day=splits.steps_per_day))
    seconds = train(factost, splits, adapter_steps, 5e-3, 1, batch_size=FACTOST_BATCH)
    rows.append(error_row("FACTOST on FactoST", factost, splits, seconds))
    return rows


def mean_step_seconds(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, autocast: bool,
                      count: int = 3) -> float:
    """Mean seconds of ``count`` training steps (forward and loss, optionally under bfloat16 autocast; backward;
    optimiser step)."""
    start = time.perf_counter()
    for _ in range(count):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / count


def step_time(splits: ForecastingSplits, repeats: int) -> list[dict]:
    """Median seconds of one ST-LoRA training step on STID and GWNet, float32 against bfloat16 autocast."""
    rows = []
    batch = next(training_batches(splits, seed=3))
    for name in ("stid", "gwnet"):
        model = get_peft_model(build_backbone(name, splits, seed=0), STLoraConfig(**splits.size_kwargs(),
                                                                               target_modules=NALL_TARGETS[name]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        runs: dict[str, list[float]] = {"float32": [], "bf16": []}
        for autocast in (False, True):
            mean_step_seconds(model, optimizer, batch, autocast, count=3)  # warm-up
        for _ in range(repeats):
            for mode, autocast in (("float32", False), ("bf16", True)):
                runs[mode].append(mean_step_seconds(model, optimizer, batch, autocast))
        float32, bfloat16 = statistics.median(runs["float32"]), statistics.median(runs["bf16"])
        rows.append({"backbone": name, "float32_ms": 1e3 * float32, "bf16_autocast_ms": 1e3 * bfloat16,
                     "ratio": bfloat16 / float32,
                     "runs_ms": {mode: [1e3 * seconds for seconds in times] for mode, times in runs.items()}})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="los-loop")
    parser.add_argument("--backbone-steps", type=int, default=300)
    parser.add_argument("--adapter-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="30 steps each and 2 repeats, to try the script")
    options = parser.parse_args(argv)
    if options.quick:
        options.backbone_steps, options.adapter_steps, options.repeats = 30, 30, 2
    splits = build_splits(load(options.dataset), input_len=12, horizon=12)
    errors = accuracy(splits, options.backbone_steps, options.adapter_steps)
    timing = step_time(splits, options.repeats)

    def cells(row: dict, mode: str) -> list[object]:
        part = row[mode]
        return [part["max_abs"], f"{100 * part['max_rel']:.2f}%", part["mean_abs"], f"{100 * part['mean_rel']:.3f}%",
                part["mae"]]

    print(f"\n{options.dataset}: bfloat16 against float32 forecasts of {TEST_WINDOWS} test windows "
          f"(mean |forecast| in the last column)\n")
    header = ["model", "MAE fp32", "autocast max abs", "max rel", "mean abs", "mean rel", "MAE",
              "cast max abs", "max rel", "mean abs", "mean rel", "MAE", "mean |y|"]
    print(markdown_table(header, [[row["model"], row["mae_float32"], *cells(row, "autocast"), *cells(row, "cast"),
                                   row["mean_abs_forecast"]] for row in errors]))
    print(f"\nST-LoRA training step, batch {BATCH}, {options.dataset} "
          f"(median of {options.repeats} interleaved repeats of 3 steps)\n")
    print(markdown_table(["backbone", "float32 ms", "bf16 autocast ms", "bf16 / fp32"],
                         [[row["backbone"], row["float32_ms"], row["bf16_autocast_ms"], row["ratio"]]
                          for row in timing]))
    path = write_results("peft_dtype" + ("_quick" if options.quick else ""), {
        "dataset": options.dataset, "backbone_steps": options.backbone_steps, "adapter_steps": options.adapter_steps,
        "test_windows": TEST_WINDOWS, "forecast_error": errors, "step_time": timing, "batch_size": BATCH,
        "repeats": options.repeats,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
