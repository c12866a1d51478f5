"""Configuration of ST-LoRA (Ruan et al., ECML-PKDD 2025, arXiv 2404.07919)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from st_peft.tuners.options import check_shared_options, normalise_target_options
from st_peft.tuners.registration import extend_peft_type

# The enum member must exist before the first config is built, whichever of the tuner's
# modules is imported first; extending is idempotent.
STLORA = extend_peft_type("STLORA")


@dataclass
class STLoraConfig(PeftConfig):
    """Configuration of an ST-LoRA adapter.

    ST-LoRA appends a node-specific predictor to a forecaster
    ``f(past_values, **kwargs) -> (B, H, N, C_out)`` (a tensor or a ``ForecastOutput``, in original
    units) and can also wrap the forecaster's own ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers
    with node-adaptive low-rank layers (NALLs): ``W x + b + (alpha / r) * B A_i x`` where ``i`` is
    the node of the row, ``W, b`` are the frozen layer's and ``B`` starts at zero.

    Per-node factors: ``A_i = diag(s_i) A`` with a shared ``A`` (``r x d_in``) and a per-node
    scale ``s_i`` of ``r`` numbers. In wrapped layers ``s_i`` is a learned ``(N, r)`` table
    (initialised to ones); in the predictor ``s_i = 1 + G e_i`` is generated from one small node
    embedding ``e_i`` (``node_embedding_dim`` numbers per node, shared by all of the predictor's
    NALLs) and a zero-initialised ``G`` per NALL, so the per-node part costs
    ``N * node_embedding_dim`` parameters per adapter.

    The config holds sizes only: build it as ``STLoraConfig(**splits.size_kwargs(), ...)``. The
    scaling statistics belong to the forecaster; the predictor works in the forecaster's scaled
    space when it has an ``STScaler``, else in its own per-window normalisation (see
    ``st_peft.tuners.st_lora.space``).

    Args:
        num_nodes: nodes ``N`` of the graph the adapter is built for (required when the adapter is
            injected; a config without it can be built, as peft builds every config without arguments).
        input_len: history length ``L``.
        horizon: forecast length ``H``.
        in_channels: channels ``C_in`` of the history ``past_values``.
        out_channels: channels ``C_out`` of the prediction.
        r: rank of every NALL.
        alpha: the low-rank update is scaled by ``alpha / r``.
        dropout: dropout on the input of the low-rank path.
        hidden_dim: width of the predictor's residual stream.
        node_embedding_dim: width of the predictor's node embedding.
        num_nall_layers: residual NALL layers per predictor block.
        num_blocks: stacked predictor blocks; 0 means no predictor (then ``target_modules`` is required).
        target_modules: names (suffixes) or a regex of the forecaster's own layers to wrap with NALLs.
        exclude_modules: names (suffixes) or a regex of layers matched by ``target_modules`` to leave
            alone, as in LoRA.
        layers_to_transform: wrap ``target_modules`` only in these layer indices (an int or a list),
            as in LoRA: the index is the number after ``layers_pattern`` in the module's name
            (``encoder.1.fc1`` is layer 1 with ``layers_pattern="encoder"``).
        layers_pattern: the name(s) of the numbered layer lists ``layers_to_transform`` indexes
            (``"encoder"`` for STID, ``"layers"`` for GWNet, ``"blocks"`` for STGCN); None takes the
            first numbered part of a name that has one before it.
        init_weights: True starts every adapter at the forecaster exactly (``B``, ``G`` and the
            predictor's output layer at zero); False initialises them randomly too, so that a new
            adapter already changes the forecast (for tests, as LoRA's ``init_lora_weights=False``).
        node_axis: axis of the node dimension in the *inputs* of the wrapped layers
            (``-2`` fits ``nn.Linear`` on ``(B, N, D)`` or ``(B, T, N, D)`` and convolutions on
            ``(B, C, N, T)``).
        modules_to_save: forecaster modules to train and save in full alongside the adapter.
        train_backbone: train the forecaster's own weights too (frozen by default); the adapter
            checkpoint then also holds the forecaster's weights so that loading reproduces it.
        scaling_l2: weight of the paper's L2 penalty on the adapter's per-node scaling, i.e. on
            ``s_i - 1`` of every NALL; when positive the output's ``aux_loss`` holds the penalty
            (and ``loss`` includes it).
        output_history_channels: for each of the ``out_channels`` forecast channels, the index of
            the history channel (in ``[0, in_channels)``) that holds the same variable. Only the
            per-window space of a ``SeamedForecaster`` whose module has no ``STScaler`` (and that
            was built without its own mapping) uses it, to put a forecast channel and its history
            in one space; None means channel ``j`` is history
            channel ``j``, which needs ``in_channels == out_channels``. With splits:
            ``[splits.input_channels.index(c) for c in splits.target_channels]``.
    """

    num_nodes: int | None = field(default=None, metadata={"help": "Nodes N of the graph (required)."})
    input_len: int = field(default=12, metadata={"help": "History length L."})
    horizon: int = field(default=12, metadata={"help": "Forecast length H."})
    in_channels: int = field(default=1, metadata={"help": "Channels C_in of the history past_values."})
    out_channels: int = field(default=1, metadata={"help": "Channels C_out of the prediction."})
    r: int = field(default=4, metadata={"help": "Rank of every node-adaptive low-rank layer."})
    alpha: float = field(default=4.0, metadata={"help": "The low-rank update is scaled by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the low-rank path."})
    hidden_dim: int = field(default=8, metadata={"help": "Width of the predictor's residual stream."})
    node_embedding_dim: int = field(default=4, metadata={"help": "Width of the predictor's node embedding."})
    num_nall_layers: int = field(default=4, metadata={"help": "Residual NALL layers per predictor block."})
    num_blocks: int = field(default=1, metadata={"help": "Predictor blocks; 0 disables the predictor."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Forecaster layers (names or regex) to wrap with NALLs."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Layers (names or regex) matched by target_modules to leave alone."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Wrap target_modules only in these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name(s) of the numbered layer lists layers_to_transform indexes."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Start at the forecaster exactly; False initialises every part randomly."}
    )
    node_axis: int = field(default=-2, metadata={"help": "Node axis of the wrapped layers' inputs."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Forecaster modules to train and save in full."}
    )
    train_backbone: bool = field(default=False, metadata={"help": "Train the forecaster's own weights too."})
    scaling_l2: float = field(default=0.0, metadata={"help": "Weight of the L2 penalty on the per-node scaling."})
    output_history_channels: list[int] | None = field(
        default=None,
        metadata={"help": "History channel of each forecast channel, for the predictor's own normalisation."},
    )
    # peft's injection reads this attribute on every config; ST-LoRA refuses it (it wraps modules).
    target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Refused: ST-LoRA wraps modules, not bare parameters."}
    )

    def __post_init__(self) -> None:
        # before peft's own checks, so a refused option is named with the reason st-peft gives
        check_shared_options(self, "ST-LoRA")
        super().__post_init__()
        self.peft_type = STLORA
        normalise_target_options(self)
        if not self.target_modules and (self.exclude_modules or self.layers_to_transform is not None):
            raise ValueError(
                "STLoraConfig: exclude_modules and layers_to_transform narrow down target_modules, the forecaster "
                "layers to wrap with NALLs; without target_modules only the predictor is added, so they cannot apply"
            )
        # num_nodes may stay None here, as peft builds every config without arguments; the
        # tuner refuses it when the adapter is injected
        positive = {
            "num_nodes": 1 if self.num_nodes is None else self.num_nodes,
            "input_len": self.input_len,
            "horizon": self.horizon,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "r": self.r,
            "hidden_dim": self.hidden_dim,
            "node_embedding_dim": self.node_embedding_dim,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"STLoraConfig.{name} must be a positive integer; got {value!r}")
        if self.num_blocks < 0 or self.num_nall_layers < 0:
            raise ValueError(
                f"STLoraConfig.num_blocks and num_nall_layers must be >= 0; got num_blocks={self.num_blocks}, "
                f"num_nall_layers={self.num_nall_layers}"
            )
        if self.num_blocks == 0 and not self.target_modules:
            raise ValueError(
                "STLoraConfig with num_blocks=0 has no predictor, so it needs target_modules to adapt anything"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"STLoraConfig.dropout must be in [0, 1); got {self.dropout}")
        if self.scaling_l2 < 0:
            raise ValueError(f"STLoraConfig.scaling_l2 must be >= 0; got {self.scaling_l2}")
        channels = self.output_history_channels
        if channels is not None:
            if isinstance(channels, tuple):
                channels = self.output_history_channels = list(channels)
            if (not isinstance(channels, list) or len(channels) != self.out_channels
                    or not all(isinstance(c, int) and 0 <= c < self.in_channels for c in channels)):
                raise ValueError(
                    f"STLoraConfig.output_history_channels must list, for each of the out_channels="
                    f"{self.out_channels} forecast channels, a history channel in [0, in_channels={self.in_channels}); "
                    f"got {channels!r}"
                )
