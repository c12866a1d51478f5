"""Graph backbones on LargeST-sized graphs: build and forward (dense against sparse), and training cost.

    OMP_NUM_THREADS=1 python benchmarks/large_graphs.py [--quick] [--sizes 716 2352] [--node-batch 1024]
                                                       [--timeout 900]
    OMP_NUM_THREADS=1 python benchmarks/large_graphs.py --train [--quick] [--steps 5] [--batch-size 32]
                                                       [--models stid gwnet] [--modes nodes] [--max-step-s 60]

LargeST (Liu et al., NeurIPS 2023) has 8,600 sensors (CA) and subsets of 3,834 (GLA), 2,352 (GBA)
and 716 (SD). Its files are not on this machine, so each size is a road-like stand-in
(:func:`knn_graph`): ``N`` random points in the unit square, each linked to its ``k = 8`` nearest
neighbours with DCRNN's Gaussian kernel weight ``exp(-(d / sigma)^2)`` (``sigma`` the standard
deviation of those distances), stored dense float32 ``(N, N)`` as ``STData`` stores a graph.

For GWNet and STGCN at their paper widths, each in its own process (so that peak memory is its
own), on one thread: the seconds to build the model from the graph, the seconds of one forward
(batch 1, 12 steps in, 12 out, ``torch.no_grad``; the median of up to three, as many as fit in a
minute), each as wall-clock and as the process's CPU seconds (the fairer number on a machine
shared with other jobs), the peak resident memory of the process (``ru_maxrss``, which includes the dense input
graph and the float64 copy the model validates), and the resident memory before the build. Paths:

- ``dense``: ``sparse_graph=False``, the ``(N, N)`` buffers and products (and STGCN's dense
  ``eigvalsh``) every model below ``SPARSE_GRAPH_MIN_NODES`` nodes still uses: the "before";
- ``sparse``: ``sparse_graph=True``, edge lists, sparse products, Lanczos ``lambda_max``: the "after";
- ``sparse, K nodes`` (GWNet): the sparse path forwarding a breadth-first patch of ``K`` nodes
  (``node_index``), because its adaptive adjacency stays dense ``(N, N)`` on the whole graph.

A run that passes ``--timeout`` seconds is reported as such. Prints a markdown table and writes
``benchmarks/results/large_graphs_build_forward.json`` (``..._quick.json`` with ``--quick``,
sizes 716 and 2,352).

``--train`` measures training instead. Each graph carries a :func:`synthetic_signal` of three
months at 15 minutes (8,832 steps: daily and weekly cycles, noise correlated along the graph), cut
7:1:2 into 12-in, 12-out windows. STID, STID + ST-LoRA (frozen STID, default adapter), GWNet
(:data:`common.CPU_WIDTHS`) and STGCN, each on the whole graph (``full``) and on ``--node-batch``
nodes a batch (``nodes``: uniform draws for STID, breadth-first patches for the graph models),
train ``--steps`` steps after one warm-up with ``STTrainer`` (``--batch-size`` windows, AdamW,
clipping), each cell in its own process with its address space capped at :data:`MEMORY_CAP_GB`
GB and ``--timeout`` seconds. Reported: the median wall and CPU seconds a step; an epoch
*extrapolated* as that median times the steps of an epoch, an epoch being every (window, node)
pair once, ``ceil(windows * ceil(N / K) / batch)`` steps; parameters (trainable); peak RSS. A cell
whose step (CPU s) or peak memory, estimated from the same model and mode at smaller ``N``
(a power law no slower than linear), passes ``--max-step-s`` or the cap is skipped with that
estimate. Then per model and mode the exponent ``b`` of peak RSS ~ ``N^b`` and the largest ``N``
estimated to fit in 24 GiB, and a log-log figure ``docs/large_graphs_training.png``. Writes
``benchmarks/results/large_graphs_training.json`` after every cell (with ``--quick``: sizes 716 and
2,352, two measured steps, ``..._quick.json`` and the figure beside it in ``benchmarks/results/``).
Cells already in that file with the same settings are kept, so runs over some models and modes
add up, and an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = (716, 2352, 3834, 8600)
QUICK_SIZES = (716, 2352)
NEIGHBOURS = 8
RUNS = [("gwnet", "dense"), ("gwnet", "sparse"), ("gwnet", "sparse, K nodes"), ("stgcn", "dense"),
        ("stgcn", "sparse")]


def knn_graph(num_nodes: int, neighbours: int = NEIGHBOURS, seed: int = 0) -> np.ndarray:
    """A road-like float32 ``(N, N)`` graph: each of ``N`` random points in the unit square has an edge
    to its ``neighbours`` nearest others, weighted ``exp(-(d / sigma)^2)`` with ``sigma`` the standard
    deviation of those edges' distances (as DCRNN and LargeST weight sensor distances)."""
    points = torch.rand(num_nodes, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    targets, distances = [], []
    for start in range(0, num_nodes, 1024):  # (1024, N) distances at a time, not (N, N)
        block = torch.cdist(points[start:start + 1024], points)
        block[torch.arange(len(block)), torch.arange(start, start + len(block))] = float("inf")
        nearest = block.topk(neighbours, largest=False)
        targets.append(nearest.indices)
        distances.append(nearest.values)
    targets, distances = torch.cat(targets), torch.cat(distances)
    graph = np.zeros((num_nodes, num_nodes), dtype=np.float32)
    graph[np.arange(num_nodes)[:, None], targets.numpy()] = torch.exp(-(distances / distances.std()) ** 2).numpy()
    return graph


def resident_mb() -> float:
    """The process's resident memory now, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(backbone: str, num_nodes: int, path: str, node_batch: int) -> dict:
    """Build ``backbone`` on a :func:`knn_graph` of ``num_nodes`` along ``path``, forward it; seconds and MB."""
    from st_peft.backbones import BACKBONES
    from st_peft.data.node_batching import NodeSampler

    torch.set_num_threads(1)
    graph = knn_graph(num_nodes)
    before_build = resident_mb()
    torch.manual_seed(0)
    start, cpu_start = time.perf_counter(), time.process_time()
    model = BACKBONES[backbone](num_nodes=num_nodes, input_len=12, horizon=12, adjacency=graph,
                                sparse_graph=path != "dense").eval()
    build, build_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    nodes, node_index = num_nodes, None
    if path == "sparse, K nodes":
        nodes = min(node_batch, num_nodes)
        node_index = torch.from_numpy(NodeSampler(num_nodes, nodes, "bfs", graph, seed=0)())
    past = torch.randn(1, 12, nodes, 1, generator=torch.Generator().manual_seed(1))
    times: list[float] = []
    cpu_times: list[float] = []
    with torch.no_grad():
        while len(times) < 3 and sum(times) < 60:
            start, cpu_start = time.perf_counter(), time.process_time()
            model(past_values=past, node_index=node_index)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {"backbone": backbone, "nodes": num_nodes, "path": path, "forward_nodes": nodes,
            "graph_entries": model.config.graph_entries, "build_s": build, "build_cpu_s": build_cpu,
            "forward_s": statistics.median(times), "forward_cpu_s": statistics.median(cpu_times),
            "forwards_timed": len(times),
            "rss_before_build_mb": before_build, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(backbone: str, num_nodes: int, path: str, node_batch: int, timeout: float) -> dict:
    """:func:`measure` in a fresh process, so that its peak memory is its own."""
    command = [sys.executable, __file__, "--one", backbone, str(num_nodes), path, str(node_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=True)
    except subprocess.TimeoutExpired:
        return {"backbone": backbone, "nodes": num_nodes, "path": path, "timed_out_after_s": timeout}
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"{backbone} at {num_nodes} nodes ({path}) failed:\n{error.stderr}") from error
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- training: time per step and per epoch, peak memory, parameters (``--train``) ---------------

STEPS_PER_DAY = 96  # 15-minute steps
SIGNAL_STEPS = 92 * STEPS_PER_DAY  # three months (92 days, 8,832 steps)
TRAIN_MODELS = ("stid", "stid+st-lora", "gwnet", "stgcn")
TRAIN_MODES = ("full", "nodes")
GRAPH_MODELS = ("gwnet", "stgcn")
MEMORY_CAP_GB = 20.0
MEMORY_BUDGET_MB = 24 * 1024
"""The machine's 24 GiB, against which the largest ``N`` that fits is estimated."""


def synthetic_signal(graph: np.ndarray, steps: int = SIGNAL_STEPS, seed: int = 0) -> np.ndarray:
    """A traffic-like float32 ``(T, N)`` signal on ``graph`` ``(N, N)``: daily and weekly cycles and
    spatially correlated noise.

    Each node has its own level, daily amplitude and peak hour (a morning and an evening rush),
    and a weekend dip; the noise is AR(1) in time (coefficient 0.8) and averaged over the graph
    twice (each node's mean over itself and its kNN links taken both ways), so neighbours' noise is
    correlated.
    """
    generator = np.random.default_rng(seed)
    num_nodes = graph.shape[0]
    level = generator.uniform(40, 70, num_nodes).astype(np.float32)
    amplitude = generator.uniform(5, 20, num_nodes).astype(np.float32)
    shift = generator.uniform(-1, 1, num_nodes).astype(np.float32)  # hours
    hour = (np.arange(steps, dtype=np.float32) % STEPS_PER_DAY) * 24 / STEPS_PER_DAY
    weekend = ((np.arange(steps) // STEPS_PER_DAY) % 7 >= 5).astype(np.float32)
    rush = (np.exp(-((hour[:, None] - 8 - shift) / 1.5) ** 2) + np.exp(-((hour[:, None] - 17 - shift) / 2) ** 2))
    signal = level - amplitude * rush * (1 - 0.6 * weekend[:, None])
    # unweighted links both ways and self-loops: the kernel weights of far neighbours are near 0
    rows, cols = np.nonzero((graph != 0) | (graph != 0).T | np.eye(num_nodes, dtype=bool))
    degree = np.bincount(rows, minlength=num_nodes).astype(np.float32)
    smooth = torch.sparse_coo_tensor(np.stack([rows, cols]), 1 / degree[rows], (num_nodes, num_nodes),
                                     check_invariants=True)
    noise = generator.standard_normal((steps, num_nodes), dtype=np.float32)
    for step in range(1, steps):
        noise[step] += 0.8 * noise[step - 1]
    noise = torch.from_numpy(noise).T  # (N, T): the graph acts on nodes
    for _ in range(2):
        noise = smooth @ noise
    return (signal + 2 * noise.T.numpy()).astype(np.float32)


def training_model(name: str, splits) -> torch.nn.Module:
    """``stid`` and ``stgcn`` at their paper widths, ``gwnet`` at :data:`common.CPU_WIDTHS`, or a
    frozen STID with a default ST-LoRA adapter (``stid+st-lora``), seeded 0."""
    from common import build_backbone
    from peft import get_peft_model

    from st_peft.tuners.st_lora import STLoraConfig

    if name == "stid+st-lora":
        return get_peft_model(build_backbone("stid", splits, seed=0), STLoraConfig(**splits.size_kwargs()))
    return build_backbone(name, splits, seed=0)


def measure_training(name: str, num_nodes: int, mode: str, node_batch: int, batch_size: int, steps: int) -> dict:
    """Train ``name`` for one warm-up and ``steps`` measured steps on a :func:`knn_graph` of ``num_nodes``
    with a :func:`synthetic_signal`, whole graph (``full``) or ``node_batch`` nodes a batch (``nodes``).

    A step is what ``STTrainer`` does between two ``on_step_end``: gather the batch, forward,
    backward, clip, AdamW. Returns its median wall and CPU seconds, the epoch extrapolated from them,
    parameters and memory (MB).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from transformers import TrainerCallback

    from st_peft.data import STData, build_splits
    from st_peft.data.node_batching import NodeSampler
    from st_peft.training import STTrainer, st_training_args

    class StepClock(TrainerCallback):
        """Wall and CPU seconds between consecutive step ends (the first from the start of training)."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, *_, **__) -> None:
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *_, **__) -> None:
            self.marks.append((time.perf_counter(), time.process_time()))

    torch.set_num_threads(1)
    after_imports = resident_mb()
    graph = knn_graph(num_nodes)
    values = synthetic_signal(graph)[:, :, None]
    splits = build_splits(STData(values, np.ones(values.shape, dtype=bool), STEPS_PER_DAY, name=f"knn-{num_nodes}",
                                 adjacency=graph))
    del values
    after_data = resident_mb()
    model = training_model(name, splits)
    sampler = None
    if mode == "nodes":
        sampler = NodeSampler(num_nodes, min(node_batch, num_nodes), "bfs" if name in GRAPH_MODELS else "uniform",
                              graph if name in GRAPH_MODELS else None, seed=0)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        args = st_training_args(output_dir, batch_size=batch_size, lr=2e-3, max_steps=steps + 1, eval_strategy="no",
                                save_strategy="no", logging_strategy="no", load_best_model_at_end=False,
                                disable_tqdm=True)
        STTrainer(model, args, train_dataset=splits.train, data_collator=splits.collator, node_sampler=sampler,
                  callbacks=[clock]).train()
    intervals = list(zip(clock.marks[1:], clock.marks[2:], strict=False))  # the warm-up step left out
    walls = [end[0] - start[0] for start, end in intervals]
    cpus = [end[1] - start[1] for start, end in intervals]
    nodes = sampler.nodes_per_batch if sampler else num_nodes
    windows = len(splits.train)
    steps_per_epoch = math.ceil(windows * math.ceil(num_nodes / nodes) / batch_size)
    step_s, step_cpu_s = statistics.median(walls), statistics.median(cpus)
    return {"model": name, "nodes": num_nodes, "mode": mode, "batch_nodes": nodes, "batch_size": batch_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "steps_timed": len(walls), "step_s": step_s, "step_cpu_s": step_cpu_s,
            "train_windows": windows, "steps_per_epoch": steps_per_epoch,
            "epoch_s": step_s * steps_per_epoch, "epoch_cpu_s": step_cpu_s * steps_per_epoch,
            "rss_after_imports_mb": after_imports, "rss_after_data_mb": after_data,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cap_memory() -> None:
    """Limit the child's address space to :data:`MEMORY_CAP_GB`, so an oversized cell fails alone."""
    cap = int(MEMORY_CAP_GB * 1024 ** 3)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def train_child(name: str, num_nodes: int, mode: str, options: argparse.Namespace) -> dict:
    """:func:`measure_training` in a fresh, memory-capped process; a timeout or failure is recorded, not raised."""
    command = [sys.executable, __file__, "--one-train", name, str(num_nodes), mode, str(options.node_batch),
               str(options.batch_size), str(options.steps)]
    cell = {"model": name, "nodes": num_nodes, "mode": mode}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=options.timeout, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=cap_memory)
    except subprocess.TimeoutExpired:
        return {**cell, "skipped": f"timed out after {options.timeout:.0f} s"}
    except subprocess.CalledProcessError as error:
        last = (error.stderr.strip().splitlines() or ["no message"])[-1]
        return {**cell, "skipped": f"failed under the {MEMORY_CAP_GB:.0f} GB cap: {last[:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def growth(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``log y = log a + b log N`` over ``(N, y)`` points: ``(a, b)``."""
    logs = np.log(np.asarray(points, dtype=float))
    slope, intercept = np.polyfit(logs[:, 0], logs[:, 1], 1)
    return float(np.exp(intercept)), float(slope)


def predicted_skip(done: list[dict], num_nodes: int, options: argparse.Namespace) -> str | None:
    """Why a cell at ``num_nodes`` should not run, or None: its step's CPU seconds and its peak memory
    extrapolated from the largest measured cell of the same model and mode at smaller ``N``, along
    the power law fitted to those cells but never slower than linear."""
    measured = [r for r in done if "step_cpu_s" in r]
    if not measured:
        return None
    largest = max(measured, key=lambda r: r["nodes"])
    estimates = {}
    for key in ("step_cpu_s", "peak_rss_mb"):
        exponent = growth([(r["nodes"], r[key]) for r in measured])[1] if len(measured) > 1 else 1.0
        estimates[key] = largest[key] * (num_nodes / largest["nodes"]) ** max(exponent, 1.0)
    if estimates["peak_rss_mb"] > MEMORY_CAP_GB * 1024:
        return f"skipped: about {estimates['peak_rss_mb'] / 1024:.0f} GB estimated from smaller N"
    if estimates["step_cpu_s"] > options.max_step_s:
        return f"skipped: about {estimates['step_cpu_s']:.0f} CPU s a step estimated from smaller N"
    return None


def largest_fitting(cells: list[dict]) -> dict | None:
    """The largest ``N`` whose peak memory is estimated to stay within :data:`MEMORY_BUDGET_MB`, from
    ``cells`` (one model and mode), and the exponent ``b`` of peak RSS ~ ``N^b``; None with fewer
    than two measured cells.

    Two extrapolations, the smaller ``N`` kept: the fitted power law, and a straight line through
    the cells (a fixed cost plus MB per node), since an exponent below 1 only says that the fixed
    cost (imports, model) still dominates, and the per-node cost is linear in the end.
    """
    measured = [r for r in cells if "peak_rss_mb" in r]
    if len(measured) < 2:
        return None
    nodes = np.asarray([r["nodes"] for r in measured], dtype=float)
    peak = np.asarray([r["peak_rss_mb"] for r in measured])
    a, b = growth(list(zip(nodes, peak, strict=True)))
    per_node, fixed = np.polyfit(nodes, peak, 1)
    estimates = [(MEMORY_BUDGET_MB / a) ** (1 / b) if b > 0 else math.inf,
                 (MEMORY_BUDGET_MB - fixed) / per_node if per_node > 0 else math.inf]
    above = [(r["nodes"], r["peak_rss_mb"] - r["rss_after_imports_mb"]) for r in measured]
    return {"exponent": b, "exponent_above_imports": growth(above)[1], "sizes": [r["nodes"] for r in measured],
            "mb_per_node": float(per_node), "largest_n": int(min(estimates)) if min(estimates) < math.inf else None}


def figure(results: list[dict], batch_size: int, path: Path) -> None:
    """Peak memory and CPU seconds a step against ``N``, log-log, one line per model and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    fig.suptitle(f"training steps of {batch_size} windows, whole graph (solid) or node batches (dashed)",
                 fontsize=9)
    for name in TRAIN_MODELS:
        for mode in TRAIN_MODES:
            cells = sorted((r for r in results if r["model"] == name and r["mode"] == mode and "step_s" in r),
                           key=lambda r: r["nodes"])
            if not cells:
                continue
            style = {"color": f"C{TRAIN_MODELS.index(name)}", "marker": "o" if mode == "full" else "s",
                     "linestyle": "-" if mode == "full" else "--", "label": f"{name}, {mode}"}
            axes[0].plot([r["nodes"] for r in cells], [r["peak_rss_mb"] / 1024 for r in cells], **style)
            axes[1].plot([r["nodes"] for r in cells], [r["step_cpu_s"] for r in cells], **style)
    axes[0].axhline(MEMORY_BUDGET_MB / 1024, color="grey", linewidth=0.8)  # the machine's 24 GiB
    for axis, label in zip(axes, ("peak resident memory (GB)", "CPU seconds per training step"), strict=True):
        axis.set(xscale="log", yscale="log", xlabel="nodes N", ylabel=label)
        axis.set_xticks(SIZES, [f"{n:,}" for n in SIZES], minor=False)
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_main(options: argparse.Namespace, sizes: tuple[int, ...]) -> None:
    """Measure every model, mode and size (growing ``N``), print the tables, write JSON and the figure.

    Cells already in the results file, measured with the same settings, are kept and not measured
    again, so runs over some models or modes (``--models``, ``--modes``) add up.
    """
    from common import RESULTS, markdown_table, write_results

    name = "large_graphs_training" + ("_quick" if options.quick else "")
    settings = {"neighbours": NEIGHBOURS, "signal_steps": SIGNAL_STEPS, "steps_per_day": STEPS_PER_DAY,
                "node_batch": options.node_batch, "batch_size": options.batch_size, "steps_timed": options.steps,
                "memory_cap_gb": MEMORY_CAP_GB, "max_step_cpu_s": options.max_step_s}
    earlier = RESULTS / f"{name}.json"
    results: list[dict] = []
    if earlier.exists():
        stored = json.loads(earlier.read_text())
        if all(stored.get(key) == value for key, value in settings.items()):
            results = [r for r in stored["results"] if "step_s" in r]  # skips are decided again
    for num_nodes in sizes:
        for model_name in options.models:
            for mode in options.modes:
                done = [r for r in results if r["model"] == model_name and r["mode"] == mode]
                if any(r["nodes"] == num_nodes for r in done):
                    continue
                reason = predicted_skip([r for r in done if r["nodes"] < num_nodes], num_nodes, options)
                result = ({"model": model_name, "nodes": num_nodes, "mode": mode, "skipped": reason} if reason
                          else train_child(model_name, num_nodes, mode, options))
                results.append(result)
                print(json.dumps(result), flush=True)
                write_results(name, {**settings, "results": results})  # a partial run is kept
    results.sort(key=lambda r: (r["nodes"], TRAIN_MODELS.index(r["model"]), TRAIN_MODES.index(r["mode"])))
    header = ["model", "mode", "N", "nodes a batch", "parameters (trainable)", "step s (CPU s)",
              "epoch h (CPU h), extrapolated", "steps an epoch", "peak RSS MB", "RSS after data MB"]
    rows = [[r["model"], r["mode"], r["nodes"],
             *([r["batch_nodes"], f"{r['parameters']:,} ({r['trainable']:,})",
                f"{r['step_s']:.2f} ({r['step_cpu_s']:.2f})",
                f"{r['epoch_s'] / 3600:.2f} ({r['epoch_cpu_s'] / 3600:.2f})", r["steps_per_epoch"],
                f"{r['peak_rss_mb']:.0f}", f"{r['rss_after_data_mb']:.0f}"] if "step_s" in r
               else ["-", "-", r["skipped"], "-", "-", "-", "-"])] for r in results]
    print(markdown_table(header, rows))
    fits = {f"{m}, {mode}": largest_fitting([r for r in results if r["model"] == m and r["mode"] == mode])
            for m in TRAIN_MODELS for mode in TRAIN_MODES}
    print(markdown_table(["model, mode", "sizes fitted", "peak RSS ~ N^b: b", "b above imports", "MB per node",
                          "largest N in 24 GiB (estimated)"],
                         [[k, " ".join(map(str, f["sizes"])), f"{f['exponent']:.2f}",
                           f"{f['exponent_above_imports']:.2f}", f"{f['mb_per_node']:.3f}",
                           f"{f['largest_n']:,}" if f["largest_n"] else "-"]
                          for k, f in fits.items() if f]))
    root = Path(__file__).resolve().parents[1]
    figure(results, options.batch_size, (root / "benchmarks" / "results" if options.quick else root / "docs") / f"{name}.png")
    path = write_results(name, {**settings, "results": results, "fits": fits})
    print(f"wrote {path}")


def main() -> None:
    """Measure every size and path, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"node counts (default {SIZES})")
    parser.add_argument("--node-batch", type=int, default=1024, help="K, the nodes of a node-batched forward")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one measurement may take")
    parser.add_argument("--train", action="store_true", help="measure training steps and epochs instead")
    parser.add_argument("--models", nargs="+", default=list(TRAIN_MODELS), choices=TRAIN_MODELS,
                        help="with --train: the models")
    parser.add_argument("--modes", nargs="+", default=list(TRAIN_MODES), choices=TRAIN_MODES,
                        help="with --train: whole graph, node batches, or both")
    parser.add_argument("--batch-size", type=int, default=32, help="with --train: windows a step")
    parser.add_argument("--steps", type=int, help="with --train: measured steps after one warm-up (5; 2 with --quick)")
    parser.add_argument("--max-step-s", type=float, default=60.0,
                        help="with --train: skip a cell estimated to take more CPU seconds a step")
    parser.add_argument("--one", nargs=4, metavar=("BACKBONE", "NODES", "PATH", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--one-train", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        backbone, nodes, path, node_batch = args.one
        print(json.dumps(measure(backbone, int(nodes), path, int(node_batch))))
        return
    if args.one_train:
        name, nodes, mode, node_batch, batch_size, steps = args.one_train
        print(json.dumps(measure_training(name, int(nodes), mode, int(node_batch), int(batch_size), int(steps))))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import markdown_table, write_results

    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    if args.train:
        args.steps = args.steps or (2 if args.quick else 5)
        train_main(args, tuple(sizes))
        return
    results = []
    for num_nodes in sizes:
        for backbone, path in RUNS:
            result = run_child(backbone, num_nodes, path, args.node_batch, args.timeout)
            results.append(result)
            print(json.dumps(result), flush=True)
    header = ["backbone", "N", "path", "forward nodes", "build s (CPU s)", "forward s (CPU s)", "peak RSS MB",
              "RSS before build MB"]
    rows = [[r["backbone"], r["nodes"], r["path"], r.get("forward_nodes", "-"),
             *([f"{r['build_s']:.2f} ({r['build_cpu_s']:.2f})", f"{r['forward_s']:.3f} ({r['forward_cpu_s']:.3f})",
                f"{r['peak_rss_mb']:.0f}", f"{r['rss_before_build_mb']:.0f}"] if "build_s" in r
               else [f"timed out ({r['timed_out_after_s']:.0f} s)", "-", "-", "-"])] for r in results]
    print(markdown_table(header, rows))
    name = "large_graphs_build_forward" + ("_quick" if args.quick else "")
    path = write_results(name, {"sizes": list(sizes), "neighbours": NEIGHBOURS, "node_batch": args.node_batch,
                                "batch": 1, "input_len": 12, "horizon": 12, "widths": "paper", "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
