"""FactoST temporal backbone (model type ``factost``), registered with the Auto classes.

``AutoConfig``, ``AutoModel`` and ``AutoModelForTimeSeriesPrediction`` resolve ``factost`` to
[`FactoSTConfig`] and [`FactoSTModel`] (the backbone forecasts by itself; there is no separate
prediction head class).
"""

from transformers import AutoConfig, AutoModel, AutoModelForTimeSeriesPrediction

from st_peft.models.factost.configuration_factost import FACTOST_SIZES, QUANTILE_LOSS, FactoSTConfig
from st_peft.models.factost.modeling_factost import (
    FactoSTModel,
    FactoSTPreTrainedModel,
    FactoSTTokenContext,
    FactoSTTokenHook,
    FactoSTTokenHookOutput,
)

AutoConfig.register(FactoSTConfig.model_type, FactoSTConfig, exist_ok=True)
AutoModel.register(FactoSTConfig, FactoSTModel, exist_ok=True)
AutoModelForTimeSeriesPrediction.register(FactoSTConfig, FactoSTModel, exist_ok=True)

__all__ = [
    "FACTOST_SIZES",
    "QUANTILE_LOSS",
    "FactoSTConfig",
    "FactoSTModel",
    "FactoSTPreTrainedModel",
    "FactoSTTokenContext",
    "FactoSTTokenHook",
    "FactoSTTokenHookOutput",
]
