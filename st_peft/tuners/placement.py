"""Where a tuner puts new adapter weights that replace a module without weights of its own."""

from __future__ import annotations

import torch
from torch import nn


def forecaster_placement(model: nn.Module, prefix: str) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype of the forecaster's first floating-point weight; (None, None) without any.

    Args:
        model: the forecaster, adapters included.
        prefix: the tuner's parameter-name prefix; weights whose name contains it are adapters'.
    """
    for name, parameter in model.named_parameters():
        if prefix not in name and parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return None, None
