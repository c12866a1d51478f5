"""FactoST measured to convergence on data sets held out from pretraining, against STID, naive forecasts and fracast.

    python benchmarks/factost.py                          # run or resume every unit (the shipped backbone)
    python benchmarks/factost.py --backbone PATH          # another pretrained FactoST folder
    python benchmarks/factost.py --aggregate              # tables, paired intervals, summary JSON
    python benchmarks/factost.py --list                   # the units and which are done
    python benchmarks/factost.py --quick                  # smoke test on one data set, own folder
    python benchmarks/factost.py --methods stid fracast   # only these rows' units (those without a backbone
                                                          # can run while it is still pretraining)

Protocol (issue 24), on the protocol of ``benchmarks/st_lora_convergence.py`` (whose splits,
training loop and bootstrap it imports):

- Held-out data: los-loop (5 min), sz-taxi (15 min) and nyc-bike (1 h), none of them in the
  pretraining corpus. Windows of 12 steps in, 12 out, chronological 7:1:2 splits; every method is
  scored on the same targets: every ``TEST_STRIDE``-th test window (12 = horizons that do not
  overlap), masked MAE / RMSE in original units over all horizons and at horizons 3, 6 and 12.
- Contexts. The 12-step window is the ST benchmark's. FactoST and fracast may see a longer
  history ending at the same step, taken from the series and marked missing where the series
  has none (a test window of los-loop, a week of data, has at most about 5.6 days behind it):
  zero-shot rows use the backbone's whole ``max_context_length`` (``long``) and also 12 steps;
  adapter rows use one day plus 12 steps (``day``), which keeps their training affordable. Every
  row names its context.
- Rows:
  - ``last value`` and ``seasonal naive`` (the value one day earlier, or one week where the data
    has it and it is better on validation);
  - ``zero-shot FactoST`` at each context, and ``fracast`` (an 85k-parameter pretrained forecaster
    shipped in its Apache-2.0 wheel, ``pip install fracast``, benchmark use only) at the long context;
  - ``FACTOST`` adapter (defaults of ``FactoSTAdapterConfig``, backbone frozen and in evaluation
    mode) trained on the most recent 5% and 10% of the training windows;
  - ``STID`` trained from scratch on the same 5% and 10%, and on 100%.
- Training, every trained row alike: the study's loop (``st_lora_convergence.train``): an epoch is
  one pass over the shuffled training windows, validation MAE on every ``VAL_STRIDE``-th
  validation window after each epoch and before the first, the best state kept, stop 10 epochs
  after the best; STID with its paper recipe (Adam 2e-3, weight decay 1e-4, batch 32, lr halved
  after epochs 1, 50 and 80, at most 200 epochs), FACTOST with Adam ``ADAPTER_LR``, batch 32, no
  weight decay, constant lr, at most 200 epochs. Seeds 0, 1, 2.
- Statistics: paired changes of pooled MAE with 95% intervals of the study's two-level bootstrap
  (seeds with replacement, test windows in moving blocks of 24 steps).

Every finished unit is a JSON (with an ``.npz`` of per-window error sums) under
``benchmarks/results/factost/``; units already there are skipped, so the benchmark resumes, and a
trained unit killed part-way goes on from its last finished epoch (``progress/<unit key>/``, the
study's ``train``). A FactoST unit records the SHA-256 of the backbone's weights and is run again
for another backbone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from peft import get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, parameter_count  # noqa: E402
from st_lora_convergence import (  # noqa: E402
    RECIPES,
    Recipe,
    bootstrap_indices,
    build_backbone,
    interval,
    load_splits,
    paired_change,
    train,
)

import st_peft
from st_peft.baselines import last_value_forecast, seasonal_naive_forecast, seasonal_period, split_starts
from st_peft.data import ForecastingSplits, build_splits
from st_peft.data.windows import WindowCollator
from st_peft.models.factost import FactoSTModel
from st_peft.outputs import prediction_of
from st_peft.runs import write_json_atomic
from st_peft.tuners.factost import FactoSTAdapterConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "factost"
QUICK_RESULTS = ROOT / "benchmarks" / "results" / "factost_quick"
SUMMARY = ROOT / "benchmarks" / "results" / "factost_summary.json"
SHIPPED = st_peft.shipped_checkpoint()

HELD_OUT = ("los-loop", "sz-taxi", "nyc-bike")
SEEDS = (0, 1, 2)
FEW_SHOT = (0.05, 0.1)
TEST_STRIDE = 12
FRACAST_CONTEXT = 2048  # fracast's own window W
QUICK_TEST_STRIDE = 240  # three test windows of sz-taxi: fracast costs about 0.2 CPU s per series
VAL_STRIDE = 3
ADAPTER_LR = 1e-3
ADAPTER_RECIPE = Recipe("adam", ADAPTER_LR, 0.0, 32, 200)
HORIZONS = (3, 6, 12)
COLUMNS = ("abs", "abs@3", "abs@6", "abs@12", "squared")
FORECAST_INPUTS = ("past_values", "past_observed_mask", "past_time_features", "future_time_features")


@dataclass
class LongHistoryCollator(WindowCollator):
    """A collator whose windows keep their targets but carry ``context`` steps of history.

    The history ends where the 12-step window's does; steps before the series' start are zeros
    marked missing, with the calendar of its first step.
    """

    context: int = 12

    def gather(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of ``starts`` ``(B,)``, with ``past_*`` of ``context`` steps ``(B, context, N, C)``."""
        batch = super().gather(starts)
        steps = np.asarray(starts, dtype=np.int64)[:, None] + self.input_len - self.context + np.arange(self.context)
        present = steps >= 0
        steps = np.maximum(steps, 0)
        mask = self.input_mask[steps] & present[:, :, None, None]
        batch["past_values"] = torch.from_numpy(np.where(mask, self.inputs[steps], 0.0).astype(np.float32))
        batch["past_observed_mask"] = torch.from_numpy(mask)
        batch["past_time_features"] = torch.from_numpy(self.calendar[steps])
        return batch


