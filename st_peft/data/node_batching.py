"""Node batching: each batch carries ``K`` of the graph's ``N`` nodes, with their ``node_index``.

A graph too large for one batch is trained on node subsets. Two ways to draw them:

- ``"uniform"``: ``K`` distinct nodes uniformly at random;
- ``"bfs"``: a graph-local patch grown by breadth-first search from a random node, so that graph
  convolutions see neighbours (the induced subgraph is connected where the graph allows it; when a
  connected component is used up, the search starts again from a random unvisited node).

Every node-indexed tensor of the batch (``past_values``, ``past_observed_mask``,
``future_values``, ``future_observed_mask``) keeps the drawn nodes in increasing order, and
``node_index`` ``(K,)`` says which they are; calendar features have no node axis and are unchanged.

Resuming: a data loader may call the collator ahead of training (Accelerate's loader fetches one
batch ahead), so the sampler's state *now* is not the state at the first batch not yet trained on.
:class:`NodeBatchCollator` keeps the sampler's state before each of its recent draws;
``state_dict(draw)`` gives the state before draw number ``draw`` (counted from construction or
the last ``load_state_dict``), from which the draws resume exactly.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

from st_peft.data.errors import DataError
from st_peft.data.windows import WindowCollator

NODE_SAMPLING = ("uniform", "bfs")
NODE_KEYS = ("past_values", "past_observed_mask", "future_values", "future_observed_mask")


def neighbour_lists(adjacency: np.ndarray) -> list[np.ndarray]:
    """Neighbours of every node of an ``(N, N)`` adjacency, edges taken both ways, self-loops left out."""
    linked = (np.asarray(adjacency) != 0) | (np.asarray(adjacency) != 0).T
    np.fill_diagonal(linked, False)
    return [np.flatnonzero(row) for row in linked]


class NodeSampler:
    """Draws the nodes of each batch.

    Args:
        num_nodes: ``N``, the graph's nodes.
        nodes_per_batch: ``K``; above ``N`` it is capped at ``N`` with a note, below 1 refused.
        strategy: ``"uniform"`` or ``"bfs"`` (see the module docstring).
        adjacency: ``(N, N)`` graph, required for ``"bfs"``.
        seed: seed of the draws (a whole number, or a sequence of them such as ``[seed, rank]``).

    Attributes:
        passes_per_epoch: ``ceil(N / K)``, how often a training epoch visits each window (each
            visit with its own draw), so that an epoch sees every (window, node) pair about once,
            as a whole-graph epoch does (see ``STTrainer(node_sampler=...)``).
    """

    def __init__(self, num_nodes: int, nodes_per_batch: int, strategy: str = "uniform",
                 adjacency: np.ndarray | None = None, seed: int | Sequence[int] = 0):
        if isinstance(nodes_per_batch, bool) or not isinstance(nodes_per_batch, (int, np.integer)) or nodes_per_batch < 1:
            raise DataError(f"the node batch size must be a whole number >= 1, got {nodes_per_batch!r}")
        if strategy not in NODE_SAMPLING:
            raise DataError(f"unknown node sampling {strategy!r}; use one of {list(NODE_SAMPLING)}")
        if nodes_per_batch > num_nodes:
            warnings.warn(f"a node batch size of {nodes_per_batch} is more than the graph's {num_nodes} nodes; "
                          f"batches carry all {num_nodes}", stacklevel=2)
            nodes_per_batch = num_nodes
        if strategy == "bfs":
            if adjacency is None:
                raise DataError("node sampling 'bfs' grows patches along the graph and needs an adjacency")
            if np.shape(adjacency) != (num_nodes, num_nodes):
                raise DataError(f"the adjacency has shape {np.shape(adjacency)} but the data has {num_nodes} nodes")
        self.num_nodes = int(num_nodes)
        self.nodes_per_batch = int(nodes_per_batch)
        self.passes_per_epoch = -(-self.num_nodes // self.nodes_per_batch)
        self.strategy = strategy
        self.neighbours = neighbour_lists(adjacency) if strategy == "bfs" else None
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> np.ndarray:
        """The next batch's nodes: int64 ``(K,)``, increasing."""
        if self.nodes_per_batch == self.num_nodes:
            return np.arange(self.num_nodes)
        if self.strategy == "uniform":
            return np.sort(self.rng.choice(self.num_nodes, size=self.nodes_per_batch, replace=False))
        return np.sort(self._patch())

    def _patch(self) -> np.ndarray:
        visited = np.zeros(self.num_nodes, dtype=bool)
        order: list[int] = []
        queue: deque[int] = deque()
        while len(order) < self.nodes_per_batch:
            if not queue:
                start = int(self.rng.choice(np.flatnonzero(~visited)))
                visited[start] = True
                queue.append(start)
            node = queue.popleft()
            order.append(node)
            fresh = [int(n) for n in self.rng.permutation(self.neighbours[node]) if not visited[n]]
            visited[fresh] = True
            queue.extend(fresh)
        return np.asarray(order, dtype=np.int64)

    def state_dict(self) -> dict:
        """The draws' state, to resume them exactly."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Resume the draws from :meth:`state_dict`."""
        self.rng.bit_generator.state = state["rng"]


