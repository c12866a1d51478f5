"""ST-LoRA (Ruan et al., ECML-PKDD 2025): node-adaptive low-rank adaptation of spatio-temporal forecasters.

Importing this package registers the PEFT type ``STLORA``.
"""

from st_peft.tuners.registration import register_st_peft_method
from st_peft.tuners.st_lora.config import STLoraConfig
from st_peft.tuners.st_lora.layer import (
    NodeAdaptiveLayer,
    NodeSpecificPredictor,
    STLoraLayer,
    STLoraPredictorLayer,
)
from st_peft.tuners.st_lora.model import STLoraModel

__all__ = [
    "NodeAdaptiveLayer",
    "NodeSpecificPredictor",
    "STLoraConfig",
    "STLoraLayer",
    "STLoraModel",
    "STLoraPredictorLayer",
]

register_st_peft_method(name="stlora", config_cls=STLoraConfig, model_cls=STLoraModel, prefix="stl_")