def with_context(splits: ForecastingSplits, context: int) -> ForecastingSplits:
    """The same splits whose batches carry ``context`` steps of history (see :class:`LongHistoryCollator`)."""
    if context == splits.input_len:
        return splits
    base = splits.collator
    collator = LongHistoryCollator(base.inputs, base.input_mask, base.targets, base.target_mask, base.calendar,
                                   base.input_len, base.horizon, context=context)
    return dataclasses.replace(splits, collator=collator)


def strided(splits: ForecastingSplits, split: str, stride: int) -> ForecastingSplits:
    """The splits with every ``stride``-th window of ``split`` only."""
    starts = split_starts(splits, split)[::stride]
    return dataclasses.replace(splits, **{split: datasets.Dataset.from_dict({"start": starts})})


def few_shot_splits(dataset: str, fraction: float) -> ForecastingSplits:
    """The study's splits with the most recent ``fraction`` of training windows (the scaler fitted on them)."""
    full = load_splits(dataset)
    splits = build_splits(full.data, input_len=full.input_len, horizon=full.horizon, few_shot=fraction)
    return strided(splits, "val", VAL_STRIDE)


def test_errors(predictions: np.ndarray, splits: ForecastingSplits, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-window error sums and counts ``(W, 5)`` of ``predictions`` ``(W, H, N, C)`` on every ``stride``-th test target.

    Columns: absolute error over all, at horizons 3, 6, 12; squared error over all.
    """
    starts = split_starts(splits, "test")[::stride]
    future = starts[:, None] + splits.input_len + np.arange(splits.horizon)
    target = splits.collator.targets[future].astype(np.float64)
    mask = splits.collator.target_mask[future]
    error = np.where(mask, np.abs(predictions.astype(np.float64) - target), 0.0)
    sums = [error.sum(axis=(1, 2, 3))] + [error[:, h - 1].sum(axis=(1, 2)) for h in HORIZONS]
    counts = [mask.sum(axis=(1, 2, 3))] + [mask[:, h - 1].sum(axis=(1, 2)) for h in HORIZONS]
    sums.append((error**2).sum(axis=(1, 2, 3)))
    counts.append(counts[0])
    return np.stack(sums, axis=1), np.stack(counts, axis=1).astype(np.int64)


def metrics_of(sums: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """MAE over all and at horizons 3, 6, 12, and RMSE, from per-window sums."""
    total, count = sums.sum(axis=0), np.maximum(counts.sum(axis=0), 1)
    out = {"mae": total[0] / count[0], "rmse": float(np.sqrt(total[4] / count[4]))}
    out.update({f"mae@{h}": total[1 + i] / count[1 + i] for i, h in enumerate(HORIZONS)})
    return {key: float(value) for key, value in out.items()}


@torch.no_grad()
def model_predictions(model: nn.Module, splits: ForecastingSplits, stride: int, batch_size: int = 16) -> np.ndarray:
    """Forecasts ``(W, H, N, C)`` in original units of every ``stride``-th test window."""
    model.eval()
    starts = split_starts(splits, "test")[::stride]
    pieces = []
    for begin in range(0, len(starts), batch_size):
        batch = splits.collator.gather(starts[begin : begin + batch_size])
        pieces.append(prediction_of(model(**{key: batch[key] for key in FORECAST_INPUTS})).double().numpy())
    return np.concatenate(pieces)


def naive_predictions(splits: ForecastingSplits, method: str, stride: int) -> tuple[np.ndarray, dict]:
    """Last value, or seasonal naive with the day or (where better on validation) the week as season."""
    if method == "last value":
        return last_value_forecast(splits)[::stride], {}
    period = seasonal_period(splits)
    return seasonal_naive_forecast(splits, "test", period)[::stride], {"period": period}


def fracast_predictions(splits: ForecastingSplits, context: int, stride: int, batch_size: int = 128,
                        ) -> tuple[np.ndarray, dict]:
    """fracast's median forecasts ``(W, H, N, C)``; a series with fewer than 8 observed steps gets its last observation."""
    from fracast import FracastModel

    model = FracastModel.from_pretrained(weights="fp32")
    contextual = with_context(splits, context)
    starts = split_starts(splits, "test")[::stride]
    batch = contextual.collator.gather(starts)
    values = torch.where(batch["past_observed_mask"], batch["past_values"], torch.nan).numpy()
    windows, steps, nodes, channels = values.shape
    series = values.transpose(0, 2, 3, 1).reshape(-1, steps)
    enough = np.isfinite(series).sum(axis=1) >= 8
    median = model.quantiles.index(0.5)
    forecast = np.zeros((len(series), splits.horizon))
    rows = np.flatnonzero(enough)
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        forecast[chunk] = model.forecast_batch(series[chunk], horizon=splits.horizon)[:, :, median]
    for row in np.flatnonzero(~enough):
        seen = series[row][np.isfinite(series[row])]
        forecast[row] = seen[-1] if len(seen) else 0.0
    forecast = forecast.reshape(windows, nodes, channels, splits.horizon).transpose(0, 3, 1, 2)
    return forecast, {"series_with_fewer_than_8_observations": int((~enough).sum()), "series": int(len(series))}


def weights_digest(folder: Path) -> str:
    """SHA-256 of a backbone's ``model.safetensors``."""
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@dataclass(frozen=True)
class Unit:
    """One row's run on one data set: ``method`` at a ``setting`` (context or fraction) and ``seed``."""

    method: str
    dataset: str
    setting: str
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.method.replace(' ', '-')}_{self.dataset}_{self.setting}_s{self.seed}"

    @property
    def uses_backbone(self) -> bool:
        return self.method in ("zero-shot", "factost")


