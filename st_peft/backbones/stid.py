"""STID: Spatial-Temporal Identity (Shao et al., CIKM 2022, arXiv:2208.05233).

An MLP forecaster: the flattened history window of each node is embedded and concatenated
with learned identities of the node, of the time of day and of the day of week; residual
MLP layers encode the result and a linear head regresses the whole horizon at once.

Layout: the model receives ``past_values`` as ``(B, L, N, C_in)``, works on node tokens
``(B, N, hidden)`` (every ``nn.Linear`` acts on the last axis, the node axis is 1) and
forecasts ``(B, H, N, C_out)``.
"""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from st_peft.checks import check_time_features
from st_peft.forecasting import STForecaster
from st_peft.scaling import ScalingStatistics


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


class STID(
    STForecaster,
    PyTorchModelHubMixin,
    library_name="st-peft",
    tags=["spatio-temporal", "forecasting", "stid"],
    paper_url="https://arxiv.org/abs/2208.05233",
):
    """Spatial-Temporal Identity forecaster.

    Args:
        num_nodes: number of nodes ``N`` of the graph (one learned identity each).
        input_len: history length ``L``.
        horizon: forecast length ``H``.
        in_channels: input channels ``C_in`` of ``past_values``.
        out_channels: output channels ``C_out`` of the prediction.
        steps_per_day: number of time-of-day slots (288 for 5-minute data).
        embed_dim: width of the time-series embedding of the flattened window.
        node_dim: width of the node identity.
        tod_dim: width of the time-of-day identity.
        dow_dim: width of the day-of-week identity.
        num_layers: number of residual MLP layers in the encoder.
        dropout: dropout inside each residual MLP layer.
        if_node, if_tod, if_dow: use the node / time-of-day / day-of-week identities.
        scaling: the training span's statistics (``splits.model_kwargs()`` carries them; see
            :class:`~st_peft.scaling.STScaler`); None scales by the identity.
        loss: training loss, ``"mae"``, ``"mse"`` or ``"huber"``, in original units.

    The defaults are the paper's (32-wide embeddings, 3 layers, dropout 0.15).
    """

    def __init__(
        self,
        num_nodes: int,
        input_len: int,
        horizon: int,
        in_channels: int,
        out_channels: int,
        steps_per_day: int = 288,
        embed_dim: int = 32,
        node_dim: int = 32,
        tod_dim: int = 32,
        dow_dim: int = 32,
        num_layers: int = 3,
        dropout: float = 0.15,
        if_node: bool = True,
        if_tod: bool = True,
        if_dow: bool = True,
        scaling: ScalingStatistics | None = None,
        loss: str = "mae",
    ) -> None:
        super().__init__()
        self._init_forecaster(num_nodes, input_len, horizon, in_channels, out_channels, scaling, loss)
        self.steps_per_day = steps_per_day
        self.if_node, self.if_tod, self.if_dow = if_node, if_tod, if_dow

        self.series_embedding = nn.Linear(input_len * in_channels, embed_dim)
        hidden_dim = embed_dim
        if if_node:
            self.node_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_nodes, node_dim)))
            hidden_dim += node_dim
        if if_tod:
            self.tod_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(steps_per_day, tod_dim)))
            hidden_dim += tod_dim
        if if_dow:
            self.dow_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(7, dow_dim)))
            hidden_dim += dow_dim
        self.hidden_dim = hidden_dim
        self.encoder = nn.Sequential(*(ResidualMLP(hidden_dim, dropout) for _ in range(num_layers)))
        self.regression = nn.Linear(hidden_dim, horizon * out_channels)

    def _forecast(
        self,
        scaled_past: torch.Tensor,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        node_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """Scaled forecast ``(B, H, n, C_out)`` from the scaled history ``(B, L, n, C_in)``.

        The identities of time are read at the last history step ``past_time_features[:, -1]``
        (needed when ``if_tod`` or ``if_dow``); the paper's model does not look at
        ``future_time_features``.
        """
        batch, _, nodes, _ = scaled_past.shape
        series = scaled_past.transpose(1, 2).reshape(batch, nodes, self.input_len * self.in_channels)
        parts = [self.series_embedding(series)]
        if self.if_node:
            identity = self.node_embedding if node_index is None else self.node_embedding[node_index]
            parts.append(identity.unsqueeze(0).expand(batch, -1, -1).to(parts[0].dtype))
        if self.if_tod or self.if_dow:
            calendar = check_time_features(
                past_time_features,
                model="STID",
                name="past_time_features",
                batch_size=batch,
                steps=self.input_len,
                steps_per_day=self.steps_per_day,
            )
            last = calendar[:, -1]
            if self.if_tod:
                parts.append(self.tod_embedding[last[:, 0]].unsqueeze(1).expand(-1, nodes, -1).to(parts[0].dtype))
            if self.if_dow:
                parts.append(self.dow_embedding[last[:, 1]].unsqueeze(1).expand(-1, nodes, -1).to(parts[0].dtype))
        hidden = self.encoder(torch.cat(parts, dim=-1))
        prediction = self.regression(hidden).reshape(batch, nodes, self.horizon, self.out_channels)
        return prediction.transpose(1, 2)
