"""ST-LoRA's cost on STID, GWNet and STGCN: speed of training and inference, added parameters.

    python benchmarks/st_lora.py [--repeats 21] [--paper-size] [--datasets chickenpox nyc-bike sz-taxi]
    python benchmarks/st_lora.py --compare-with GIT_REF [--rounds 3] [--repeats 21] [--warm] [--paper-size]

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
  ``--paper-size``. ``step_over_forward`` is the frozen backbone + ST-LoRA's training step over
  the plain backbone's inference (target at most 1.1x on GWNet).
- ``--compare-with GIT_REF``: the speed only, with ``st_peft`` of that git revision ("old")
  against this checkout ("new") in two worker processes (one thread each) whose requests
  alternate, same data, batch, sizes and seeds, and the same timing code (this script's);
  ``--rounds`` pools that many fresh pairs of workers. Wall-clock and CPU seconds are both
  recorded.
- ``--warm``: an untimed call of the same kind before every timed one, so each is timed in the
  steady state of a training or inference loop; without it the step timed right after the whole
  backbone's training step pays for faulting in the memory that step gave back.

Prints markdown tables and writes ``benchmarks/results/st_lora_speed.json``
(``st_lora_speed_paper_size.json`` with ``--paper-size``, ``st_lora_speed_compare*.json`` with
``--compare-with``, ``st_lora_warm_*`` with ``--warm``). ``--repeats 1`` is a smoke test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_backbone, markdown_table, parameter_count, write_results  # noqa: E402
from side_by_side import REPO, TreeWorker, export_package, revision, serve  # noqa: E402

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


MEASURES = ("train_backbone", "train_st_lora", "infer_backbone", "infer_st_lora")
"""What is timed: a training step of the whole backbone (1) and of the frozen backbone + ST-LoRA
(2), each forward + gradients + an SGD update of the trainable weights, and inference (forward
without gradients) of the plain and of the adapted backbone."""


class SpeedCase:
    """Backbone ``name`` plain and with ST-LoRA on one training batch of ``splits``, warmed up.

    Args:
        name: ``stid``, ``gwnet`` or ``stgcn``.
        splits: the data; the batch is its first :data:`BATCH` training windows.
        paper_size: the paper's widths instead of :data:`BENCH_SIZES`.
    """

    def __init__(self, name: str, splits: ForecastingSplits, paper_size: bool) -> None:
        self.batch = splits.collator.gather(np.asarray(splits.split("train")["start"])[:BATCH])
        self.inputs = {key: self.batch[key] for key in ("past_values", "past_observed_mask", "past_time_features",
                                                        "future_time_features")}
        self.plain = build(name, splits, paper_size)
        self.with_adapter = adapted(build(name, splits, paper_size), splits)
        for measure in MEASURES:  # warm-up, untimed
            self.seconds(measure)

    def step(self, model: torch.nn.Module) -> None:
        """Forward with the loss (masked MAE in original units), gradients, SGD update of the trainable weights."""
        params = [p for p in model.parameters() if p.requires_grad]
        loss = model(**self.batch).loss
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param.sub_(1e-6 * grad)

    def infer(self, model: torch.nn.Module) -> None:
        """The forecast of the batch's inputs, without gradients."""
        with torch.no_grad():
            model(**self.inputs)

    def seconds(self, measure: str, warm: bool = False) -> tuple[float, float]:
        """Wall-clock and CPU seconds (of this thread) of one call of ``measure`` (one of :data:`MEASURES`).

        The model is put in training mode (training steps) or evaluation mode (inference) before
        the clocks start. On a loaded machine the CPU time leaves out the waits for a core.
        With ``warm``, an untimed call of the same kind comes first, so the timed one finds memory
        as a loop of such calls leaves it rather than as the previous measurement did (the whole
        backbone's training step frees far more than the others use, and the allocator gives it
        back to the system, to be faulted in again by the next call).
        """
        model = self.plain if measure.endswith("backbone") else self.with_adapter
        training = measure.startswith("train")
        model.train(training)
        run = self.step if training else self.infer
        if warm:
            run(model)
        wall, cpu = time.perf_counter(), time.thread_time()
        run(model)
        return time.perf_counter() - wall, time.thread_time() - cpu


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """The ratios of the medians of the :data:`MEASURES`; ``step_over_forward`` is ST-LoRA's training step
    over the plain backbone's inference (issue 25's target: at most 1.1x on GWNet)."""
    return {
        "train_ratio": medians["train_st_lora"] / medians["train_backbone"],
        "infer_ratio": medians["infer_st_lora"] / medians["infer_backbone"],
        "step_over_forward": medians["train_st_lora"] / medians["infer_backbone"],
    }


