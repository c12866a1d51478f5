"""Training: ``STTrainer`` (a ``transformers.Trainer``), its default arguments, losses and samplers."""

from st_peft.training.distributed import leave_process_group
from st_peft.training.losses import LOSSES, get_loss, masked_huber
from st_peft.training.samplers import MemoryReplaySampler
from st_peft.training.trainer import STTrainer, default_horizons, st_training_args

__all__ = [
    "LOSSES",
    "MemoryReplaySampler",
    "STTrainer",
    "default_horizons",
    "get_loss",
    "leave_process_group",
    "masked_huber",
    "st_training_args",
]