METHODS = ("last value", "seasonal naive", "zero-shot", "fracast", "stid", "factost")


def units(datasets_: tuple[str, ...], seeds: tuple[int, ...]) -> list[Unit]:
    """Every unit of the benchmark, cheapest first."""
    out = []
    for dataset in datasets_:
        out += [Unit("last value", dataset, "12"), Unit("seasonal naive", dataset, "12"),
                Unit("zero-shot", dataset, "12"), Unit("zero-shot", dataset, "long"), Unit("fracast", dataset, "long")]
    for seed in seeds:
        for dataset in datasets_:
            for fraction in FEW_SHOT:
                out += [Unit("stid", dataset, f"{fraction:g}", seed), Unit("factost", dataset, f"{fraction:g}", seed)]
            out.append(Unit("stid", dataset, "1", seed))
    return out


def context_of(unit: Unit, splits: ForecastingSplits, backbone: FactoSTModel | None) -> int:
    """Steps of history a unit's model sees."""
    if unit.method == "factost":
        return min(splits.steps_per_day + splits.input_len, backbone.config.max_context_length)
    if unit.setting == "long":
        return backbone.config.max_context_length if backbone is not None else 2048
    return int(unit.setting) if unit.method == "zero-shot" else splits.input_len


def run_unit(unit: Unit, backbone: FactoSTModel | None, backbone_path: Path, stride: int = TEST_STRIDE,
             max_epochs: int | None = None, progress: Path | None = None) -> dict:
    """Run one unit on every ``stride``-th test window; return its record and its per-window error sums.

    ``max_epochs`` caps a trained unit's epochs below its recipe's (the quick smoke test); a trained
    unit keeps its progress between epochs in ``progress`` and goes on from there when run again.
    """
    splits = load_splits(unit.dataset)
    record: dict = {"unit": dataclasses.asdict(unit), "test_stride": stride}
    started, cpu = time.perf_counter(), time.process_time()
    if unit.method in ("last value", "seasonal naive"):
        predictions, extra = naive_predictions(splits, unit.method, stride)
        record.update(extra)
    elif unit.method == "fracast":
        context = FRACAST_CONTEXT
        predictions, extra = fracast_predictions(splits, context, stride)
        record.update(extra, context=context)
    elif unit.method == "zero-shot":
        context = context_of(unit, splits, backbone)
        predictions = model_predictions(backbone, with_context(splits, context), stride)
        record["context"] = context
    else:
        fraction = float(unit.setting)
        train_splits = few_shot_splits(unit.dataset, fraction) if fraction < 1 else strided(splits, "val", VAL_STRIDE)
        if unit.method == "stid":
            model = build_backbone("stid", train_splits, unit.seed)
            recipe, keep_eval = RECIPES["stid"], False
        else:
            context = context_of(unit, splits, backbone)
            train_splits = with_context(train_splits, context)
            torch.manual_seed(unit.seed)
            model = get_peft_model(copy.deepcopy(backbone), FactoSTAdapterConfig(
                **train_splits.size_kwargs(), steps_per_day=train_splits.steps_per_day))
            recipe, keep_eval = ADAPTER_RECIPE, True
            record["context"] = context
        epochs = min(recipe.max_epochs, max_epochs or recipe.max_epochs)
        result, _ = train(model, train_splits, recipe, recipe.optimizer, recipe.lr, recipe.weight_decay, unit.seed,
                          epochs, keep_eval_mode=keep_eval, progress=progress)
        predictions = model_predictions(model, with_context(splits, record.get("context", splits.input_len)), stride)
        record.update(
            training_windows=len(train_splits.train), best_val_mae=result.best_val_mae, best_epoch=result.best_epoch,
            epochs_run=result.epochs_run, stopped_early=result.stopped_early,
            trainable_parameters=parameter_count(model, trainable_only=True), total_parameters=parameter_count(model),
        )
    sums, counts = test_errors(predictions, splits, stride)
    record.update(metrics=metrics_of(sums, counts), wall_seconds=time.perf_counter() - started,
                  cpu_seconds=time.process_time() - cpu)
    if unit.uses_backbone:
        record.update(backbone=str(backbone_path), backbone_sha256=weights_digest(backbone_path))
    return {"record": record, "sums": sums, "counts": counts}


