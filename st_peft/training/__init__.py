"""Training: ``STTrainer`` (a ``transformers.Trainer``), its default arguments and samplers.

The losses live with the models (``st_peft.losses``): every st-peft model returns its own.
"""

from st_peft.training.distributed import leave_process_group
from st_peft.training.samplers import MemoryReplaySampler
from st_peft.training.trainer import NonFiniteLossError, STTrainer, default_horizons, st_training_args

__all__ = [
    "MemoryReplaySampler",
    "NonFiniteLossError",
    "STTrainer",
    "default_horizons",
    "leave_process_group",
    "st_training_args",
]