def summary(times: dict[str, list[tuple[float, float]]]) -> dict:
    """Median wall-clock seconds of the :data:`MEASURES` and their :func:`ratios`, and the same of the CPU
    seconds under ``"cpu"``, from ``(wall, cpu)`` pairs per repeat.

    ``step_over_forward_paired`` is the median over repeats of each repeat's own ratio: the two
    calls of a repeat run one after the other, so a slow drift of the machine's load cancels.
    """

    def of_clock(index: int) -> dict[str, float]:
        medians = {key: statistics.median(pair[index] for pair in pairs) for key, pairs in times.items()}
        paired = statistics.median(step[index] / forward[index]
                                   for step, forward in zip(times["train_st_lora"], times["infer_backbone"], strict=True))
        return {**medians, **ratios(medians), "step_over_forward_paired": paired}

    return {**of_clock(0), "cpu": of_clock(1), "repeats": len(times["train_st_lora"])}


def speed(name: str, splits: ForecastingSplits, repeats: int, paper_size: bool, warm: bool = False) -> dict:
    """Median seconds of a training step and of inference, with and without ST-LoRA, interleaved
    (``warm``: see :meth:`SpeedCase.seconds`)."""
    case = SpeedCase(name, splits, paper_size)
    times: dict[str, list[tuple[float, float]]] = {measure: [] for measure in MEASURES}
    for _ in range(repeats):
        for measure in MEASURES:
            times[measure].append(case.seconds(measure, warm))
    return summary(times)


def speed_table(results: dict, options: argparse.Namespace) -> str:
    """The speed measurements as a titled markdown table."""
    rows = [[name, s["train_backbone"], s["train_st_lora"], f"{s['train_ratio']:.2f}x", s["infer_backbone"],
             s["infer_st_lora"], f"{s['infer_ratio']:.2f}x", f"{s['step_over_forward']:.2f}x"]
            for name, s in results["speed"].items()]
    size = "the papers' backbone sizes" if options.paper_size else "benchmark-size backbones"
    title = (f"\nSpeed on {options.datasets[-1]}, {size}, batch {BATCH}, median of {options.repeats} interleaved "
             "repeats (seconds; targets: train <= 0.6x, inference <= 1.1x)\n\n")
    return title + markdown_table(["backbone", "train step 1", "train step 2", "ratio", "inference",
                                   "inference + ST-LoRA", "ratio", "train step 2 / inference"], rows)


def worker(options: argparse.Namespace) -> None:
    """``--worker``: build a :class:`SpeedCase` per model with the ``st_peft`` on ``PYTHONPATH``, then
    answer ``"<model> <measure>"`` requests with seconds (see ``side_by_side``)."""
    import st_peft

    splits = build_splits(load(options.datasets[-1]), input_len=12, horizon=12)
    cases = {name: SpeedCase(name, splits, options.paper_size) for name in options.models}

    def handle(request: str) -> str:
        name, measure = request.split()
        return json.dumps(cases[name].seconds(measure, options.warm))

    serve(json.dumps({"st_peft": str(Path(st_peft.__file__).resolve().parent)}), handle)


def compare(options: argparse.Namespace) -> dict:
    """Medians of the :data:`MEASURES` with ``st_peft`` of ``--compare-with`` ("old") and of this checkout
    ("new"), timed by two worker processes whose requests alternate (the first of each pair swaps every
    repeat). Each of ``--rounds`` rounds starts a fresh pair: on a loaded machine one process can stay a
    tenth faster or slower than another running the same code, so the medians pool several."""
    arguments = ["--datasets", options.datasets[-1], "--models", *options.models,
                 *(["--paper-size"] if options.paper_size else []), *(["--warm"] if options.warm else [])]
    versions = ("old", "new")
    times = {version: {name: {measure: [] for measure in MEASURES} for name in options.models} for version in versions}
    with tempfile.TemporaryDirectory(prefix="st_lora_old_") as folder:
        old_commit, new_commit = export_package(options.compare_with, Path(folder)), revision("HEAD")
        trees = {"old": Path(folder), "new": REPO}
        for round_ in range(options.rounds):
            workers = {version: TreeWorker(Path(__file__), arguments, trees[version]) for version in versions}
            try:
                packages = {version: json.loads(w.wait_ready())["st_peft"] for version, w in workers.items()}
                for repeat in range(options.repeats):
                    order = versions if (round_ * options.repeats + repeat) % 2 == 0 else versions[::-1]
                    for name in options.models:
                        for measure in MEASURES:
                            for version in order:
                                reply = workers[version].ask(f"{name} {measure}")
                                times[version][name][measure].append(tuple(json.loads(reply)))
            finally:
                for w in workers.values():
                    w.close()
    return {
        "old": {"ref": options.compare_with, "commit": old_commit, "st_peft": packages["old"]},
        "new": {"commit": new_commit, "st_peft": packages["new"]},
        "speed": {name: {version: summary(times[version][name]) for version in versions} for name in options.models},
        "times": times,
    }


