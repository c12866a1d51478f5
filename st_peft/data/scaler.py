"""Per-channel standard scaling fitted on observed training values only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from st_peft.data.errors import DataError


@dataclass
class StandardScaler:
    """``(v - mean) / std`` per channel, shared by all nodes (the BasicTS convention).

    Attributes:
        mean: float32 ``(C,)``.
        std: float32 ``(C,)``, never 0.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, mask: np.ndarray) -> StandardScaler:
        """Fit on ``values`` ``(T, N, C)`` where ``mask`` is True (the training span only)."""
        channels = values.shape[-1]
        mean = np.zeros(channels, dtype=np.float32)
        std = np.ones(channels, dtype=np.float32)
        for c in range(channels):
            observed = values[..., c][mask[..., c]]
            if observed.size == 0:
                raise DataError(f"channel {c} has no observed value in the training span")
            mean[c] = observed.mean()
            std[c] = observed.std() or 1.0
        return cls(mean=mean, std=std)

    def select(self, channels: list[int]) -> StandardScaler:
        """The scaler of a subset of channels (for example the target channels)."""
        return StandardScaler(mean=self.mean[channels], std=self.std[channels])

    def transform(self, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Scale ``(..., C)`` values."""
        mean, std = self._like(values)
        return (values - mean) / std

    def inverse_transform(self, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Undo :meth:`transform` on ``(..., C)`` values (numpy or torch, any device)."""
        mean, std = self._like(values)
        return values * std + mean

    def _like(self, values):
        if isinstance(values, torch.Tensor):
            return (
                torch.as_tensor(self.mean, dtype=values.dtype, device=values.device),
                torch.as_tensor(self.std, dtype=values.dtype, device=values.device),
            )
        return self.mean, self.std

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready form, saved next to a trained model."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, content: dict[str, list[float]]) -> StandardScaler:
        """Inverse of :meth:`to_dict`."""
        return cls(mean=np.asarray(content["mean"], np.float32), std=np.asarray(content["std"], np.float32))