def is_done(folder: Path, unit: Unit, digest: str) -> bool:
    """The unit has a result, made with this backbone where it uses one."""
    path = folder / f"{unit.key}.json"
    if not path.exists():
        return False
    return not unit.uses_backbone or json.loads(path.read_text()).get("backbone_sha256") == digest


def run_units(folder: Path, todo: list[Unit], backbone_path: Path, stride: int = TEST_STRIDE,
              max_epochs: int | None = None) -> None:
    """Run every unit of ``todo`` that is not done yet, saving each as it finishes (trained units capped at
    ``max_epochs``)."""
    folder.mkdir(parents=True, exist_ok=True)
    backbone = FactoSTModel.from_pretrained(backbone_path).eval()
    digest = weights_digest(backbone_path)
    for unit in todo:
        if is_done(folder, unit, digest):
            continue
        result = run_unit(unit, backbone, backbone_path, stride, max_epochs, progress=folder / "progress" / unit.key)
        np.savez(folder / f"{unit.key}.npz", sums=result["sums"], counts=result["counts"])
        write_json_atomic(folder / f"{unit.key}.json", result["record"])
        print(f"{unit.key}: MAE {result['record']['metrics']['mae']:.4f} "
              f"({result['record']['cpu_seconds']:.0f} CPU s)", flush=True)