def compare_table(results: dict, options: argparse.Namespace, clock: str) -> str:
    """ST-LoRA's training step over the backbone's inference, old against new, as a titled markdown table
    of medians of the ``clock`` (``"wall"`` or ``"cpu"``) seconds."""
    rows = []
    for name, versions in results["speed"].items():
        old, new = (versions[v] if clock == "wall" else versions[v]["cpu"] for v in ("old", "new"))
        rows.append([name, old["train_st_lora"], old["infer_backbone"],
                     f"{old['step_over_forward']:.2f}x ({old['step_over_forward_paired']:.2f}x)",
                     new["train_st_lora"], new["infer_backbone"],
                     f"{new['step_over_forward']:.2f}x ({new['step_over_forward_paired']:.2f}x)",
                     f"{new['train_st_lora'] / old['train_st_lora']:.2f}x"])
    size = "the papers' backbone sizes" if options.paper_size else "benchmark-size backbones"
    title = (f"\nST-LoRA training step over the plain backbone's forward-only step on {options.datasets[-1]}, {size}, "
             f"batch {BATCH}: old = st_peft of {options.compare_with} ({results['old']['commit'][:10]}), new = this "
             f"checkout ({results['new']['commit'][:10]}); median {clock} seconds of {options.rounds} x "
             f"{options.repeats} interleaved repeats; ratio of the medians (median of each repeat's ratio)\n\n")
    return title + markdown_table(["backbone", "old step", "old forward", "old ratio", "new step", "new forward",
                                   "new ratio", "new step / old step"], rows)


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
    parser.add_argument("--compare-with", metavar="GIT_REF",
                        help="time only the speed, with st_peft of this git revision against this checkout, side by "
                             "side; writes <output>_speed_compare.json (or _speed_compare_paper_size.json)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --compare-with: fresh worker processes this many times, --repeats each")
    parser.add_argument("--warm", action="store_true",
                        help="an untimed call of the same kind before every timed one (steady state, as in a loop); "
                             "writes <output>_warm_speed*.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.rounds < 1 or options.repeats < 1:
        parser.error(f"--rounds and --repeats must be at least 1; got {options.rounds} and {options.repeats}")
    # tiny models on a shared CPU: one thread each is faster than threads fighting for two cores
    torch.set_num_threads(1)
    if options.worker:
        worker(options)
        return
    began = time.perf_counter()
    stem = options.output + ("_warm" if options.warm else "")
    if options.compare_with:
        results = {"protocol": __doc__.split("\n\n", 2)[2].strip(), "options": vars(options), **compare(options),
                   "seconds": time.perf_counter() - began}
        print(compare_table(results, options, "wall") + "\n" + compare_table(results, options, "cpu"))
        path = write_results(stem + "_speed_compare" + ("_paper_size" if options.paper_size else ""), results)
        print(f"\nwrote {path} in {results['seconds']:.0f}s")
        return

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
    results["speed"] = {name: speed(name, splits, options.repeats, options.paper_size, options.warm)
                        for name in options.models}
    results["seconds"] = time.perf_counter() - began

    print("\nAdded parameters at the papers' backbone sizes (default STLoraConfig)\n")
    print(markdown_table(["data", "backbone", "backbone parameters", "ST-LoRA parameters", "added"], shares))
    print(speed_table(results, options))
    suffix = "_speed_paper_size" if options.paper_size else "_speed"
    path = write_results(stem + suffix, results)
    print(f"\nwrote {path} in {results['seconds']:.0f}s")


if __name__ == "__main__":
    main()
