"""Graph backbones on LargeST-sized graphs: build time, one forward, peak memory, dense against sparse.

    OMP_NUM_THREADS=1 python benchmarks/large_graphs.py [--quick] [--sizes 716 2352] [--node-batch 1024]
                                                       [--timeout 900]

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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
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


def main() -> None:
    """Measure every size and path, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"node counts (default {SIZES})")
    parser.add_argument("--node-batch", type=int, default=1024, help="K, the nodes of a node-batched forward")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one measurement may take")
    parser.add_argument("--one", nargs=4, metavar=("BACKBONE", "NODES", "PATH", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        backbone, nodes, path, node_batch = args.one
        print(json.dumps(measure(backbone, int(nodes), path, int(node_batch))))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import markdown_table, write_results

    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
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
