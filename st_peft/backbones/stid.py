"""STID: Spatial-Temporal Identity (Shao et al., CIKM 2022, arXiv:2208.05233).

An MLP forecaster: the flattened history window of each node is embedded and concatenated
with learned identities of the node, of the time of day and of the day of week; residual
MLP layers encode the result and a linear head regresses the whole horizon at once.

Layout: the model receives ``past_values`` as ``(B, L, N, C_in)``, works on node tokens
``(B, N, hidden)`` (every ``nn.Linear`` acts on the last axis, the node axis is 1) and
forecasts ``(B, H, N, C_out)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from st_peft.backbones.configuration_backbones import STIDConfig
from st_peft.checks import check_time_features
from st_peft.forecasting import STPreTrainedModel
from st_peft.scaling import STScaler


class ResidualMLP(nn.Module):
    """``x + fc2(dropout(relu(fc1(x))))`` on the last axis; shape-preserving ``(..., D) -> (..., D)``."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the residual block to ``hidden`` ``(..., D)``."""
        return hidden + self.fc2(self.dropout(self.act(self.fc1(hidden))))


class STID(STPreTrainedModel):
    """Spatial-Temporal Identity forecaster.

    Args:
        config: the sizes, calendar, scaling, loss and widths (:class:`STIDConfig`); or ``None``
            with its fields as keyword arguments: ``STID(**splits.model_kwargs(),
            steps_per_day=splits.steps_per_day)`` is ``STID(STIDConfig(...))``.
        **fields: fields of :class:`STIDConfig`, when ``config`` is None.

    Raises:
        ValueError: ``if_tod`` without ``steps_per_day`` (the number of time-of-day slots is never assumed).
    """

    config_class = STIDConfig
    base_model_prefix = "stid"
    forecasts_nodes_independently = True  # a per-node MLP: nothing crosses nodes

    def __init__(self, config: STIDConfig | None = None, **fields: Any) -> None:
        config = STIDConfig(**fields) if config is None else config
        super().__init__(config)
        if config.if_tod and config.steps_per_day is None:
            raise ValueError("STID reads the time of day (if_tod=True): give steps_per_day, the time-of-day "
                             "slots per day (288 for 5-minute data, splits.steps_per_day), or if_tod=False")
        # registered first, so a saved scaler of another graph is reported before any other mismatch
        self.scaler = STScaler(config.num_nodes, config.in_channels, config.out_channels, config.scaling,
                               model=type(self).__name__)
        self.series_embedding = nn.Linear(config.input_len * config.in_channels, config.embed_dim)
        hidden_dim = config.embed_dim
        if config.if_node:
            self.node_embedding = nn.Parameter(
                nn.init.xavier_uniform_(torch.empty(config.num_nodes, config.node_dim)))
            hidden_dim += config.node_dim
        if config.if_tod:
            self.tod_embedding = nn.Parameter(
                nn.init.xavier_uniform_(torch.empty(config.steps_per_day, config.tod_dim)))
            hidden_dim += config.tod_dim
        if config.if_dow:
            self.dow_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(7, config.dow_dim)))
            hidden_dim += config.dow_dim
        self.hidden_dim = hidden_dim
        self.encoder = nn.Sequential(*(ResidualMLP(hidden_dim, config.dropout) for _ in range(config.num_layers)))
        self.regression = nn.Linear(hidden_dim, config.horizon * config.out_channels)
        self.post_init()

    def _forecast(
        self,
        scaled_past: torch.Tensor,
        past_observed_mask: torch.Tensor,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        node_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """Scaled forecast ``(B, H, n, C_out)`` from the scaled history ``(B, L, n, C_in)``.

        The identities of time are read at the last history step ``past_time_features[:, -1]``
        (needed when ``if_tod`` or ``if_dow``); the paper's model does not look at
        ``future_time_features``, nor at ``past_observed_mask`` (the scaled history holds 0 where not
        observed).
        """
        config = self.config
        batch, _, nodes, _ = scaled_past.shape
        series = scaled_past.transpose(1, 2).reshape(batch, nodes, config.input_len * config.in_channels)
        parts = [self.series_embedding(series)]
        if config.if_node:
            identity = self.node_embedding if node_index is None else self.node_embedding[node_index]
            parts.append(identity.unsqueeze(0).expand(batch, -1, -1).to(parts[0].dtype))
        if config.if_tod or config.if_dow:
            calendar = check_time_features(
                past_time_features,
                model="STID",
                name="past_time_features",
                batch_size=batch,
                steps=config.input_len,
                steps_per_day=config.steps_per_day,
            )
            last = calendar[:, -1]
            if config.if_tod:
                parts.append(self.tod_embedding[last[:, 0]].unsqueeze(1).expand(-1, nodes, -1).to(parts[0].dtype))
            if config.if_dow:
                parts.append(self.dow_embedding[last[:, 1]].unsqueeze(1).expand(-1, nodes, -1).to(parts[0].dtype))
        hidden = self.encoder(torch.cat(parts, dim=-1))
        prediction = self.regression(hidden).reshape(batch, nodes, config.horizon, config.out_channels)
        return prediction.transpose(1, 2)
