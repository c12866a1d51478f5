"""What training and evaluation need around node batches: which models may be evaluated in node
chunks, the chunks themselves, and the node sampler's state in a checkpoint.

A forecaster trained on ``K`` of its ``N`` nodes per batch (:mod:`st_peft.data.node_batching`) is
still evaluated on every node. A model whose forecast of a node reads only that node's own series
(it says so with ``forecasts_nodes_independently = True``: STID, FactoST, and the adapters that keep
that property) is evaluated in chunks of nodes, each chunk with its ``node_index``; exactly the
same numbers as one pass over the whole graph, up to floating-point summation order. A graph
model (GWNet, STGCN) sees its neighbours, so a chunk would change its forecast: it is evaluated on
the whole graph.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from st_peft.data.node_batching import NODE_KEYS, NodeBatchCollator

SAMPLER_STATE = "node_sampler.json"
"""The node sampler's state in a checkpoint folder (``node_sampler_<rank>.json`` with several processes)."""


def forecasts_nodes_independently(model: nn.Module) -> bool:
    """Whether ``model``'s forecast of each node depends on that node's inputs only.

    Read from the model's ``forecasts_nodes_independently`` attribute (a ``PeftModel`` asks its
    tuner, which asks the forecaster unless an adapter mixes nodes); False when it has none.
    """
    return bool(getattr(model, "forecasts_nodes_independently", False))


def forecaster_num_nodes(model: nn.Module) -> int | None:
    """The number of graph nodes ``model`` was built for (``config.num_nodes``), or None when it does not say."""
    # a forecaster's config says it; FactoST's names no graph, but its FACTOST adapter's config does
    for config in (getattr(model, "config", None), getattr(model, "active_peft_config", None)):
        nodes = getattr(config, "num_nodes", None)
        if isinstance(nodes, int) and not isinstance(nodes, bool):
            return nodes
    return None


def check_same_graph(model: nn.Module, nodes: int, what: str) -> None:
    """Refuse data of another node count than the model's, naming both.

    Needed wherever st-peft itself builds a ``node_index``: the model would accept a subset of any
    graph of at most its own size without a word.

    Raises:
        ValueError: the model was built for another number of nodes.
    """
    built = forecaster_num_nodes(model)
    if built is not None and built != nodes:
        raise ValueError(f"{type(model).__name__} was built for {built} nodes but {what} has {nodes} nodes")


def node_chunks(inputs: dict[str, torch.Tensor], chunk: int) -> Iterator[dict[str, torch.Tensor]]:
    """The whole-graph batch ``inputs`` cut into batches of at most ``chunk`` consecutive nodes.

    Args:
        inputs: a batch without ``node_index``: node-indexed tensors ``(B, L|H, N, C)``, calendar
            features ``(B, L|H, F)``.
        chunk: nodes per piece.

    Yields:
        Batches with ``(B, L|H, n, C)`` node-indexed tensors (views) and ``node_index`` int64 ``(n,)``.
    """
    nodes = inputs["past_values"].shape[2]
    device = inputs["past_values"].device
    for start in range(0, nodes, chunk):
        stop = min(start + chunk, nodes)
        piece = {key: value[:, :, start:stop] if key in NODE_KEYS and value is not None else value
                 for key, value in inputs.items()}
        piece["node_index"] = torch.arange(start, stop, device=device)
        yield piece


def sampler_state_file(folder: str | Path, process_index: int, num_processes: int) -> Path:
    """Where one process keeps its node sampler's state in the checkpoint ``folder``."""
    name = SAMPLER_STATE if num_processes == 1 else f"node_sampler_{process_index}.json"
    return Path(folder) / name


def save_sampler_state(collator: NodeBatchCollator, draw: int, path: Path) -> None:
    """Write the sampler's state before draw ``draw`` (the first batch not trained on) to ``path``."""
    path.write_text(json.dumps(collator.state_dict(draw)), encoding="utf-8")


def load_sampler_state(collator: NodeBatchCollator, path: Path) -> None:
    """Resume ``collator``'s draws from the state in ``path``.

    Raises:
        ValueError: the checkpoint holds no node sampler state (it was not saved by node-batched training).
    """
    if not path.is_file():
        raise ValueError(f"the checkpoint {path.parent} has no {path.name}: it was not saved by node-batched "
                         "training, so it cannot resume node-batched training")
    collator.load_state_dict(json.loads(path.read_text(encoding="utf-8")))


__all__ = [
    "SAMPLER_STATE",
    "check_same_graph",
    "forecaster_num_nodes",
    "forecasts_nodes_independently",
    "load_sampler_state",
    "node_chunks",
    "sampler_state_file",
    "save_sampler_state",
]