def run_all(folder: Path, datasets_: tuple[str, ...], seeds: tuple[int, ...], backbone_path: Path,
            stride: int = TEST_STRIDE, max_epochs: int | None = None, methods: tuple[str, ...] = METHODS) -> None:
    """Run the benchmark's units of ``methods`` (see :func:`run_units`)."""
    todo = [unit for unit in units(datasets_, seeds) if unit.method in methods]
    run_units(folder, todo, backbone_path, stride, max_epochs)

ROWS = [
    ("last value", "12", "last value"),
    ("seasonal naive", "12", "seasonal naive"),
    ("zero-shot", "12", "zero-shot FactoST, 12-step history"),
    ("zero-shot", "long", "zero-shot FactoST, long history"),
    ("fracast", "long", "fracast zero-shot, long history"),
    ("factost", "0.05", "FACTOST adapter, 5% of training windows"),
    ("factost", "0.1", "FACTOST adapter, 10%"),
    ("stid", "0.05", "STID from scratch, 5%"),
    ("stid", "0.1", "STID from scratch, 10%"),
    ("stid", "1", "STID, 100%"),
]
COMPARISONS = [
    (("zero-shot", "long"), ("seasonal naive", "12"), "zero-shot (long) vs seasonal naive"),
    (("zero-shot", "long"), ("fracast", "long"), "zero-shot (long) vs fracast"),
    (("factost", "0.1"), ("stid", "0.1"), "FACTOST 10% vs STID 10%"),
    (("factost", "0.1"), ("stid", "1"), "FACTOST 10% vs STID 100%"),
    (("factost", "0.05"), ("stid", "0.05"), "FACTOST 5% vs STID 5%"),
]


def load_results(folder: Path, dataset: str) -> dict[tuple[str, str], dict[int, dict]]:
    """Finished units of one data set: ``{(method, setting): {seed: {"record", "sums", "counts"}}}``."""
    found: dict[tuple[str, str], dict[int, dict]] = {}
    for path in sorted(folder.glob(f"*_{dataset}_*.json")):
        record = json.loads(path.read_text())
        unit = Unit(**record["unit"])
        if unit.dataset != dataset:
            continue
        arrays = np.load(path.with_suffix(".npz"))
        found.setdefault((unit.method, unit.setting), {})[unit.seed] = {
            "record": record, "sums": arrays["sums"], "counts": arrays["counts"]}
    return found


