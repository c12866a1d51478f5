"""ST-LoRA's cost on STID, GWNet and STGCN: speed of training and inference, added parameters.

    python benchmarks/st_lora.py [--repeats 21] [--paper-size] [--datasets chickenpox nyc-bike sz-taxi]

No training and no accuracy: whether ST-LoRA makes a forecaster more accurate is measured to
convergence by ``benchmarks/st_lora_convergence.py``. This script measures what the adapter
costs, with the default ``STLoraConfig`` (one predictor block of 4 NALLs, rank 4), 12 steps in
and 12 out:

- Added parameters: for every data set and backbone, the parameters ST-LoRA adds to the
  backbone at the papers' backbone sizes (target: about 1%, at most 2%).
- Speed, on the last data set: median seconds of interleaved repeats of one training step
  (frozen backbone + ST-LoRA against the whole backbone trained, batch 32, masked MAE in original
  units; target at most 0.6x) and of inference (adapted against plain; target at most 1.1x).
  The backbones are timed at scaled-down sizes (``BENCH_SIZES``), or at the papers' sizes with
  ``--paper-size``.

Prints markdown tables and writes ``benchmarks/results/st_lora_speed.json``
(``st_lora_speed_paper_size.json`` with ``--paper-size``). ``--repeats 1`` is a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_backbone, markdown_table, parameter_count, timed, write_results  # noqa: E402

from st_peft.data import ForecastingSplits, build_splits, load  # noqa: E402
from st_peft.tuners.st_lora import STLoraConfig  # noqa: E402

# scaled-down backbones for the default speed pass; ``--paper-size`` uses the papers' widths
BENCH_SIZES = {
    "stid": {"embed_dim": 16, "node_dim": 16, "tod_dim": 16, "dow_dim": 16, "num_layers": 2},
    "gwnet": {"residual_channels": 8, "dilation_channels": 8, "skip_channels": 32, "end_channels": 64},
    "stgcn": {"block_channels": (16, 8, 16)},
}
BATCH = 32


def build(name: str, splits: ForecastingSplits, paper_size: bool) -> torch.nn.Module:
    """Backbone ``name`` for ``splits`` at :data:`BENCH_SIZES` (or the paper's size), seed 0."""
    return build_backbone(name, splits, 0, cpu_widths=False, **({} if paper_size else BENCH_SIZES[name]))


def adapted(backbone: torch.nn.Module, splits: ForecastingSplits) -> torch.nn.Module:
    """``backbone`` wrapped with the default ST-LoRA configuration for ``splits``."""
    return get_peft_model(backbone, STLoraConfig(**splits.size_kwargs()))


def added_parameters(model: torch.nn.Module) -> int:
    """Parameters ST-LoRA added to the backbone."""
    return sum(p.numel() for n, p in model.named_parameters() if "stl_" in n)


def paper_size_share(name: str, splits: ForecastingSplits) -> dict:
    """Parameters of backbone ``name`` at the paper's size and of the ST-LoRA it gets on ``splits``."""
    backbone = build(name, splits, paper_size=True)
    backbone_parameters = parameter_count(backbone)
    added = added_parameters(adapted(backbone, splits))
    return {"backbone_parameters": backbone_parameters, "added_parameters": added,
            "added_percent": 100 * added / backbone_parameters}


def speed(name: str, splits: ForecastingSplits, repeats: int, paper_size: bool) -> dict:
    """Median seconds of a training step and of inference, with and without ST-LoRA, interleaved."""
    batch = splits.collator.gather(np.asarray(splits.split("train")["start"])[:BATCH])
    inputs = {key: batch[key] for key in ("past_values", "past_observed_mask", "past_time_features",
                                          "future_time_features")}
    plain = build(name, splits, paper_size)
    with_adapter = adapted(build(name, splits, paper_size), splits)

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
    for model in (plain, with_adapter):  # warm-up, untimed
        model.train()
        step(model)
        infer(model)
    for _ in range(repeats):
        times["train_backbone"] += timed(lambda: step(plain), 1)
        times["train_st_lora"] += timed(lambda: step(with_adapter), 1)
        times["infer_backbone"] += timed(lambda: infer(plain.eval()), 1)
        times["infer_st_lora"] += timed(lambda: infer(with_adapter.eval()), 1)
        plain.train()
        with_adapter.train()
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        **medians,
        "train_ratio": medians["train_st_lora"] / medians["train_backbone"],
        "infer_ratio": medians["infer_st_lora"] / medians["infer_backbone"],
        "repeats": repeats,
    }


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
    """Count the added parameters, time the models, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["chickenpox", "nyc-bike", "sz-taxi"],
                        help="data sets of the parameter table; the speed is measured on the last")
    parser.add_argument("--models", nargs="+", default=["stid", "gwnet", "stgcn"])
    parser.add_argument("--repeats", type=int, default=21, help="repeats of the speed measurement")
    parser.add_argument("--paper-size", action="store_true",
                        help="time the backbones at the papers' sizes; writes <output>_speed_paper_size.json")
    parser.add_argument("--output", default="st_lora")
    options = parser.parse_args()
    # tiny models on a shared CPU: one thread each is faster than threads fighting for two cores
    torch.set_num_threads(1)
    began = time.perf_counter()

    results: dict = {"protocol": __doc__.split("\n\n", 2)[2].strip(), "options": vars(options),
                     "parameters_paper_size": {}}
    shares = []
    for dataset in options.datasets:
        splits = build_splits(load(dataset), input_len=12, horizon=12)
        for name in options.models:
            share = paper_size_share(name, splits)
            results["parameters_paper_size"][f"{dataset}/{name}"] = share
            shares.append([dataset, name, share["backbone_parameters"], share["added_parameters"],
                           f"{share['added_percent']:.2f}%"])
    results["speed"] = {name: speed(name, splits, options.repeats, options.paper_size) for name in options.models}
    results["seconds"] = time.perf_counter() - began

    print("\nAdded parameters at the papers' backbone sizes (default STLoraConfig)\n")
    print(markdown_table(["data", "backbone", "backbone parameters", "ST-LoRA parameters", "added"], shares))
    print(speed_table(results, options))
    suffix = "_speed_paper_size" if options.paper_size else "_speed"
    path = write_results(options.output + suffix, results)
    print(f"\nwrote {path} in {results['seconds']:.0f}s")


if __name__ == "__main__":
    main()
