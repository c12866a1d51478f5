"""ST-LINK (model type ``st_link``): a spatially aware GPT-2 forecaster, registered with the Auto classes.

``AutoConfig`` and ``AutoModel`` resolve ``st_link`` to [`STLinkConfig`] and [`STLinkModel`];
``AutoModelForTimeSeriesPrediction`` resolves it to [`STLinkForForecasting`]. The classes are
also registered for their Auto classes as custom code, so ``save_pretrained`` copies the
modeling files next to the weights and the folder loads with ``trust_remote_code=True``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForTimeSeriesPrediction

from st_peft.models.st_link.configuration_st_link import STLinkConfig
from st_peft.models.st_link.modeling_st_link import (
    STLinkForForecasting,
    STLinkModel,
    STLinkModelOutput,
    STLinkPreTrainedModel,
)

AutoConfig.register(STLinkConfig.model_type, STLinkConfig, exist_ok=True)
AutoModel.register(STLinkConfig, STLinkModel, exist_ok=True)
AutoModelForTimeSeriesPrediction.register(STLinkConfig, STLinkForForecasting, exist_ok=True)
STLinkConfig.register_for_auto_class()
STLinkModel.register_for_auto_class("AutoModel")
STLinkForForecasting.register_for_auto_class("AutoModelForTimeSeriesPrediction")

__all__ = [
    "STLinkConfig",
    "STLinkForForecasting",
    "STLinkModel",
    "STLinkModelOutput",
    "STLinkPreTrainedModel",
]
