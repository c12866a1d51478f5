"""Layers of ST-LoRA: node-adaptive low-rank layers (NALL) and the node-specific predictor.

Every tensor that reaches the predictor is ``(batch, time, nodes, channels)``. A NALL computes
``W x + b + (alpha / r) * B diag(s_i) A x`` for the rows of node ``i``: ``A`` (``r x d_in``) and
``B`` (``d_out x r``, zero at initialisation) are shared by all nodes and ``s_i`` (``r`` numbers)
is the node's own factor, so ``A_i = diag(s_i) A`` is a per-node low-rank factor.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from st_peft.forecasting import ForecastContext, ScaledForecast
from st_peft.tuners.st_lora.config import STLoraConfig


def node_rows(table: torch.Tensor, nodes: int, index: torch.Tensor | None, owner: str) -> torch.Tensor:
    """Rows of a per-node table for the nodes of the current batch.

    Args:
        table: per-node values ``(N, k)``.
        nodes: number of nodes ``n`` in the current input.
        index: the batch's ``node_index`` ``(n,)``, or None for the whole graph.
        owner: name of the layer, for the error message.

    Returns:
        ``(n, k)``: ``table[index]`` when a node index of length ``n`` was given, else the whole
        table when ``n == N``.
    """
    if index is not None and len(index) == nodes:
        return table[index]
    if nodes == table.shape[0]:
        return table
    raise ValueError(
        f"{owner} was built for num_nodes={table.shape[0]} but its input has {nodes} nodes"
        + ("" if index is None else f" and node_index has {len(index)} entries")
    )


def features_first(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, T, n, C)`` to ``(T * C, B * n)``: time-major features in rows, batch-major nodes in columns.

    A view of ``tensor`` when its strides allow it, else a copy.
    """
    batch, steps, nodes, channels = tensor.shape
    return tensor.permute(1, 3, 0, 2).reshape(steps * channels, batch * nodes)


