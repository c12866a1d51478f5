"""Train a small forecaster with STTrainer in each process of an ``accelerate launch`` run.

Each rank writes ``rank<r>.json`` into the output folder: the world size it saw, a hash of
its parameters before and after training, and its test metrics; rank 0 also writes the
trained weights. ``tests/test_ddp.py`` launches this script with two CPU processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import st_peft.data as std
from st_peft.training import MemoryReplaySampler, STTrainer, st_training_args
from st_peft.training.distributed import leave_process_group

TEST_ROWS = 75  # not a multiple of 2 processes x batch: gathering must drop the padding


class NodeLinear(nn.Module):
    """History ``(B, L, N, C)`` -> horizon ``(B, H, N, C)`` by a Linear over the time axis."""

    def __init__(self, input_len: int, horizon: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_len, horizon)

    def forward(self, past_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """Map ``past_values`` ``(B, L, N, C)`` to ``(B, H, N, C)``, in original units."""
        return self.proj(past_values.transpose(1, 3)).transpose(1, 3)


def parameter_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    output_dir = parser.parse_args().output_dir
    torch.set_num_threads(1)

    data = std.load("sz-taxi").select_nodes(np.arange(16))
    splits = std.build_splits(data, input_len=12, horizon=12)
    torch.manual_seed(0)
    model = NodeLinear(splits.input_len, splits.horizon)
    initial = parameter_hash(model)
    args = st_training_args(
        os.path.join(output_dir, "run"), epochs=1, batch_size=16, lr=1e-2, use_cpu=True,
        eval_strategy="no", save_strategy="no", load_best_model_at_end=False, disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    train = splits.train.select(range(0, 2000, 10))
    # the batch-sampler path: Accelerate must hand each rank its share of the replay batches
    sampler = MemoryReplaySampler(np.asarray(train["start"]), batch_size=16, replay_fraction=0.25)
    trainer = STTrainer(model, args, train, None, splits.collator, train_sampler=sampler)
    trainer.train()
    metrics = trainer.evaluate_test(splits.test.select(range(TEST_ROWS)), horizons=(1, 12))

    rank = dist.get_rank() if dist.is_initialized() else 0
    report = {
        "rank": rank,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "trainer_world_size": trainer.args.world_size,
        "sampler_batches": len(sampler),
        "global_step": trainer.state.global_step,
        "initial_hash": initial,
        "final_hash": parameter_hash(model),
        "metrics": metrics,
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(output_dir, "final.safetensors"))

    leave_process_group()


if __name__ == "__main__":
    main()
