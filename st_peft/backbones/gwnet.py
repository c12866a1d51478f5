"""Graph WaveNet (Wu et al., IJCAI 2019, arXiv:1906.00121).

Stacks of gated dilated causal convolutions over time (dilations 1, 2, 1, 2, ... with the
paper's 4 blocks of 2 layers) interleaved with diffusion graph convolutions over the
forward and backward random-walk transition matrices of the given graph and over a
self-adaptive adjacency ``softmax(relu(E1 E2^T))`` learned from node embeddings. Skip
connections from every layer feed two 1x1 output convolutions that emit the whole horizon.

Layout: ``x`` arrives as ``(B, L, N, C_in)`` and is moved to ``(B, C, N, T)`` so that
``nn.Conv2d`` with kernel ``(1, k)`` convolves along time and 1x1 convolutions mix channels
(the node axis is 2 inside the network); the head's ``(B, H * C_out, N, 1)`` is reshaped to
``(B, H, N, C_out)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from st_peft.backbones.configuration_backbones import GWNetConfig
from st_peft.backbones.graph_ops import graph_matrix, register_graph, transition_matrix
from st_peft.backbones.sparse_graph import (
    adjacency_values,
    over_nodes,
    register_sparse_graph,
    sparse_operator,
    transition_values,
    uses_sparse_graph,
)
from st_peft.checks import AdjacencyLike, with_calendar_channels
from st_peft.forecasting import STPreTrainedModel
from st_peft.scaling import STScaler


def diffuse(support: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """One diffusion step ``out[:, :, n] = sum_m support[n, m] * hidden[:, :, m]``.

    This is the paper's ``P X`` with a row-normalised ``P``: each node averages what its
    out-neighbours hold. (The authors' public code multiplies by ``P^T`` instead.) A sparse
    ``support`` is multiplied sparsely (``sparse_graph.over_nodes``), exact up to float rounding.

    Args:
        support: ``(N, N)`` row-normalised transition matrix, dense or sparse CSR.
        hidden: ``(B, C, N, T)``.

    Returns:
        ``(B, C, N, T)``.
    """
    if support.layout == torch.sparse_csr:
        return over_nodes(support, hidden, node_dim=2)
    return torch.einsum("nm,bcmt->bcnt", support, hidden)


class DiffusionGraphConv(nn.Module):
    """Diffusion convolution ``Z = X W_0 + sum_s sum_{k=1..K} P_s^k X W_{s,k}`` followed by dropout.

    The powers of every support are concatenated along channels and mixed by one 1x1
    convolution, as in the paper's code. Shapes: ``(B, C_in, N, T) -> (B, C_out, N, T)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, num_supports: int, order: int, dropout: float
    ) -> None:
        super().__init__()
        self.order = order
        self.mlp = nn.Conv2d((order * num_supports + 1) * in_channels, out_channels, kernel_size=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, supports: list[torch.Tensor]) -> torch.Tensor:
        """Convolve ``hidden`` ``(B, C_in, N, T)`` over each ``(N, N)`` support."""
        terms = [hidden]
        for support in supports:
            power = hidden
            for _ in range(self.order):
                power = diffuse(support, power)
                terms.append(power)
        return self.dropout(self.mlp(torch.cat(terms, dim=1)))