def check_wrappable(module: nn.Module, node_axis: int | None, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` unless a NALL can wrap ``module`` with this node axis.

    Args:
        module: the forecaster's layer.
        node_axis: axis of the nodes in the layer's input, or ``None`` to check the type only.
        name: the layer's name in the forecaster.
    """
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise TypeError(
            f"ST-LoRA cannot wrap target module {name!r} of type {type(module).__name__}: only nn.Linear, "
            "nn.Conv1d and nn.Conv2d are supported"
        )
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
        raise TypeError(
            f"ST-LoRA cannot wrap target module {name!r}: grouped convolutions (groups={module.groups}) are not "
            "supported"
        )
    if node_axis is None:
        return
    if isinstance(module, nn.Linear):
        if node_axis == -1:
            raise TypeError(f"ST-LoRA cannot wrap {name!r}: node_axis=-1 is the feature axis of an nn.Linear")
        return
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    valid = {2 + i for i in range(spatial)} | {-1 - i for i in range(spatial)}
    if node_axis not in valid:
        raise TypeError(
            f"ST-LoRA cannot wrap {name!r} ({type(module).__name__}) with node_axis={node_axis}: the node axis of "
            f"a convolution's input must be one of its spatial axes {sorted(valid)}"
        )


MERGE_REFUSAL = (
    "ST-LoRA adapters cannot be merged into the forecaster: a node-adaptive layer adds B diag(s_i) A x with a "
    "different s_i for every node i, while the wrapped layer applies one weight W to all nodes, so no single W' "
    "reproduces it; the node-specific predictor is a separate network, not a weight update. Use unload() to get "
    "the unchanged forecaster back, or keep the PeftModel for inference."
)


class STLoraLayer(BaseTunerLayer):
    """Base of every ST-LoRA tuner layer; ST-LoRA adapters cannot be merged into the forecaster."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refuse: see ``STLoraModel._check_merge_allowed`` for the reason."""
        raise ValueError(MERGE_REFUSAL)

    def unmerge(self) -> None:
        """Nothing is ever merged, so there is nothing to undo."""


class NodeAdaptiveLayer(nn.Module, STLoraLayer):
    """A NALL wrapped around a forecaster's own ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``.

    The node axis of the wrapped layer's input is given per adapter (``STLoraConfig.node_axis``);
    it must be a batch-like axis for ``nn.Linear`` (not the last one) and a spatial axis
    (``>= 2``) for convolutions, and the layer must keep its size.

    dtypes follow LoRA: a new adapter takes the wrapped layer's dtype (which PEFT's
    ``autocast_adapter_dtype`` then raises from float16 / bfloat16 to float32); the input is cast to
    the adapter's dtype for the low-rank path and the sum comes back in the wrapped layer's output
    dtype.

    The batch's ``node_index`` reaches it per call through PEFT's forward hooks
    (``STLoraModel._enable_peft_forward_hooks``), as LoRA's ``adapter_names`` do.

    Args:
        base_layer: the layer to wrap; it stays frozen and unchanged.
        name: the layer's name in the forecaster, for error messages.

    Attributes:
        in_features, out_features: the wrapped layer's input and output features (channels for a
            convolution).
    """

    adapter_layer_names = ("stl_down", "stl_up", "stl_node_scale")
    other_param_names = ("stl_dropout", "stl_scaling", "stl_node_axis")

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        check_wrappable(base_layer, None, name)
        self.base_layer = base_layer
        self.layer_name = name
        linear = isinstance(base_layer, nn.Linear)
        self.in_features = base_layer.in_features if linear else base_layer.in_channels
        self.out_features = base_layer.out_features if linear else base_layer.out_channels
        self.stl_down = nn.ModuleDict()
        self.stl_up = nn.ModuleDict()
        self.stl_node_scale = nn.ParameterDict()
        self.stl_dropout = nn.ModuleDict()
        self.stl_scaling: dict[str, float] = {}
        self.stl_node_axis: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    @property
    def feature_axis(self) -> int:
        """Axis of the features the wrapped layer mixes: last for ``nn.Linear``, 1 for convolutions."""
        return -1 if isinstance(self.base_layer, nn.Linear) else 1

    def update_layer(self, adapter_name: str, config: STLoraConfig) -> None:
        """Add (or re-initialise) the adapter ``adapter_name`` with ``A``, ``B = 0`` and ``s = 1``.

        With ``config.init_weights=False``, ``B`` keeps its random initialisation and ``s`` is drawn
        around one, so the new adapter changes the layer's output at once.
        """
        check_wrappable(self.base_layer, config.node_axis, self.layer_name)
        base = self.base_layer
        if isinstance(base, nn.Linear):
            down = nn.Linear(base.in_features, config.r, bias=False)
            up = nn.Linear(config.r, base.out_features, bias=False)
        else:
            conv = type(base)
            down = conv(
                base.in_channels,
                config.r,
                base.kernel_size,
                stride=base.stride,
                padding=base.padding,
                dilation=base.dilation,
                bias=False,
                padding_mode=base.padding_mode,
            )
            up = conv(config.r, base.out_channels, 1, bias=False)
        node_scale = torch.ones(config.num_nodes, config.r)
        if config.init_weights:
            nn.init.zeros_(up.weight)
        else:
            node_scale = node_scale + 0.1 * torch.randn_like(node_scale)
        self.stl_down[adapter_name] = down
        self.stl_up[adapter_name] = up
        self.stl_node_scale[adapter_name] = nn.Parameter(node_scale)
        self.stl_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.stl_scaling[adapter_name] = config.alpha / config.r
        self.stl_node_axis[adapter_name] = config.node_axis
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _node_scale(self, adapter_name: str, low: torch.Tensor, node_index: torch.Tensor | None) -> torch.Tensor:
        """Per-node scale of adapter ``adapter_name`` shaped to broadcast against ``low`` (the ``A`` output)."""
        axis = self.stl_node_axis[adapter_name] % low.dim()
        feature = self.feature_axis % low.dim()
        if axis == feature:
            raise ValueError(
                f"{self.layer_name!r}: node_axis={self.stl_node_axis[adapter_name]} is the feature axis of a "
                f"{low.dim()}-d input"
            )
        table = node_rows(
            self.stl_node_scale[adapter_name], low.shape[axis], node_index, f"ST-LoRA layer {self.layer_name!r}"
        )
        shape = [1] * low.dim()
        shape[axis], shape[feature] = table.shape
        return (table if axis < feature else table.t()).reshape(shape)

    def forward(self, x: torch.Tensor, *args: Any, node_index: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """``base_layer(x)`` plus the node-adaptive low-rank update of every active adapter; same shape.

        ``node_index`` (int64 ``(n,)``, or None for the whole graph) picks the rows of the per-node
        scales. The result has the dtype of ``base_layer(x)``.
        """
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.stl_down:
                continue
            down = self.stl_down[name]
            low = down(self.stl_dropout[name](self._cast_input_dtype(x, down.weight.dtype)))
            result = result + self.stl_scaling[name] * self.stl_up[name](low * self._node_scale(name, low, node_index))
        return result.to(result_dtype)

    def scaling_penalty(self, adapter_name: str) -> torch.Tensor:
        """Squared distance of the per-node scales from one, ``sum_i ||s_i - 1||^2`` (a scalar)."""
        return (self.stl_node_scale[adapter_name] - 1).pow(2).sum()


class NodeAdaptiveLinear(nn.Module):
    """A NALL of the predictor, with per-node scales generated from a node embedding.

    ``h -> W h + b + (alpha / r) * B diag(s_i) A dropout(h)`` with ``s_i = 1 + G^T e_i``; ``W, b, A``
    train, ``B`` and ``G`` start at zero (random too with ``init_weights=False``). Hidden states
    are features first, ``(dim, B * n)``
    with the rows ordered batch-major: the predictor's widths are tiny, and a matrix product
    whose long axis is the last one runs several times faster on the CPU than one whose output
    has only a few columns.
    """

    def __init__(self, dim: int, config: STLoraConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.down = nn.Linear(dim, config.r, bias=False)
        self.up = nn.Linear(config.r, dim, bias=False)
        generator = torch.zeros(config.node_embedding_dim, config.r)
        if config.init_weights:
            nn.init.zeros_(self.up.weight)
        else:
            generator = 0.1 * torch.randn_like(generator)
        self.generator = nn.Parameter(generator)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.alpha / config.r

    def node_scale(self, embedding: torch.Tensor) -> torch.Tensor:
        """Per-node scales ``(n, r)`` from node embeddings ``(n, d_e)``."""
        return 1 + embedding @ self.generator

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Map ``hidden`` ``(dim, B * n)`` with node embeddings ``(n, d_e)`` to ``(dim, B * n)``."""
        nodes = embedding.shape[0]
        low = self.down.weight @ self.dropout(hidden)
        low = (low.view(low.shape[0], -1, nodes) * self.node_scale(embedding).t()[:, None, :]).view(low.shape)
        out = torch.addmm(self.linear.bias[:, None], self.linear.weight, hidden)
        return torch.addmm(out, self.up.weight, low, alpha=self.scaling)


class PredictorBlock(nn.Module):
    """One block of the node-specific predictor, in the predictor's normalised space.

    From each node's history ``x`` and current prediction ``y``, residual NALL layers
    ``H_l = H_(l-1) + NALL_l(relu(H_(l-1)))`` compute a correction ``c``; the candidate is
    ``Z = y + c`` and a gate ``R = sigmoid(F([x, mean_h Z]))`` blends ``R * y + (1 - R) * Z``. The
    block returns the step from ``y`` to that blend, ``(1 - R) * c``: the correction's output layer
    starts at zero (unless ``init_weights=False``), so a new block's step is exactly zero.
    Like ``NodeAdaptiveLinear`` it works on features-first tensors ``(features, B * n)``.
    """

    def __init__(self, config: STLoraConfig) -> None:
        super().__init__()
        history = config.input_len * config.in_channels
        future = config.horizon * config.out_channels
        self.horizon, self.out_channels = config.horizon, config.out_channels
        self.input = nn.Linear(history + future, config.hidden_dim)
        self.layers = nn.ModuleList(NodeAdaptiveLinear(config.hidden_dim, config) for _ in range(config.num_nall_layers))
        self.act = nn.ReLU()
        self.output = nn.Linear(config.hidden_dim, future)
        if config.init_weights:
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)
        self.gate = nn.Linear(history + config.out_channels, future)

    def forward(self, history: torch.Tensor, prediction: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The step that refines ``prediction``.

        Args:
            history: each node's normalised history ``(L * C_in, B * n)``, time-major features.
            prediction: current normalised prediction ``(H * C_out, B * n)``, time-major features.
            embedding: node embeddings ``(n, d_e)``.

        Returns:
            ``(1 - R) * c`` ``(H * C_out, B * n)``: the refined prediction is ``prediction`` plus it.
        """
        # Two products on the weight's column blocks instead of one on a concatenation: the history is
        # a strided view of the batch, and concatenating it would copy it element by element.
        width = history.shape[0]
        hidden = torch.addmm(self.input.bias[:, None], self.input.weight[:, :width], history)
        hidden = torch.addmm(hidden, self.input.weight[:, width:], prediction)
        for layer in self.layers:
            hidden = hidden + layer(self.act(hidden), embedding)
        correction = torch.addmm(self.output.bias[:, None], self.output.weight, hidden)
        candidate_mean = (prediction + correction).view(self.horizon, self.out_channels, -1).mean(dim=0)
        gate = torch.addmm(self.gate.bias[:, None], self.gate.weight[:, :width], history)
        gate = torch.sigmoid(torch.addmm(gate, self.gate.weight[:, width:], candidate_mean))
        # R * y + (1 - R) * Z - y written as (1 - R) * (Z - y): equal in exact arithmetic, and exactly
        # zero while the correction is zero.
        return (1 - gate) * correction


class NodeSpecificPredictor(nn.Module):
    """The node-specific predictor of one adapter: a node embedding and stacked ``PredictorBlock``s.

    It works in a normalised space (see :mod:`st_peft.tuners.st_lora.space`) and returns a
    correction in that space, zero at initialisation.

    Args:
        config: the adapter's configuration (``num_nodes``, sizes, ``num_blocks``...).
    """

    def __init__(self, config: STLoraConfig) -> None:
        super().__init__()
        self.input_len, self.in_channels = config.input_len, config.in_channels
        self.horizon, self.out_channels = config.horizon, config.out_channels
        self.output_history_channels = config.output_history_channels
        self.node_embedding = nn.Parameter(torch.randn(config.num_nodes, config.node_embedding_dim))
        self.blocks = nn.ModuleList(PredictorBlock(config) for _ in range(config.num_blocks))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the predictor's weights, in which it computes."""
        return self.node_embedding.dtype

    def forward(self, history: torch.Tensor, prediction: torch.Tensor, node_index: torch.Tensor | None) -> torch.Tensor:
        """The correction ``(B, H, n, C_out)`` of the normalised ``prediction`` ``(B, H, n, C_out)``.

        Args:
            history: the normalised history ``(B, L, n, C_in)``, in the predictor's dtype.
            prediction: the forecaster's prediction, normalised, in the predictor's dtype.
            node_index: the batch's node indices ``(n,)``, or None for the whole graph.
        """
        if history.dim() != 4 or history.shape[1] != self.input_len or history.shape[3] != self.in_channels:
            raise ValueError(
                f"The ST-LoRA predictor was built for past_values of shape (batch, input_len={self.input_len}, "
                f"nodes, in_channels={self.in_channels}); got past_values.shape={tuple(history.shape)}"
            )
        expected = (history.shape[0], self.horizon, history.shape[2], self.out_channels)
        if tuple(prediction.shape) != expected:
            raise ValueError(
                f"The ST-LoRA predictor expects the forecaster's prediction of shape (batch, horizon, nodes, "
                f"out_channels)={expected}; got {tuple(prediction.shape)}"
            )
        batch, _, nodes, _ = history.shape
        embedding = node_rows(self.node_embedding, nodes, node_index, "The ST-LoRA predictor")
        history = features_first(history)
        current = features_first(prediction).contiguous()
        correction = None
        for block in self.blocks:
            step = block(history, current, embedding)
            current = current + step
            correction = step if correction is None else correction + step
        return correction.view(self.horizon, self.out_channels, batch, nodes).permute(2, 0, 3, 1)

    def scaling_penalty(self) -> torch.Tensor:
        """``sum_l sum_i ||s_i^(l) - 1||^2`` over every NALL of the predictor (a scalar)."""
        penalty = self.node_embedding.new_zeros(())
        for block in self.blocks:
            for layer in block.layers:
                penalty = penalty + (layer.node_scale(self.node_embedding) - 1).pow(2).sum()
        return penalty


class STLoraPredictorLayer(nn.Module, STLoraLayer):
    """The tuner layer that replaces a forecaster's output seam: the node-specific predictors of all adapters.

    Every st-peft forecaster passes its scaled forecast through ``forecast_seam``
    (:class:`~st_peft.forecasting.ForecastSeam`, an identity), with the scaled history and
    ``node_index`` as context; a user's own module gets that seam from
    :class:`~st_peft.tuners.st_lora.seamed.SeamedForecaster`. This layer wraps the seam. For each active adapter
    it refines the forecast in that scaled space, ``prediction + correction``, shifts the
    quantile forecasts by the same amount and adds the adapter's scaling penalty
    (``scaling_l2``) to ``aux_loss``; the forecaster then turns the result into original units
    and computes ``loss`` on it. A zero correction (every new adapter with ``init_weights=True``)
    returns the forecast bit for bit.

    The predictors' dtype follows the forecaster's weights, as a LoRA layer's follows its base
    layer (then PEFT's ``autocast_adapter_dtype`` raises float16 / bfloat16 to float32); they read
    their inputs cast to their own dtype, and the correction comes back in the forecast's dtype.

    Args:
        base_layer: the forecaster's seam.
        num_nodes: nodes ``N`` of the graph.

    Attributes:
        in_features: features per node the predictors read, ``L * C_in + H * C_out`` (history and
            forecast); 0 until the first adapter is added.
        out_features: features per node they return, ``H * C_out``.
    """

    adapter_layer_names = ("stl_heads",)
    other_param_names = ("stl_config",)

    def __init__(self, base_layer: nn.Module, num_nodes: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_nodes = num_nodes
        self.stl_heads = nn.ModuleDict()
        self.stl_config: dict[str, STLoraConfig] = {}
        self.in_features = self.out_features = 0
        self._disable_adapters = False
        self.merged_adapters = []
        self._forecaster_placement: tuple[torch.device | None, torch.dtype | None] = (None, None)

    def update_layer(
        self,
        adapter_name: str,
        config: STLoraConfig,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Add the adapter ``adapter_name``: its predictor (when ``num_blocks > 0``) and its config.

        Args:
            adapter_name: the adapter's name.
            config: its configuration.
            device, dtype: those of the forecaster's weights; the predictor is moved there (unless
                it was created on the meta device, to be loaded).
        """
        self._forecaster_placement = (device, dtype)
        if config.num_blocks > 0:
            self.stl_heads[adapter_name] = NodeSpecificPredictor(config)
            self._move_adapter_to_device_of_base_layer(adapter_name)
        self.stl_config[adapter_name] = config
        self.in_features = config.input_len * config.in_channels + config.horizon * config.out_channels
        self.out_features = config.horizon * config.out_channels
        self.set_adapter(self.active_adapters)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
        """The forecaster's device and dtype: the seam has no weights of its own."""
        return self._forecaster_placement

    def forward(
        self,
        forecast: ScaledForecast,
        context: ForecastContext,
        *,
        layer_penalties: dict[str, torch.Tensor] | None = None,
    ) -> ScaledForecast:
        """The forecast refined by every active adapter, in the forecaster's scaled space.

        Args:
            forecast: the forecaster's scaled forecast ``(B, H, n, C_out)`` (and quantiles).
            context: the scaled history ``(B, L, n, C_in)``, its mask and ``node_index``.
            layer_penalties: per adapter, the scaling penalty of its node-adaptive layers in the
                forecaster, given per call by ``STLoraModel._enable_peft_forward_hooks``.

        Returns:
            The refined forecast; ``aux_loss`` gains ``scaling_l2`` times each adapter's penalty.
        """
        result = self.base_layer(forecast, context)
        if self.disable_adapters:
            return result
        prediction, aux_loss = result.prediction, result.aux_loss
        shift = None
        for name in self.active_adapters:
            if name not in self.stl_config:
                continue
            if name in self.stl_heads:
                head = self.stl_heads[name]
                current = prediction if shift is None else prediction + shift
                correction = head(context.scaled_past.to(head.dtype), current.to(head.dtype),
                                  context.node_index).to(prediction.dtype)
                shift = correction if shift is None else shift + correction
            weight = self.stl_config[name].scaling_l2
            if weight > 0:
                terms = [] if layer_penalties is None or name not in layer_penalties else [layer_penalties[name]]
                if name in self.stl_heads:
                    terms.append(self.stl_heads[name].scaling_penalty())
                term = weight * torch.stack(terms).sum()
                aux_loss = term if aux_loss is None else aux_loss + term
        if shift is None:
            return ScaledForecast(prediction, result.quantiles, aux_loss)
        quantiles = None if result.quantiles is None else result.quantiles + shift.unsqueeze(-1)
        return ScaledForecast(prediction + shift, quantiles, aux_loss)
