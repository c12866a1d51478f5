"""Run ``st-peft`` under ``accelerate launch`` and record what each rank trained.

Usage: ``accelerate launch --config_file <cfg> tests/scripts/cli_ranks.py <report_dir> train --config <recipe> ...``

The arguments after ``<report_dir>`` go to ``st_peft.cli.main`` unchanged. To see every
rank's weights (``st-peft train`` saves only rank 0's), ``STTrainer`` is replaced by a
subclass with a callback that writes ``rank<r>.json``: world size, the Accelerator's mixed
precision, steps taken and a hash of the weights when training starts and at the end of
the last epoch (before the best checkpoint is reloaded, which would make the ranks equal
whatever they did). ``tests/test_recipes.py`` launches this with ``recipes/accelerate/cpu_2proc.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

import st_peft.training
from st_peft import cli


def parameter_hash(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model``'s state dict, in name order."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class RankReport(TrainerCallback):
    """Write this rank's world size, precision, steps and weight hashes to ``<report_dir>/rank<r>.json``."""

    def __init__(self, report_dir: str, trainer: st_peft.training.STTrainer) -> None:
        self.report_dir = report_dir
        self.trainer = trainer
        self.report: dict = {}

    def _model(self) -> nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def on_train_begin(self, args, state, control, **kwargs):
        self.report["initial_hash"] = parameter_hash(self._model())

    def on_epoch_end(self, args, state, control, **kwargs):
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.report.update(
            rank=rank,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            trainer_world_size=args.world_size,
            mixed_precision=str(self.trainer.accelerator.mixed_precision),
            global_step=state.global_step,
            final_hash=parameter_hash(self._model()),
        )
        with open(os.path.join(self.report_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(self.report, handle)


def main() -> None:
    report_dir, argv = sys.argv[1], sys.argv[2:]

    class ReportingTrainer(st_peft.training.STTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(RankReport(report_dir, self))

    # `st-peft train` imports STTrainer from st_peft.training when it runs
    st_peft.training.STTrainer = ReportingTrainer
    # under a process group cli.main ends the process itself (leave_process_group)
    cli.main(argv)


if __name__ == "__main__":
    main()
