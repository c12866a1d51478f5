"""Reference spatio-temporal forecasters: STID, Graph WaveNet and STGCN.

Each is a plain ``nn.Module`` with ``huggingface_hub.PyTorchModelHubMixin`` (so
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` work), takes
``num_nodes, input_len, horizon, in_channels, out_channels`` (plus ``adjacency`` for the
graph models) and maps ``x`` ``(B, L, N, C_in)`` to ``(B, H, N, C_out)``.
``BACKBONES`` maps the names used by the CLI and the benchmarks to the classes.
"""

from st_peft.backbones.gwnet import GWNet
from st_peft.backbones.stgcn import STGCN
from st_peft.backbones.stid import STID

BACKBONES = {"stid": STID, "gwnet": GWNet, "stgcn": STGCN}

__all__ = ["BACKBONES", "GWNet", "STGCN", "STID"]
