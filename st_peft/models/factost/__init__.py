"""FactoST temporal backbone (model type ``factost``), registered with the Auto classes."""

from transformers import AutoConfig, AutoModel

from st_peft.models.factost.configuration_factost import FACTOST_SIZES, FactoSTConfig
from st_peft.models.factost.modeling_factost import (
    FactoSTModel,
    FactoSTPreTrainedModel,
    FactoSTTokenContext,
    FactoSTTokenHook,
    FactoSTTokenHookOutput,
)

AutoConfig.register(FactoSTConfig.model_type, FactoSTConfig, exist_ok=True)
AutoModel.register(FactoSTConfig, FactoSTModel, exist_ok=True)

__all__ = [
    "FACTOST_SIZES",
    "FactoSTConfig",
    "FactoSTModel",
    "FactoSTPreTrainedModel",
    "FactoSTTokenContext",
    "FactoSTTokenHook",
    "FactoSTTokenHookOutput",
]
