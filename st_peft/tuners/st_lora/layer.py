"""Layers of ST-LoRA: node-adaptive low-rank layers (NALL) and the node-specific predictor.

Every tensor that reaches the predictor is ``(batch, time, nodes, channels)``. A NALL computes
``W x + b + (alpha / r) * B diag(s_i) A x`` for the rows of node ``i``: ``A`` (``r x d_in``) and
``B`` (``d_out x r``, zero at initialisation) are shared by all nodes and ``s_i`` (``r`` numbers)
is the node's own factor, so ``A_i = diag(s_i) A`` is a per-node low-rank factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from st_peft.checks import check_future_values, check_observed_mask, check_past_values
from st_peft.forecasting import forecast_loss, inputs_for
from st_peft.losses import get_loss
from st_peft.outputs import ForecastOutput, prediction_of
from st_peft.tuners.st_lora.config import STLoraConfig
from st_peft.tuners.st_lora.space import (
    PredictorSpace,
    forecaster_scaler,
    history_channels_of,
    scaler_space,
    window_space,
)


class ForwardState:
    """What one forward pass of an adapted model shares between its ST-LoRA layers.

    Attributes:
        index: int64 ``(N_sub,)`` node indices passed as ``node_index`` to the forecaster, or ``None``
            when the batch covers the whole graph.
        called: names of the NALL-wrapped layers that ran during this forward pass, while the
            predictor layer checks that every wrapped layer is called; ``None`` when it does not.
    """

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.called: set[str] | None = None


def node_rows(table: torch.Tensor, nodes: int, selection: ForwardState, owner: str) -> torch.Tensor:
    """Rows of a per-node table for the nodes of the current batch.

    Args:
        table: per-node values ``(N, k)``.
        nodes: number of nodes ``n`` in the current input.
        selection: the batch's node selection.
        owner: name of the layer, for the error message.

    Returns:
        ``(n, k)``: ``table[selection.index]`` when a node index of length ``n`` was given, else
        the whole table when ``n == N``.
    """
    index = selection.index
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

    Args:
        base_layer: the layer to wrap; it stays frozen and unchanged.
        selection: the adapted model's forward state.
        name: the layer's name in the forecaster, for error messages.

    Attributes:
        in_features, out_features: the wrapped layer's input and output features (channels for a
            convolution).
    """

    adapter_layer_names = ("stlora_A", "stlora_B", "stlora_node_scale")
    other_param_names = ("stlora_dropout", "stlora_scaling", "stlora_node_axis")

    def __init__(self, base_layer: nn.Module, selection: ForwardState, name: str) -> None:
        super().__init__()
        check_wrappable(base_layer, None, name)
        self.base_layer = base_layer
        self.selection = selection
        self.layer_name = name
        linear = isinstance(base_layer, nn.Linear)
        self.in_features = base_layer.in_features if linear else base_layer.in_channels
        self.out_features = base_layer.out_features if linear else base_layer.out_channels
        self.stlora_A = nn.ModuleDict()
        self.stlora_B = nn.ModuleDict()
        self.stlora_node_scale = nn.ParameterDict()
        self.stlora_dropout = nn.ModuleDict()
        self.stlora_scaling: dict[str, float] = {}
        self.stlora_node_axis: dict[str, int] = {}
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
        self.stlora_A[adapter_name] = down
        self.stlora_B[adapter_name] = up
        self.stlora_node_scale[adapter_name] = nn.Parameter(node_scale)
        self.stlora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.stlora_scaling[adapter_name] = config.alpha / config.r
        self.stlora_node_axis[adapter_name] = config.node_axis
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _node_scale(self, adapter_name: str, low: torch.Tensor) -> torch.Tensor:
        """Per-node scale of adapter ``adapter_name`` shaped to broadcast against ``low`` (the ``A`` output)."""
        axis = self.stlora_node_axis[adapter_name] % low.dim()
        feature = self.feature_axis % low.dim()
        if axis == feature:
            raise ValueError(
                f"{self.layer_name!r}: node_axis={self.stlora_node_axis[adapter_name]} is the feature axis of a "
                f"{low.dim()}-d input"
            )
        table = node_rows(
            self.stlora_node_scale[adapter_name], low.shape[axis], self.selection, f"ST-LoRA layer {self.layer_name!r}"
        )
        shape = [1] * low.dim()
        shape[axis], shape[feature] = table.shape
        return (table if axis < feature else table.t()).reshape(shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer(x)`` plus the node-adaptive low-rank update of every active adapter; same shape.

        The result has the dtype of ``base_layer(x)``.
        """
        result = self.base_layer(x, *args, **kwargs)
        if self.selection.called is not None:
            self.selection.called.add(self.layer_name)
        if self.disable_adapters:
            return result
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.stlora_A:
                continue
            down = self.stlora_A[name]
            low = down(self.stlora_dropout[name](self._cast_input_dtype(x, down.weight.dtype)))
            result = result + self.stlora_scaling[name] * self.stlora_B[name](low * self._node_scale(name, low))
        return result.to(result_dtype)

    def scaling_penalty(self, adapter_name: str) -> torch.Tensor:
        """Squared distance of the per-node scales from one, ``sum_i ||s_i - 1||^2`` (a scalar)."""
        return (self.stlora_node_scale[adapter_name] - 1).pow(2).sum()


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
        self.lora_A = nn.Linear(dim, config.r, bias=False)
        self.lora_B = nn.Linear(config.r, dim, bias=False)
        generator = torch.zeros(config.node_embedding_dim, config.r)
        if config.init_weights:
            nn.init.zeros_(self.lora_B.weight)
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
        low = self.lora_A.weight @ self.dropout(hidden)
        low = (low.view(low.shape[0], -1, nodes) * self.node_scale(embedding).t()[:, None, :]).view(low.shape)
        out = torch.addmm(self.linear.bias[:, None], self.linear.weight, hidden)
        return torch.addmm(out, self.lora_B.weight, low, alpha=self.scaling)


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

    def forward(self, history: torch.Tensor, prediction: torch.Tensor, selection: ForwardState) -> torch.Tensor:
        """The correction ``(B, H, n, C_out)`` of the normalised ``prediction`` ``(B, H, n, C_out)``.

        Args:
            history: the normalised history ``(B, L, n, C_in)``, in the predictor's dtype.
            prediction: the forecaster's prediction, normalised, in the predictor's dtype.
            selection: the forward pass's state (its node selection).
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
        embedding = node_rows(self.node_embedding, nodes, selection, "The ST-LoRA predictor")
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


@dataclass
class CallInputs:
    """What the pre-hook keeps of one forward call for the forward hook.

    Attributes:
        past_values: history ``(B, L, n, C_in)`` in original units.
        past_observed_mask: bool like ``past_values``.
        node_index: int64 ``(n,)`` or None.
        future_values: targets ``(B, H, n, C_out)`` or None; the forecaster does not see them.
        future_observed_mask: bool like ``future_values``, or None.
    """

    past_values: torch.Tensor
    past_observed_mask: torch.Tensor
    node_index: torch.Tensor | None
    future_values: torch.Tensor | None
    future_observed_mask: torch.Tensor | None


class STLoraPredictorLayer(nn.Module, STLoraLayer):
    """Holds the node-specific predictors of all adapters and applies the active ones to the forecaster.

    It is installed as a child of the forecaster's root module and hooks the root's forward:

    - the pre-hook refuses the argument names of st-peft 0.0, checks ``past_values`` (keyword or
      first positional) against the adapters, keeps ``past_observed_mask``, ``node_index`` and
      the targets ``future_values`` / ``future_observed_mask`` (taken out of the call), and passes
      the forecaster only the keys its forward accepts (``st_peft.forecasting.inputs_for``);
    - the forward hook refines the forecaster's prediction ``(B, H, n, C_out)`` (original units)
      in the space of :mod:`st_peft.tuners.st_lora.space`, ``prediction + scale * correction``,
      and returns a ``ForecastOutput``: the refined prediction, quantiles shifted by the same
      amount, the space's ``loc`` / ``scale``, ``aux_loss`` (the forecaster's plus the scaling
      penalty) and, given targets, ``loss``: the forecaster's ``loss_fn`` (masked MAE when it has
      none) of the refined prediction, plus ``aux_loss``.

    With adapters disabled, or with no adapter active, the forecaster runs on the keys it accepts
    (targets included) and its output is returned untouched.

    No inert targets: in the first forward pass after an adapter is added or the active adapters
    change, the hooks record which NALL-wrapped layers run, and a wrapped layer of an active
    adapter that did not run while the forecaster did is refused by name (a forecaster that
    reads the layer's weight instead of calling it would leave the adapter without effect and
    without gradient).

    The predictors' dtype follows the forecaster's weights, as a LoRA layer's follows its base
    layer (then PEFT's ``autocast_adapter_dtype`` raises float16 / bfloat16 to float32); they read
    their inputs cast to their own dtype, and the correction comes back in the forecast's dtype.

    Args:
        num_nodes: nodes ``N`` of the graph.

    Attributes:
        in_features: features per node the predictors read, ``L * C_in + H * C_out`` (history and
            forecast); 0 until the first adapter is added.
        out_features: features per node they return, ``H * C_out``.
    """

    adapter_layer_names = ("stlora_heads",)
    other_param_names = ("stlora_config",)

    def __init__(self, num_nodes: int) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.selection = ForwardState()
        self.stlora_heads = nn.ModuleDict()
        self.stlora_config: dict[str, STLoraConfig] = {}
        self.in_features = self.out_features = 0
        self._disable_adapters = False
        self.merged_adapters = []
        self._hook_handles: list[Any] = []
        self._call: CallInputs | None = None
        self._forecaster_placement: tuple[torch.device | None, torch.dtype | None] = (None, None)
        self._calls_checked = False

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
            self.stlora_heads[adapter_name] = NodeSpecificPredictor(config)
            self._move_adapter_to_device_of_base_layer(adapter_name)
        self.stlora_config[adapter_name] = config
        self.in_features = config.input_len * config.in_channels + config.horizon * config.out_channels
        self.out_features = config.horizon * config.out_channels
        self._calls_checked = False
        self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names`` (PEFT's rule); the next forward pass checks that their layers run."""
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._calls_checked = False

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
        """The forecaster's device and dtype: the predictor's counterpart of a LoRA layer's base layer."""
        return self._forecaster_placement

    def attach(self, model: nn.Module) -> None:
        """Hook the forward of the forecaster ``model`` (its root module)."""
        self._hook_handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]

    def detach(self) -> None:
        """Remove the hooks; the forecaster's forward is its own again."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def _active(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [name for name in self.active_adapters if name in self.stlora_config]

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        model = type(module).__name__
        self.selection.index = kwargs.get("node_index")
        self._call = None
        batch = dict(kwargs)
        active = self._active()
        self.selection.called = set() if active and not self._calls_checked else None
        if active:
            past_values = args[0] if args else kwargs.get("past_values")
            if past_values is None:
                raise TypeError(
                    f"{model} with an ST-LoRA adapter needs the history past_values (B, L, N, C_in); got the "
                    f"arguments {sorted(kwargs)}"
                )
            for name in active:
                config = self.stlora_config[name]
                check_past_values(past_values, model=f"The ST-LoRA adapter {name!r}", num_nodes=self.num_nodes,
                                  input_len=config.input_len, in_channels=config.in_channels,
                                  node_index=self.selection.index)
            mask = check_observed_mask(kwargs.get("past_observed_mask"), past_values, model=model,
                                       name="past_observed_mask", values_name="past_values")
            # the targets are for the loss of the refined forecast; the forecaster's own would be wasted
            self._call = CallInputs(past_values=past_values, past_observed_mask=mask,
                                    node_index=self.selection.index,
                                    future_values=batch.pop("future_values", None),
                                    future_observed_mask=batch.pop("future_observed_mask", None))
        return args, inputs_for(module, batch)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call, self._call = self._call, None
        active = self._active()
        called, self.selection.called = self.selection.called, None
        if called is not None:
            self._check_wrapped_layers_ran(module, active, called)
        if not active:
            return output
        model = type(module).__name__
        if not isinstance(output, (torch.Tensor, ForecastOutput)):
            raise TypeError(
                f"ST-LoRA needs the forecaster to return a tensor (B, H, N, C_out) or a ForecastOutput; "
                f"{model} returned {type(output).__name__}"
            )
        prediction = prediction_of(output)
        loc, scale = (None, None) if isinstance(output, torch.Tensor) else (output.loc, output.scale)
        shift = penalty = None
        for name in active:
            if name in self.stlora_heads:
                head = self.stlora_heads[name]
                refined = prediction if shift is None else prediction + shift
                space = self._space(module, call, refined, head)
                correction = head(space.history.to(head.dtype), space.normalise(refined).to(head.dtype),
                                  self.selection)
                step = (space.scale * correction).to(prediction.dtype)
                shift = step if shift is None else shift + step
                loc, scale = space.loc, space.scale
            if self.stlora_config[name].scaling_l2 > 0:
                term = self.stlora_config[name].scaling_l2 * self._scaling_penalty(module, name)
                penalty = term if penalty is None else penalty + term
        refined = prediction if shift is None else prediction + shift
        quantiles = aux_loss = None
        if isinstance(output, ForecastOutput):
            quantiles, aux_loss = output.quantile_outputs, output.aux_loss
        if quantiles is not None and shift is not None:
            quantiles = quantiles + shift.unsqueeze(-1)
        if penalty is not None:
            aux_loss = penalty if aux_loss is None else aux_loss + penalty
        loss = None
        if call.future_values is not None:
            batch, horizon, nodes, channels = refined.shape
            check_future_values(call.future_values, model=model, batch_size=batch, horizon=horizon, nodes=nodes,
                                out_channels=channels)
            loss_fn = getattr(module, "loss_fn", None)
            loss = forecast_loss(refined, call.future_values, call.future_observed_mask,
                                 loss_fn if callable(loss_fn) else get_loss("mae"), model=model, aux_loss=aux_loss)
        return ForecastOutput(loss=loss, prediction_outputs=refined, quantile_outputs=quantiles, loc=loc,
                              scale=scale, aux_loss=aux_loss)

    def _check_wrapped_layers_ran(self, module: nn.Module, active: list[str], called: set[str]) -> None:
        """Refuse, by name, NALL-wrapped layers of the ``active`` adapters that this forward pass never called."""
        silent = sorted(
            layer.layer_name for layer in module.modules()
            if isinstance(layer, NodeAdaptiveLayer) and layer.layer_name not in called
            and any(name in layer.stlora_A for name in active)
        )
        if silent:
            raise RuntimeError(
                f"ST-LoRA wrapped {silent} of {type(module).__name__}, but its forward never called "
                f"{'them' if len(silent) > 1 else 'it'}: the forecaster reads the layer's weight directly or skips "
                "the layer, so the adapter would neither change the forecast nor get a gradient. Leave these layers "
                "out of target_modules (or exclude_modules), or make the forecaster call them"
            )
        self._calls_checked = True

    @staticmethod
    def _space(module: nn.Module, call: CallInputs, prediction: torch.Tensor,
               head: NodeSpecificPredictor) -> PredictorSpace:
        """The space the predictor ``head`` refines ``prediction`` in: the forecaster's, else per window."""
        scaler = forecaster_scaler(module)
        if scaler is not None:
            return scaler_space(scaler, call.past_values, call.past_observed_mask, call.node_index,
                                dtype=head.dtype)
        channels = history_channels_of(head.in_channels, head.out_channels, head.output_history_channels)
        return window_space(call.past_values, call.past_observed_mask, prediction, channels)

    def _scaling_penalty(self, model: nn.Module, adapter_name: str) -> torch.Tensor:
        """The adapter's scaling penalty summed over its predictor and its NALL-wrapped layers."""
        terms = [layer.scaling_penalty(adapter_name) for layer in model.modules()
                 if isinstance(layer, NodeAdaptiveLayer) and adapter_name in layer.stlora_node_scale]
        if adapter_name in self.stlora_heads:
            terms.append(self.stlora_heads[adapter_name].scaling_penalty())
        return torch.stack(terms).sum()
