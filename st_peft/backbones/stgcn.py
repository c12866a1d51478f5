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

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from st_peft.backbones.graph_ops import ADJACENCY_CODERS, graph_buffer, scaled_laplacian
from st_peft.checks import AdjacencyLike, as_adjacency, with_calendar_channels
from st_peft.forecasting import STForecaster
from st_peft.scaling import ScalingStatistics


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
    then ``(B, N, T, Ks * C_in)``, nodes on axis 1.
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
        if type(self.theta) is nn.Linear:
            out = self._clenshaw(nodes_first, laplacian)
        else:
            out = self.theta(self._chebyshev_terms(nodes_first, laplacian))
        return F.relu(out.permute(0, 3, 1, 2) + self.align(hidden))

    def _chebyshev_terms(self, hidden: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        """``[T_0(L~) X, ..., T_{Ks-1}(L~) X]`` ``(B, N, T, Ks * C_in)`` for ``hidden`` ``(B, N, T, C_in)``."""
        terms = [hidden, _over_nodes(laplacian, hidden)][: self.order]
        while len(terms) < self.order:
            terms.append(2 * _over_nodes(laplacian, terms[-1]) - terms[-2])
        return torch.cat(terms, dim=-1)

    def _clenshaw(self, hidden: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        """``sum_k T_k(L~) X Theta_k + b`` ``(B, N, T, C_out)`` for ``hidden`` ``(B, N, T, C_in)``."""
        batch, nodes, steps, _ = hidden.shape
        # (C_out, Ks * C_in) -> (Ks * C_out, C_in): one matmul gives every X Theta_k
        weight = self.theta.weight.view(self.out_channels, self.order, self.in_channels).transpose(0, 1)
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
        return out + self.theta.bias


def _over_nodes(laplacian: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``L~ X`` for ``hidden`` ``(B, N, T, C)`` and ``laplacian`` ``(N, N)``."""
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


class STGCN(
    STForecaster,
    PyTorchModelHubMixin,
    library_name="st-peft",
    tags=["spatio-temporal", "forecasting", "stgcn"],
    paper_url="https://arxiv.org/abs/1709.04875",
    coders=ADJACENCY_CODERS,
):
    """STGCN (Chebyshev variant) forecaster.

    Args:
        num_nodes: number of nodes ``N``.
        input_len: history length ``L``; must exceed ``num_blocks * 2 * (kt - 1)``.
        horizon: forecast length ``H``.
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.
        adjacency: required ``(N, N)`` graph (binary or weighted, array, tensor or nested list);
            symmetrised and turned into the rescaled normalised Laplacian.
        block_channels: ``(temporal, spatial, output)`` widths of each ST-Conv block (paper: 64, 16, 64).
        num_blocks: number of ST-Conv blocks (2).
        kt: temporal kernel size (3).
        ks: Chebyshev kernel size, i.e. polynomial order + 1 (3).
        dropout: dropout after each ST-Conv block (0: the paper's code trains with keep_prob 1).
        calendar_channels: append time of day (fraction of the day) and day of week (``/ 7``)
            to the scaled history as two more input channels, as Graph WaveNet's reference data
            pipeline feeds the time of day; ``forward`` then needs ``past_time_features``. Off by default.
        steps_per_day: time-of-day slots per day (used with ``calendar_channels``).
        scaling: the training span's statistics (``splits.model_kwargs()`` carries them; see
            :class:`~st_peft.scaling.STScaler`); None scales by the identity.
        loss: training loss, ``"mae"``, ``"mse"`` or ``"huber"``, in original units.
    """

    def __init__(
        self,
        num_nodes: int,
        input_len: int,
        horizon: int,
        in_channels: int,
        out_channels: int,
        adjacency: AdjacencyLike | None = None,
        block_channels: Sequence[int] = (64, 16, 64),
        num_blocks: int = 2,
        kt: int = 3,
        ks: int = 3,
        dropout: float = 0.0,
        calendar_channels: bool = False,
        steps_per_day: int = 288,
        scaling: ScalingStatistics | None = None,
        loss: str = "mae",
    ) -> None:
        super().__init__()
        if adjacency is None:
            raise ValueError(f"STGCN needs an adjacency matrix of shape ({num_nodes}, {num_nodes}); got None")
        if len(block_channels) != 3:
            raise ValueError(
                f"block_channels must be (temporal, spatial, output) widths; got {list(block_channels)}"
            )
        remaining = input_len - num_blocks * 2 * (kt - 1)
        if remaining < 1:
            raise ValueError(
                f"STGCN with {num_blocks} ST-Conv blocks and kt={kt} consumes {num_blocks * 2 * (kt - 1)} time "
                f"steps, so input_len must be at least {num_blocks * 2 * (kt - 1) + 1}; got input_len={input_len}"
            )
        self._init_forecaster(num_nodes, input_len, horizon, in_channels, out_channels, scaling, loss)
        self.calendar_channels = calendar_channels
        self.steps_per_day = steps_per_day

        matrix = as_adjacency(adjacency, model="STGCN", num_nodes=num_nodes)
        self.register_buffer("adjacency", graph_buffer(matrix))
        self.register_buffer("laplacian", graph_buffer(scaled_laplacian(matrix)))

        widths = [in_channels + 2 * int(calendar_channels)] + [block_channels[-1]] * num_blocks
        self.blocks = nn.ModuleList(
            STConvBlock(widths[i], block_channels, num_nodes, kt, ks, dropout) for i in range(num_blocks)
        )
        self.output = OutputBlock(block_channels[-1], remaining, num_nodes, horizon * out_channels)

    def _forecast(
        self,
        scaled_past: torch.Tensor,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        node_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """Scaled forecast ``(B, H, n, C_out)`` from the scaled history ``(B, L, n, C_in)``.

        ``past_time_features`` (int64 ``(B, L, 2)``) is needed with ``calendar_channels`` and
        ignored otherwise, like ``future_time_features``. With ``node_index`` the Laplacian is
        restricted to those nodes (a sub-matrix of the full graph's operator).
        """
        x = scaled_past
        batch, _, nodes, _ = x.shape
        laplacian = self.laplacian if node_index is None else self.laplacian[node_index][:, node_index]
        if self.calendar_channels:
            x = with_calendar_channels(x, past_time_features, model="STGCN", input_len=self.input_len,
                                       steps_per_day=self.steps_per_day)
        hidden = x.permute(0, 3, 2, 1)
        for block in self.blocks:
            hidden = block(hidden, laplacian, node_index)
        out = self.output(hidden, node_index)
        out = out.reshape(batch, self.horizon, self.out_channels, nodes)
        return out.permute(0, 1, 3, 2)
