"""STGCN: Spatio-Temporal Graph Convolutional Networks (Yu et al., IJCAI 2018, arXiv:1709.04875).

Two ST-Conv "sandwich" blocks, each a gated temporal convolution (GLU), a Chebyshev graph
convolution (order ``Ks - 1``) on the rescaled Laplacian, a second temporal convolution and
a layer norm over (nodes, channels), then an output block (temporal GLU convolution over
the remaining steps, layer norm, sigmoid 1x1 temporal convolution, 1x1 fully connected
layer) that emits the whole horizon at once.

Layout: the scaled history arrives as ``(B, L, N, C_in)`` and is moved to ``(B, C, N, T)`` so that
``nn.Conv2d`` with kernel ``(1, Kt)`` convolves along time without padding (each temporal
convolution shortens ``T`` by ``Kt - 1``; the node axis is 2 inside the network); the
head's ``(B, H * C_out, N, 1)`` is reshaped to ``(B, H, N, C_out)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from st_peft.backbones.configuration_backbones import STGCNConfig
from st_peft.backbones.graph_ops import graph_matrix, register_graph, scaled_laplacian
from st_peft.backbones.sparse_graph import (
    adjacency_values,
    over_nodes,
    register_sparse_graph,
    scaled_laplacian_values,
    sparse_operator,
    uses_sparse_graph,
)
from st_peft.checks import AdjacencyLike, with_calendar_channels
from st_peft.forecasting import STPreTrainedModel
from st_peft.scaling import STScaler


class ChannelAlign(nn.Module):
    """Residual path between widths: 1x1 conv when narrowing, zero channels when widening, else identity.

    Shapes: ``(B, C_in, N, T) -> (B, C_out, N, T)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels > out_channels else None
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map ``hidden`` ``(B, C_in, N, T)`` to ``C_out`` channels."""
        if self.conv is not None:
            return self.conv(hidden)
        return F.pad(hidden, (0, 0, 0, 0, 0, self.out_channels - hidden.shape[1]))


class TemporalConv(nn.Module):
    """Temporal convolution of kernel ``Kt`` along time with an activation.

    ``glu``: ``(P + residual) * sigmoid(Q)`` where the convolution outputs ``[P, Q]``;
    ``relu``: ``relu(conv + residual)``; ``sigmoid``: ``sigmoid(conv)`` (as in the paper's code).
    Shapes: ``(B, C_in, N, T) -> (B, C_out, N, T - Kt + 1)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, activation: str) -> None:
        super().__init__()
        if activation not in ("glu", "relu", "sigmoid"):
            raise ValueError(f"activation must be 'glu', 'relu' or 'sigmoid'; got {activation!r}")
        self.activation = activation
        self.out_channels = out_channels
        width = 2 * out_channels if activation == "glu" else out_channels
        self.conv = nn.Conv2d(in_channels, width, kernel_size=(1, kernel_size))
        self.align = ChannelAlign(in_channels, out_channels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Convolve ``hidden`` ``(B, C_in, N, T)`` along time."""
        out = self.conv(hidden)
        if self.activation == "sigmoid":
            return torch.sigmoid(out)
        residual = self.align(hidden)[..., -out.shape[-1] :]
        if self.activation == "glu":
            return (out[:, : self.out_channels] + residual) * torch.sigmoid(out[:, self.out_channels :])
        return F.relu(out + residual)


class ChebGraphConv(nn.Module):
    """Chebyshev graph convolution ``relu(sum_{k<Ks} T_k(L~) X Theta_k + b + residual)``.

    ``theta`` keeps the paper's layout: an ``nn.Linear`` from the concatenated Chebyshev terms
    ``[T_0(L~) X, ..., T_{Ks-1}(L~) X]`` (``Ks * C_in`` features per node and step) to ``C_out``.

    While ``theta`` is that plain ``nn.Linear``, its weight is the whole map, and the layer sums
    the series the fast way: channel mixing and node mixing commute, so each ``X Theta_k`` is
    formed first (``C_out`` channels instead of ``C_in``, a quarter of the work in the paper's
    64 -> 16 block) and summed by Clenshaw's recurrence ``b_k = X Theta_k + 2 L~ b_{k+1} - b_{k+2}``,
    ``sum = X Theta_0 + L~ b_1 - b_2``. When anything else stands in ``theta``'s place (a PEFT
    layer wrapping it, whose update may differ per node), reading the weight would bypass it, so
    the layer is called on the Chebyshev terms of the paper's recurrence instead; its input is
    then ``(B, N, T, Ks * C_in)``, nodes on axis 1. A PEFT layer whose adapters are disabled (and
    not merged) computes its base layer alone, so that base layer is summed the fast way, and
    ``disable_adapter()`` gives the plain forecaster's output bit for bit.
    Shapes: ``(B, C_in, N, T) -> (B, C_out, N, T)``.
    """

    def __init__(self, in_channels: int, out_channels: int, order: int) -> None:
        super().__init__()
        self.order = order
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.theta = nn.Linear(order * in_channels, out_channels)
        self.align = ChannelAlign(in_channels, out_channels)

    def forward(self, hidden: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        """Convolve ``hidden`` ``(B, C_in, N, T)`` over the ``(N, N)`` rescaled Laplacian."""
        nodes_first = hidden.permute(0, 2, 3, 1)
        whole_map = _whole_linear_map(self.theta)
        if whole_map is not None:
            out = self._clenshaw(nodes_first, laplacian, whole_map)
        else:
            out = self.theta(self._chebyshev_terms(nodes_first, laplacian))
        return F.relu(out.permute(0, 3, 1, 2) + self.align(hidden))

    def _chebyshev_terms(self, hidden: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        """``[T_0(L~) X, ..., T_{Ks-1}(L~) X]`` ``(B, N, T, Ks * C_in)`` for ``hidden`` ``(B, N, T, C_in)``."""
        terms = [hidden, _over_nodes(laplacian, hidden)][: self.order]
        while len(terms) < self.order:
            terms.append(2 * _over_nodes(laplacian, terms[-1]) - terms[-2])
        return torch.cat(terms, dim=-1)

    def _clenshaw(self, hidden: torch.Tensor, laplacian: torch.Tensor, theta: nn.Linear) -> torch.Tensor:
        """``sum_k T_k(L~) X Theta_k + b`` ``(B, N, T, C_out)`` for ``hidden`` ``(B, N, T, C_in)``."""
        batch, nodes, steps, _ = hidden.shape
        # (C_out, Ks * C_in) -> (Ks * C_out, C_in): one matmul gives every X Theta_k
        weight = theta.weight.view(self.out_channels, self.order, self.in_channels).transpose(0, 1)
        mixed = F.linear(hidden, weight.reshape(-1, self.in_channels))
        terms = mixed.reshape(batch, nodes, steps * self.order * self.out_channels)
        terms = terms.view(batch, nodes, steps, self.order, self.out_channels).unbind(dim=3)
        later = earlier = None
        for k in range(self.order - 1, 0, -1):
            current = terms[k]
            if later is not None:
                current = current + 2 * _over_nodes(laplacian, later)
            if earlier is not None:
                current = current - earlier
            later, earlier = current, later
        out = terms[0]
        if later is not None:
            out = out + _over_nodes(laplacian, later)
        if earlier is not None:
            out = out - earlier
        return out + theta.bias


def _whole_linear_map(theta: nn.Module) -> nn.Linear | None:
    """The plain ``nn.Linear`` that is ``theta``'s whole map in this call, or None.

    That is ``theta`` itself, or the base layer of a PEFT layer whose adapters are disabled and
    unmerged (peft's layers then return ``base_layer(x)``; a merged one must unmerge first, so it
    is called). Anything else may change the map per node and must be called.
    """
    if isinstance(theta, BaseTunerLayer) and theta.disable_adapters and not theta.merged:
        theta = theta.get_base_layer()
    return theta if type(theta) is nn.Linear else None


def _over_nodes(laplacian: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``L~ X`` for ``hidden`` ``(B, N, T, C)`` and ``laplacian`` ``(N, N)``, dense or sparse CSR (whose
    product equals the dense one up to float rounding)."""
    if laplacian.layout == torch.sparse_csr:
        return over_nodes(laplacian, hidden, node_dim=1)
    batch, nodes, steps, channels = hidden.shape
    return torch.matmul(laplacian, hidden.reshape(batch, nodes, steps * channels)).view(batch, nodes, steps, channels)