class NodeBatchCollator:
    """A collator whose batches carry the nodes a :class:`NodeSampler` draws, one draw per batch.

    Args:
        collator: the splits' collator (``splits.collator``).
        sampler: draws the nodes of each batch.

    Attributes:
        draws: draws made since construction or the last :meth:`load_state_dict`.
    """

    KEPT_STATES = 64
    """Sampler states kept for the most recent draws: a loader fetches at most a few batches ahead."""

    def __init__(self, collator: WindowCollator, sampler: NodeSampler):
        nodes = collator.inputs.shape[1]
        if sampler.num_nodes != nodes:
            raise DataError(f"the node sampler draws from {sampler.num_nodes} nodes but the data has {nodes}")
        self.collator = collator
        self.sampler = sampler
        self.draws = 0
        self._states: dict[int, dict] = {}

    def state_dict(self, draw: int | None = None) -> dict:
        """The sampler's state before draw number ``draw`` (default: the next one), to resume the draws there.

        Raises:
            ValueError: ``draw`` is in the future, or too far back to be kept.
        """
        if draw is None or draw == self.draws:
            return self.sampler.state_dict()
        if draw not in self._states:
            raise ValueError(f"the node sampler's state before draw {draw} is not kept: {self.draws} draws were "
                             f"made, and states of the last {self.KEPT_STATES} only are kept")
        return self._states[draw]

    def load_state_dict(self, state: dict) -> None:
        """Resume the draws from a :meth:`state_dict`; draws are counted from here again."""
        self.sampler.load_state_dict(state)
        self.draws = 0
        self._states.clear()

    def _draw(self) -> np.ndarray:
        self._states[self.draws] = self.sampler.state_dict()
        self._states.pop(self.draws - self.KEPT_STATES, None)
        self.draws += 1
        return self.sampler()

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Collate rows ``{"start": s}`` of a split (the ``data_collator`` of a Trainer)."""
        batch_starts = np.fromiter((row["start"] for row in rows), dtype=np.int64, count=len(rows))
        return self.gather(batch_starts)

    def gather(self, starts: np.ndarray, nodes: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """The windows that begin at ``starts`` ``(B,)`` on ``nodes`` ``(K,)`` (the next draw by default).

        Returns:
            The batch of ``WindowCollator.gather`` with ``(B, L|H, K, C)`` node-indexed tensors and
            ``node_index`` int64 ``(K,)``.
        """
        nodes = self._draw() if nodes is None else np.asarray(nodes, dtype=np.int64)
        collator = self.collator
        starts = np.asarray(starts, dtype=np.int64)
        past = starts[:, None] + np.arange(collator.input_len)
        future = starts[:, None] + collator.input_len + np.arange(collator.horizon)
        # one fancy index per array, (B, L, K, C) at once: gathering all N nodes first would cost N / K times more
        picked = nodes[None, None, :]
        sources = {"past_values": (collator.inputs, past), "past_observed_mask": (collator.input_mask, past),
                   "future_values": (collator.targets, future), "future_observed_mask": (collator.target_mask, future)}
        batch = {key: torch.from_numpy(array[steps[:, :, None], picked]) for key, (array, steps) in sources.items()}
        batch["past_time_features"] = torch.from_numpy(collator.calendar[past])
        batch["future_time_features"] = torch.from_numpy(collator.calendar[future])
        batch["node_index"] = torch.from_numpy(nodes)
        return batch


__all__ = ["NODE_SAMPLING", "NodeBatchCollator", "NodeSampler", "neighbour_lists"]
