"""Batch samplers over training windows.

Few-shot training needs no sampler: ``st_peft.data.build_splits(..., few_shot=f)`` already
keeps a fraction of the training windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


class MemoryReplaySampler(torch.utils.data.Sampler[list[int]]):
    """Batches in which a fixed share of every batch replays the earliest training windows.

    The windows whose starts are the earliest ``memory_fraction`` of the training set form
    the memory; the rest form the stream. One epoch walks the stream once (shuffled when
    ``shuffle``), and every full batch holds exactly ``round(replay_fraction * batch_size)``
    windows drawn from the memory (without repetition inside a batch) and the remaining
    slots from the stream. A last, shorter batch with ``f`` stream windows gets
    ``round(f * r / (batch_size - r))`` memory windows, keeping the same proportion. This is
    the memory replay of the FactoST adapter: later batches keep seeing early patterns.

    Pass it as ``STTrainer(..., train_sampler=MemoryReplaySampler(...))``; yields lists of
    row indices into the training ``datasets.Dataset``. The order depends only on ``seed``
    and the epoch (``set_epoch``), so every DDP rank builds the same batches and Accelerate
    hands each rank its share.

    Args:
        starts: window start index of every training row ``(num_windows,)``, e.g. ``splits.train["start"]``.
        batch_size: windows per batch (per device).
        memory_fraction: share of the earliest windows that form the memory, in ``(0, 1)``.
        replay_fraction: share of each batch drawn from the memory, in ``[0, 1)``.
        shuffle: shuffle the stream every epoch.
        seed: base seed of the random draws.
        drop_last: drop the last, shorter batch.
    """

    def __init__(
        self,
        starts: Sequence[int] | np.ndarray,
        batch_size: int,
        memory_fraction: float = 0.2,
        replay_fraction: float = 0.3,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        starts = np.asarray(starts)
        if not 0.0 < memory_fraction < 1.0:
            raise ValueError(f"memory_fraction must lie in (0, 1), got {memory_fraction}")
        if not 0.0 <= replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must lie in [0, 1), got {replay_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.replay_per_batch = round(replay_fraction * batch_size)
        self.stream_per_batch = batch_size - self.replay_per_batch
        if self.stream_per_batch < 1:
            raise ValueError(
                f"replay_fraction {replay_fraction} of batch_size {batch_size} leaves no slot for new windows"
            )
        order = np.argsort(starts, kind="stable")
        memory_size = math.ceil(memory_fraction * len(starts))
        self.memory = np.sort(order[:memory_size])
        self.stream = np.sort(order[memory_size:])
        if len(self.stream) == 0:
            raise ValueError(f"{len(starts)} windows leave none after a memory of {memory_size}")
        if self.replay_per_batch > len(self.memory):
            raise ValueError(
                f"each batch replays {self.replay_per_batch} windows but the memory holds only {len(self.memory)} "
                f"({memory_fraction} of {len(starts)} windows)"
            )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle and replay draws the next iteration uses."""
        self.epoch = epoch

    def _replay_count(self, stream_count: int) -> int:
        if stream_count == self.stream_per_batch:
            return self.replay_per_batch
        return round(stream_count * self.replay_per_batch / self.stream_per_batch)

    def __len__(self) -> int:
        full, rest = divmod(len(self.stream), self.stream_per_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        stream = rng.permutation(self.stream) if self.shuffle else self.stream
        for batch_index in range(len(self)):
            fresh = stream[batch_index * self.stream_per_batch : (batch_index + 1) * self.stream_per_batch]
            replay = rng.choice(self.memory, size=self._replay_count(len(fresh)), replace=False)
            yield [int(i) for i in np.concatenate([fresh, replay])]
