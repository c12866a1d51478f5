"""Reference spatio-temporal forecasters: STID, Graph WaveNet and STGCN, registered with the Auto classes.

Each is an :class:`~st_peft.forecasting.STPreTrainedModel` (a transformers ``PreTrainedModel``)
with its own configuration (:class:`STIDConfig`, :class:`GWNetConfig`, :class:`STGCNConfig`):
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` are transformers' own, and
``AutoConfig`` / ``AutoModelForTimeSeriesPrediction`` resolve the model types ``stid``, ``gwnet``
and ``stgcn``. Each maps ``past_values`` ``(B, L, N, C_in)`` in original units to a
``ForecastOutput`` whose ``prediction_outputs`` is ``(B, H, N, C_out)`` in original units.
``BACKBONES`` maps the names used by the CLI and the benchmarks to the classes.
"""

from transformers import AutoConfig, AutoModelForTimeSeriesPrediction

from st_peft.backbones.configuration_backbones import GWNetConfig, STBackboneConfig, STGCNConfig, STIDConfig
from st_peft.backbones.gwnet import GWNet
from st_peft.backbones.stgcn import STGCN
from st_peft.backbones.stid import STID

BACKBONES = {"stid": STID, "gwnet": GWNet, "stgcn": STGCN}

for _model_class in BACKBONES.values():
    AutoConfig.register(_model_class.config_class.model_type, _model_class.config_class, exist_ok=True)
    AutoModelForTimeSeriesPrediction.register(_model_class.config_class, _model_class, exist_ok=True)

__all__ = ["BACKBONES", "GWNet", "GWNetConfig", "STBackboneConfig", "STGCN", "STGCNConfig", "STID", "STIDConfig"]