class NodeChannelNorm(nn.Module):
    """Layer norm over (nodes, channels) jointly at each time step, with per-(node, channel) affine.

    Shapes: ``(B, C, N, T) -> (B, C, N, T)``; with ``node_index`` the affine parameters of
    those nodes are used.
    """

    def __init__(self, num_nodes: int, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_nodes, channels))
        self.bias = nn.Parameter(torch.zeros(num_nodes, channels))

    def forward(self, hidden: torch.Tensor, node_index: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise ``hidden`` ``(B, C, N, T)``."""
        weight, bias = self.weight, self.bias
        if node_index is not None:
            weight, bias = weight[node_index], bias[node_index]
        moved = hidden.permute(0, 3, 2, 1)
        # eps as in the paper's code, which adds 1e-6 to the variance.
        return F.layer_norm(moved, tuple(weight.shape), weight, bias, eps=1e-6).permute(0, 3, 2, 1)


class STConvBlock(nn.Module):
    """ST-Conv block: temporal GLU conv -> Chebyshev graph conv -> temporal ReLU conv -> layer norm -> dropout.

    Shapes: ``(B, C_in, N, T) -> (B, C_out, N, T - 2 (Kt - 1))`` with
    ``channels = (C_temporal, C_spatial, C_out)``.
    """

    def __init__(
        self, in_channels: int, channels: Sequence[int], num_nodes: int, kt: int, ks: int, dropout: float
    ) -> None:
        super().__init__()
        temporal, spatial, out = channels
        self.temporal_in = TemporalConv(in_channels, temporal, kt, "glu")
        self.graph_conv = ChebGraphConv(temporal, spatial, ks)
        self.temporal_out = TemporalConv(spatial, out, kt, "relu")
        self.norm = NodeChannelNorm(num_nodes, out)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, hidden: torch.Tensor, laplacian: torch.Tensor, node_index: torch.Tensor | None
    ) -> torch.Tensor:
        """Apply the block to ``hidden`` ``(B, C_in, N, T)``."""
        hidden = self.temporal_out(self.graph_conv(self.temporal_in(hidden), laplacian))
        return self.dropout(self.norm(hidden, node_index))


class OutputBlock(nn.Module):
    """Temporal GLU conv over all ``T`` remaining steps -> layer norm -> sigmoid 1x1 conv -> 1x1 linear.

    Shapes: ``(B, C, N, T) -> (B, outputs, N, 1)``.
    """

    def __init__(self, channels: int, time_steps: int, num_nodes: int, outputs: int) -> None:
        super().__init__()
        self.temporal = TemporalConv(channels, channels, time_steps, "glu")
        self.norm = NodeChannelNorm(num_nodes, channels)
        self.gate = TemporalConv(channels, channels, 1, "sigmoid")
        self.fc = nn.Conv2d(channels, outputs, kernel_size=1)

    def forward(self, hidden: torch.Tensor, node_index: torch.Tensor | None) -> torch.Tensor:
        """Map ``hidden`` ``(B, C, N, T)`` to ``(B, outputs, N, 1)``."""
        return self.fc(self.gate(self.norm(self.temporal(hidden), node_index)))


class STGCN(STPreTrainedModel):
    """STGCN (Chebyshev variant) forecaster.

    Args:
        config: the sizes, calendar, scaling, loss and widths (:class:`STGCNConfig`); or ``None``
            with its fields as keyword arguments.
        adjacency: the ``(N, N)`` graph (binary or weighted, array, tensor or nested list),
            symmetrised and turned into the rescaled normalised Laplacian; both are buffers saved
            with the weights, so ``from_pretrained`` needs no graph.
        **fields: fields of :class:`STGCNConfig`, when ``config`` is None.

    Small graphs are held as dense ``(N, N)`` buffers ``adjacency`` and ``laplacian``, whose
    ``lambda_max`` comes from a dense ``eigvalsh`` (exact). A sparse graph (``config.sparse_graph``,
    by default from ``sparse_graph.SPARSE_GRAPH_MIN_NODES`` nodes) is held as the edge list
    ``graph_index`` ``(2, M)`` with ``adjacency_values`` and ``laplacian_values`` ``(M,)``; its
    ``lambda_max`` comes from Lanczos iterations (approximate, to a relative
    ``sparse_graph.EIGENVALUE_TOLERANCE``) and its Chebyshev terms from sparse products (exact up to
    float rounding), so that the model forms no ``(N, N)`` matrix of its own.
    """

    config_class = STGCNConfig
    base_model_prefix = "stgcn"

    def __init__(self, config: STGCNConfig | None = None, adjacency: AdjacencyLike | None = None,
                 **fields: Any) -> None:
        config = STGCNConfig(**fields) if config is None else config
        super().__init__(config)
        sparse = uses_sparse_graph(config)
        matrix = graph_matrix(adjacency, True, model="STGCN", num_nodes=config.num_nodes,
                              keep_float_dtype=sparse)
        if config.calendar_channels and config.steps_per_day is None:
            raise ValueError("STGCN with calendar_channels needs steps_per_day, the time-of-day slots per day "
                             "(288 for 5-minute data, splits.steps_per_day)")
        # registered first, so a saved scaler of another graph is reported before any other mismatch
        self.scaler = STScaler(config.num_nodes, config.in_channels, config.out_channels, config.scaling,
                               model=type(self).__name__)
        self.graph_is_sparse = self.config.sparse_graph = sparse
        if sparse:
            register_sparse_graph(self, self.config, matrix,
                                  {"adjacency": adjacency_values, "laplacian": scaled_laplacian_values})
        else:
            register_graph(self, "adjacency", matrix, config.num_nodes)
            register_graph(self, "laplacian", None if matrix is None else scaled_laplacian(matrix),
                           config.num_nodes)

        block_channels = list(config.block_channels)
        remaining = config.input_len - config.num_blocks * 2 * (config.kt - 1)
        widths = [config.in_channels + 2 * int(config.calendar_channels)] + [block_channels[-1]] * config.num_blocks
        self.blocks = nn.ModuleList(
            STConvBlock(widths[i], block_channels, config.num_nodes, config.kt, config.ks, config.dropout)
            for i in range(config.num_blocks)
        )
        self.output = OutputBlock(block_channels[-1], remaining, config.num_nodes,
                                  config.horizon * config.out_channels)
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

        ``past_time_features`` (int64 ``(B, L, 2)``) is needed with ``calendar_channels`` and
        ignored otherwise, like ``future_time_features`` and ``past_observed_mask`` (the scaled history
        holds 0 where not observed). With ``node_index`` the Laplacian is
        restricted to those nodes (a sub-matrix of the full graph's operator, sparse or dense).
        """
        config = self.config
        x = scaled_past
        batch, _, nodes, _ = x.shape
        if self.graph_is_sparse:
            laplacian = sparse_operator(self.graph_index, self.laplacian_values, config.num_nodes, node_index)
        else:
            laplacian = self.laplacian if node_index is None else self.laplacian[node_index][:, node_index]
        if config.calendar_channels:
            x = with_calendar_channels(x, past_time_features, model="STGCN", input_len=config.input_len,
                                       steps_per_day=config.steps_per_day)
        hidden = x.permute(0, 3, 2, 1)
        for block in self.blocks:
            hidden = block(hidden, laplacian, node_index)
        out = self.output(hidden, node_index)
        out = out.reshape(batch, config.horizon, config.out_channels, nodes)
        return out.permute(0, 1, 3, 2)
