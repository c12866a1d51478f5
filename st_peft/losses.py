"""Training losses on forecasts in original units.

A loss is a callable ``(prediction, future_values, future_observed_mask) -> 0-dim tensor`` on
``(B, H, N, C)`` tensors, the mask bool with True = observed; missing entries never contribute.
Every st-peft model picks its loss by name (its ``loss`` argument) from :data:`LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from st_peft.metrics import masked_mae, masked_mse, valid_mask

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def masked_huber(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Huber loss (quadratic below ``delta``, linear above) over observed entries of ``(B, H, N, C)`` tensors."""
    valid = valid_mask(target, mask)
    zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
    target = torch.where(valid, target, zero)
    per_entry = F.huber_loss(pred, target.to(pred.dtype), reduction="none", delta=delta)
    return torch.where(valid, per_entry, zero).sum() / valid.sum().clamp(min=1)


LOSSES: dict[str, LossFn] = {"mae": masked_mae, "mse": masked_mse, "huber": masked_huber}


def get_loss(loss: str | LossFn) -> LossFn:
    """Return the loss named ``loss`` (one of :data:`LOSSES`), or ``loss`` itself when it is callable."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} or pass a callable")
    return LOSSES[loss]
