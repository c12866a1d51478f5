"""Reference spatio-temporal forecasters: STID, Graph WaveNet and STGCN.

Each is an :class:`~st_peft.forecasting.STForecaster` (an ``nn.Module``) with
``huggingface_hub.PyTorchModelHubMixin`` (so ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub`` work), takes ``num_nodes, input_len, horizon, in_channels, out_channels``,
``scaling`` (plus ``adjacency`` for the graph models), and maps ``past_values``
``(B, L, N, C_in)`` in original units to a ``ForecastOutput`` whose ``prediction_outputs``
is ``(B, H, N, C_out)`` in original units.
``BACKBONES`` maps the names used by the CLI and the benchmarks to the classes.
"""

from st_peft.backbones.gwnet import GWNet
from st_peft.backbones.stgcn import STGCN
from st_peft.backbones.stid import STID

BACKBONES = {"stid": STID, "gwnet": GWNet, "stgcn": STGCN}

__all__ = ["BACKBONES", "GWNet", "STGCN", "STID"]
