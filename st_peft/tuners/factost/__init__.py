"""FACTOST (Zhong et al., NeurIPS 2025; FactoST-v2): light spatio-temporal adaptation of a frozen FactoST backbone.

Importing this package registers the PEFT type ``FACTOST``.
"""

from st_peft.tuners.factost.config import FactoSTAdapterConfig
from st_peft.tuners.factost.layer import DomainPrompts, FactoSTAdapterLayer, InteractionFilter, MetadataFusion
from st_peft.tuners.factost.model import FactoSTAdapterModel
from st_peft.tuners.registration import register_st_peft_method

__all__ = [
    "DomainPrompts",
    "FactoSTAdapterConfig",
    "FactoSTAdapterLayer",
    "FactoSTAdapterModel",
    "InteractionFilter",
    "MetadataFusion",
]

register_st_peft_method(
    name="factost", config_cls=FactoSTAdapterConfig, model_cls=FactoSTAdapterModel, prefix="factost_"
)
