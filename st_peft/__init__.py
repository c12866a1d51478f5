"""st-peft: spatio-temporal forecasting in the Hugging Face stack.

Importing this package registers the PEFT methods (``STLORA``, ``FACTOST``) and the
transformers models (``factost``, ``st_link``) with their Auto classes.
"""

from st_peft.models.factost import FactoSTConfig, FactoSTModel
from st_peft.models.st_link import STLinkConfig, STLinkForForecasting
from st_peft.outputs import ForecastOutput
from st_peft.shipped import shipped_checkpoint
from st_peft.tuners.checkpoint_keys import loading_backbone_weights
from st_peft.tuners.factost import FactoSTAdapterConfig
from st_peft.tuners.st_lora import STLoraConfig
from st_peft.tuners.st_lora.seamed import SeamedForecaster
from st_peft_cli import __version__

__all__ = [
    "FactoSTAdapterConfig",
    "FactoSTConfig",
    "FactoSTModel",
    "ForecastOutput",
    "STLinkConfig",
    "STLinkForForecasting",
    "STLoraConfig",
    "SeamedForecaster",
    "__version__",
    "loading_backbone_weights",
    "shipped_checkpoint",
]