class GWNetLayer(nn.Module):
    """One Graph WaveNet layer: gated dilated causal TCN, skip output, graph conv, residual, batch norm.

    Shapes: ``(B, R, N, T) -> ((B, R, N, T - d (k - 1)), skip (B, S, N, T - d (k - 1)))``
    with ``R`` residual channels, ``S`` skip channels, dilation ``d`` and kernel size ``k``.
    A ``last`` layer feeds only the skip path and returns ``None`` as its output: the paper's
    code computes a graph convolution there whose result nothing reads, so its weights would
    never train.
    """

    def __init__(
        self,
        residual_channels: int,
        dilation_channels: int,
        skip_channels: int,
        kernel_size: int,
        dilation: int,
        num_supports: int,
        order: int,
        dropout: float,
        last: bool = False,
    ) -> None:
        super().__init__()
        self.filter_conv = nn.Conv2d(
            residual_channels, dilation_channels, (1, kernel_size), dilation=(1, dilation)
        )
        self.gate_conv = nn.Conv2d(
            residual_channels, dilation_channels, (1, kernel_size), dilation=(1, dilation)
        )
        self.skip_conv = nn.Conv2d(dilation_channels, skip_channels, kernel_size=1)
        self.last = last
        if not last:
            self.graph_conv = DiffusionGraphConv(
                dilation_channels, residual_channels, num_supports, order, dropout
            )
            self.norm = nn.BatchNorm2d(residual_channels)

    def forward(
        self, hidden: torch.Tensor, supports: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Return the layer output (``None`` for the last layer) and its skip contribution."""
        gated = torch.tanh(self.filter_conv(hidden)) * torch.sigmoid(self.gate_conv(hidden))
        skip = self.skip_conv(gated)
        if self.last:
            return None, skip
        out = self.graph_conv(gated, supports) + hidden[..., -gated.shape[-1] :]
        return self.norm(out), skip


class GWNet(STPreTrainedModel):
    """Graph WaveNet forecaster.

    Args:
        config: the sizes, calendar, scaling, loss and widths (:class:`GWNetConfig`); or ``None``
            with its fields as keyword arguments (``use_graph`` then follows ``adjacency``).
        adjacency: the ``(N, N)`` graph when ``config.use_graph`` (binary or weighted, array,
            tensor or nested list; ``adjacency[i, j]`` is the edge ``i -> j``). Its forward and
            backward transition matrices are diffusion supports; all three are buffers saved with
            the weights, so ``from_pretrained`` needs no graph.
        **fields: fields of :class:`GWNetConfig`, when ``config`` is None.

    Small graphs are held as dense ``(N, N)`` buffers ``adjacency``, ``forward_transition`` and
    ``backward_transition``. A sparse graph (``config.sparse_graph``, by default from
    ``sparse_graph.SPARSE_GRAPH_MIN_NODES`` nodes) is held as the edge list ``graph_index``
    ``(2, M)`` with ``adjacency_values``, ``forward_transition_values`` and
    ``backward_transition_values`` ``(M,)``, and diffuses by sparse products, which equal the dense
    ones up to float rounding. The adaptive adjacency is dense by nature: ``(n, n)`` over the
    batch's nodes.

    The history is left-padded with zeros up to the receptive field, as the paper's code does,
    so the last layer sees exactly one time step.
    """

    config_class = GWNetConfig
    base_model_prefix = "gwnet"

    def __init__(self, config: GWNetConfig | None = None, adjacency: AdjacencyLike | None = None,
                 **fields: Any) -> None:
        if config is None:
            config = GWNetConfig(**{"use_graph": adjacency is not None, **fields})
        super().__init__(config)
        sparse = config.use_graph and uses_sparse_graph(config)
        matrix = graph_matrix(adjacency, config.use_graph, model="GWNet", num_nodes=config.num_nodes,
                              keep_float_dtype=sparse)
        if config.calendar_channels and config.steps_per_day is None:
            raise ValueError("GWNet with calendar_channels needs steps_per_day, the time-of-day slots per day "
                             "(288 for 5-minute data, splits.steps_per_day)")
        # registered first, so a saved scaler of another graph is reported before any other mismatch
        self.scaler = STScaler(config.num_nodes, config.in_channels, config.out_channels, config.scaling,
                               model=type(self).__name__)
        # Each block of `layers` layers widens the receptive field by (k - 1)(1 + 2 + ... + 2^(layers-1)).
        per_block = (config.kernel_size - 1) * (2**config.layers - 1)
        blocks = config.blocks
        if blocks is None:
            blocks = max(1, math.ceil((config.input_len - 1) / per_block))
        self.blocks = blocks
        self.receptive_field = 1 + blocks * per_block
        if self.receptive_field < config.input_len:
            raise ValueError(
                f"GWNet with blocks={blocks}, layers={config.layers}, kernel_size={config.kernel_size} sees "
                f"{self.receptive_field} steps but input_len={config.input_len}; use blocks >= "
                f"{math.ceil((config.input_len - 1) / per_block)} or blocks=None"
            )

        self.graph_is_sparse = sparse
        if sparse:
            self.config.sparse_graph = True
            register_sparse_graph(self, self.config, matrix, {
                "adjacency": adjacency_values,
                "forward_transition": transition_values,
                "backward_transition": lambda graph, index: transition_values(graph, index, backward=True),
            })
        elif config.use_graph:
            self.config.sparse_graph = False
            register_graph(self, "adjacency", matrix, config.num_nodes)
            register_graph(self, "forward_transition", None if matrix is None else transition_matrix(matrix),
                           config.num_nodes)
            register_graph(self, "backward_transition", None if matrix is None else transition_matrix(matrix.T),
                           config.num_nodes)
        if config.adaptive_adjacency:
            self.source_embedding = nn.Parameter(torch.randn(config.num_nodes, config.adaptive_embed_dim))
            self.target_embedding = nn.Parameter(torch.randn(config.num_nodes, config.adaptive_embed_dim))
        num_supports = 2 * int(config.use_graph) + int(config.adaptive_adjacency)

        self.start_conv = nn.Conv2d(config.in_channels + 2 * int(config.calendar_channels), config.residual_channels,
                                    kernel_size=1)
        self.layers = nn.ModuleList(
            GWNetLayer(
                config.residual_channels,
                config.dilation_channels,
                config.skip_channels,
                config.kernel_size,
                dilation=2**i,
                num_supports=num_supports,
                order=config.diffusion_order,
                dropout=config.dropout,
                last=block == blocks - 1 and i == config.layers - 1,
            )
            for block in range(blocks)
            for i in range(config.layers)
        )
        self.end_conv_1 = nn.Conv2d(config.skip_channels, config.end_channels, kernel_size=1)
        self.end_conv_2 = nn.Conv2d(config.end_channels, config.horizon * config.out_channels, kernel_size=1)
        self.post_init()

    def adaptive_adjacency(self, node_index: torch.Tensor | None = None) -> torch.Tensor:
        """The self-adaptive adjacency ``softmax(relu(E1 E2^T))`` ``(N, N)``, rows summing to 1.

        With ``node_index`` ``(N_sub,)`` it is computed over those nodes only, ``(N_sub, N_sub)``.
        """
        if not self.config.adaptive_adjacency:
            raise ValueError("this GWNet was built with adaptive_adjacency=False")
        source, target = self.source_embedding, self.target_embedding
        if node_index is not None:
            source, target = source[node_index], target[node_index]
        return F.softmax(F.relu(source @ target.T), dim=1)

    def _forecast(
        self,
        scaled_past: torch.Tensor,
        past_observed_mask: torch.Tensor,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        node_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """Scaled forecast ``(B, H, n, C_out)`` from the scaled history ``(B, L, n, C_in)``.

        ``past_time_features`` (int64 ``(B, L, 2)``) is needed with ``calendar_channels`` and
        ignored otherwise, like ``future_time_features`` and ``past_observed_mask`` (the scaled history
        holds 0 where not observed). With ``node_index`` the supports are
        restricted to those nodes (sub-matrices of the full graph's operators, sparse ones too).
        """
        config = self.config
        x = scaled_past
        batch, _, nodes, _ = x.shape
        if self.graph_is_sparse:
            supports = [sparse_operator(self.graph_index, values, config.num_nodes, node_index)
                        for values in (self.forward_transition_values, self.backward_transition_values)]
        else:
            supports = [self.forward_transition, self.backward_transition] if config.use_graph else []
            if node_index is not None:
                supports = [support[node_index][:, node_index] for support in supports]
        if config.adaptive_adjacency:
            supports.append(self.adaptive_adjacency(node_index))

        if config.calendar_channels:
            x = with_calendar_channels(x, past_time_features, model="GWNet", input_len=config.input_len,
                                       steps_per_day=config.steps_per_day)
        hidden = x.permute(0, 3, 2, 1)
        hidden = F.pad(hidden, (self.receptive_field - config.input_len, 0))
        hidden = self.start_conv(hidden)
        skip = None
        for layer in self.layers:
            hidden, contribution = layer(hidden, supports)
            # Layers shorten time; earlier skips keep only the steps the later ones still cover.
            skip = contribution if skip is None else contribution + skip[..., -contribution.shape[-1] :]
        out = self.end_conv_2(F.relu(self.end_conv_1(F.relu(skip))))
        out = out.reshape(batch, config.horizon, config.out_channels, nodes)
        return out.permute(0, 1, 3, 2)