def paired(found: dict, arm: tuple[str, str], reference: tuple[str, str], draw_seed: int) -> dict | None:
    """Change (%) of pooled MAE of ``arm`` against ``reference`` with a bootstrap interval.

    Seeds are paired where both rows have several; a row of one seed (the untrained rows) is
    paired with every seed of the other.
    """
    if arm not in found or reference not in found:
        return None
    a, b = found[arm], found[reference]
    seeds = sorted(set(a) & set(b)) if len(a) > 1 and len(b) > 1 else sorted(a if len(a) > 1 else b)
    pick = lambda rows, seed: rows[seed] if seed in rows else next(iter(rows.values()))  # noqa: E731
    arm_sums = np.stack([pick(a, seed)["sums"][:, 0] for seed in seeds])
    reference_sums = np.stack([pick(b, seed)["sums"][:, 0] for seed in seeds])
    stride = next(iter(a.values()))["record"]["test_stride"]
    weights = bootstrap_indices(arm_sums.shape[1], stride, len(seeds), np.random.default_rng(draw_seed))
    point, draws = paired_change(arm_sums, reference_sums, weights)
    low, high = interval(draws)
    return {"change": point, "low": low, "high": high, "seeds": seeds}


def aggregate(folder: Path, datasets_: tuple[str, ...]) -> dict:
    """The table of every row and the paired comparisons, printed and written to the summary JSON."""
    summary: dict = {"protocol": {"test_stride": TEST_STRIDE, "val_stride": VAL_STRIDE, "adapter_lr": ADAPTER_LR,
                                  "few_shot": FEW_SHOT, "seeds": SEEDS}, "datasets": {}}
    header = ["row", *datasets_]
    found = {dataset: load_results(folder, dataset) for dataset in datasets_}
    table = []
    for method, setting, label in ROWS:
        cells = []
        for dataset in datasets_:
            runs = found[dataset].get((method, setting), {})
            if not runs:
                cells.append("-")
                continue
            maes = [run["record"]["metrics"]["mae"] for run in runs.values()]
            context = next(iter(runs.values()))["record"].get("context")
            text = f"{np.mean(maes):.3f}" + (f" ± {np.std(maes):.3f}" if len(maes) > 1 else "")
            cells.append(text + (f" (ctx {context})" if context else ""))
            summary["datasets"].setdefault(dataset, {})[label] = {
                "mae": float(np.mean(maes)), "seeds": sorted(runs), "context": context,
                "runs": {seed: run["record"] for seed, run in runs.items()}}
        table.append([label, *cells])
    lines = [markdown_table(header, table), ""]
    comparison_rows = []
    for index, (arm, reference, label) in enumerate(COMPARISONS):
        cells = []
        for dataset in datasets_:
            change = paired(found[dataset], arm, reference, draw_seed=index)
            cells.append("-" if change is None else f"{change['change']:+.1f}% [{change['low']:+.1f}, {change['high']:+.1f}]")
            if change is not None:
                summary["datasets"][dataset].setdefault("comparisons", {})[label] = change
        comparison_rows.append([label, *cells])
    lines.append(markdown_table(["MAE change (95% interval)", *datasets_], comparison_rows))
    text = "\n".join(lines)
    summary["table"] = text
    print(text)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", type=Path, default=SHIPPED, help="pretrained FactoST folder")
    parser.add_argument("--aggregate", action="store_true", help="print the tables and write the summary JSON")
    parser.add_argument("--list", action="store_true", help="the units and which are done")
    parser.add_argument("--quick", action="store_true", help="one data set, one seed, a short STID run, own folder")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help=f"run only these rows' units: {', '.join(METHODS)} (all by default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets_, seeds, folder = HELD_OUT, SEEDS, RESULTS
    if args.quick:
        datasets_, seeds, folder = ("sz-taxi",), (0,), QUICK_RESULTS
    if args.list:
        digest = weights_digest(args.backbone)
        todo = [unit.key for unit in units(datasets_, seeds) if not is_done(folder, unit, digest)]
        print(f"{len(units(datasets_, seeds)) - len(todo)} of {len(units(datasets_, seeds))} units done")
        print("\n".join(todo))
        return
    if not args.aggregate:
        run_all(folder, datasets_, seeds, args.backbone, stride=QUICK_TEST_STRIDE if args.quick else TEST_STRIDE,
                max_epochs=2 if args.quick else None, methods=tuple(args.methods))
    summary = aggregate(folder, datasets_)
    if not args.quick:
        write_json_atomic(SUMMARY, summary)


if __name__ == "__main__":
    main()
