"""Configurations of the reference backbones (model types ``stid``, ``gwnet``, ``stgcn``).

Each holds the sizes of the data (``num_nodes``, ``input_len``, ``horizon``, ``in_channels``,
``out_channels``), its calendar resolution (``steps_per_day``, never assumed), the training
span's ``scaling`` statistics and the ``loss``, plus the network's widths. The graph is not part
of a configuration: a graph backbone holds it as a buffer, saved with the weights.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from st_peft.losses import LOSSES

SIZE_FIELDS = ("num_nodes", "input_len", "horizon", "in_channels", "out_channels")


@strict
class STBackboneConfig(PreTrainedConfig):
    r"""What every reference backbone's configuration holds.

    Args:
        num_nodes (`int`): nodes `N` of the graph.
        input_len (`int`): history length `L`.
        horizon (`int`): forecast length `H`.
        in_channels (`int`): channels `C_in` of `past_values`.
        out_channels (`int`): channels `C_out` of the forecast.
        steps_per_day (`int`, *optional*): time-of-day slots per day (288 for 5-minute data); a
            model that reads the time of day refuses to be built without it.
        scaling (`dict`, *optional*): the training span's statistics, a mapping of `past_loc` /
            `past_scale` (`(N, C_in)` nested lists) and `future_loc` / `future_scale` (`(N, C_out)`),
            as `splits.model_kwargs()` gives them; `None` scales by the identity.
        loss (`str`): training loss in original units, one of `st_peft.losses.LOSSES`.
    """

    num_nodes: int = 1
    input_len: int = 12
    horizon: int = 12
    in_channels: int = 1
    out_channels: int = 1
    steps_per_day: int | None = None
    scaling: dict | None = None
    loss: str = "mae"

    def validate_architecture(self):
        """Refuse sizes below 1 and unknown losses, naming the field."""
        super().validate_architecture()
        for name in SIZE_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.steps_per_day is not None and self.steps_per_day < 1:
            raise ValueError(f"`steps_per_day` must be at least 1, got {self.steps_per_day}.")
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {sorted(LOSSES)}, got {self.loss!r}.")


@strict
class STIDConfig(STBackboneConfig):
    r"""Configuration of [`STID`] (the paper's defaults: 32-wide embeddings, 3 layers, dropout 0.15).

    Args:
        embed_dim (`int`): width of the time-series embedding of the flattened window.
        node_dim (`int`): width of the node identity.
        tod_dim (`int`): width of the time-of-day identity.
        dow_dim (`int`): width of the day-of-week identity.
        num_layers (`int`): residual MLP layers in the encoder.
        dropout (`float`): dropout inside each residual MLP layer.
        if_node, if_tod, if_dow (`bool`): use the node / time-of-day / day-of-week identities;
            `if_tod` needs `steps_per_day`.
    """

    model_type = "stid"

    embed_dim: int = 32
    node_dim: int = 32
    tod_dim: int = 32
    dow_dim: int = 32
    num_layers: int = 3
    dropout: float = 0.15
    if_node: bool = True
    if_tod: bool = True
    if_dow: bool = True


@strict
class STGraphBackboneConfig(STBackboneConfig):
    r"""What a graph backbone's configuration adds: how its graph is stored and multiplied.

    Args:
        sparse_graph (`bool`, *optional*): keep the graph as an edge list and multiply with
            `torch.sparse` matrices (`st_peft.backbones.sparse_graph`) instead of dense `(N, N)`
            buffers; `None` chooses sparse from `sparse_graph.SPARSE_GRAPH_MIN_NODES` nodes on. A model
            built with a graph writes the choice here, so that its checkpoint loads the same way (a
            checkpoint saved before this field existed loads dense).
        graph_entries (`int`, *optional*): entries `M` of a sparse graph's `(2, M)` edge list, written
            by the model built with the graph; `from_pretrained` reads it to shape the buffers.
    """

    sparse_graph: bool | None = None
    graph_entries: int | None = None

    def validate_architecture(self):
        """Refuse an edge list of fewer than one entry."""
        super().validate_architecture()
        if self.graph_entries is not None and self.graph_entries < 1:
            raise ValueError(f"`graph_entries` must be at least 1, got {self.graph_entries}.")


@strict
class GWNetConfig(STGraphBackboneConfig):
    r"""Configuration of [`GWNet`] (the paper's widths 32, 32, 256, 512).

    Args:
        use_graph (`bool`): the model holds a given graph whose forward and backward transition
            matrices are diffusion supports; without it the adaptive adjacency works alone.
        adaptive_adjacency (`bool`): learn the self-adaptive adjacency `softmax(relu(E1 E2^T))`.
        adaptive_embed_dim (`int`): width of the node embeddings `E1`, `E2`.
        residual_channels, dilation_channels, skip_channels, end_channels (`int`): widths.
        kernel_size (`int`): temporal kernel size.
        blocks (`int`, *optional*): number of blocks; `None` picks the fewest whose receptive field
            covers `input_len` (4 for 12 steps, as in the paper).
        layers (`int`): layers per block, with dilations `1, 2, 4, ...`.
        diffusion_order (`int`): diffusion steps `K` per support.
        dropout (`float`): dropout after each graph convolution.
        calendar_channels (`bool`): append time of day and day of week to the scaled history as
            two more input channels; needs `steps_per_day`.
    """

    model_type = "gwnet"

    use_graph: bool = True
    adaptive_adjacency: bool = True
    adaptive_embed_dim: int = 10
    residual_channels: int = 32
    dilation_channels: int = 32
    skip_channels: int = 256
    end_channels: int = 512
    kernel_size: int = 2
    blocks: int | None = None
    layers: int = 2
    diffusion_order: int = 2
    dropout: float = 0.3
    calendar_channels: bool = False

    def validate_architecture(self):
        """A GWNet needs a graph: a given one, or the adaptive adjacency."""
        super().validate_architecture()
        if not (self.use_graph or self.adaptive_adjacency):
            raise ValueError("GWNet needs a graph: pass adjacency, or keep adaptive_adjacency=True")


@strict
class STGCNConfig(STGraphBackboneConfig):
    r"""Configuration of [`STGCN`], Chebyshev variant (the paper's widths 64, 16, 64).

    Args:
        block_channels (`list[int]`): `(temporal, spatial, output)` widths of each ST-Conv block.
        num_blocks (`int`): number of ST-Conv blocks.
        kt (`int`): temporal kernel size.
        ks (`int`): Chebyshev kernel size, i.e. polynomial order + 1.
        dropout (`float`): dropout after each ST-Conv block (0: the paper's code trains with keep_prob 1).
        calendar_channels (`bool`): append time of day and day of week to the scaled history as
            two more input channels; needs `steps_per_day`.
    """

    model_type = "stgcn"

    block_channels: list[int] | tuple[int, ...] = (64, 16, 64)
    num_blocks: int = 2
    kt: int = 3
    ks: int = 3
    dropout: float = 0.0
    calendar_channels: bool = False

    def validate_architecture(self):
        """Refuse block widths that are not three numbers, and histories the blocks would consume."""
        super().validate_architecture()
        if len(self.block_channels) != 3:
            raise ValueError(
                f"block_channels must be (temporal, spatial, output) widths; got {list(self.block_channels)}"
            )
        consumed = self.num_blocks * 2 * (self.kt - 1)
        if self.input_len - consumed < 1:
            raise ValueError(
                f"STGCN with {self.num_blocks} ST-Conv blocks and kt={self.kt} consumes {consumed} time "
                f"steps, so input_len must be at least {consumed + 1}; got input_len={self.input_len}"
            )


__all__ = ["GWNetConfig", "STBackboneConfig", "STGCNConfig", "STGraphBackboneConfig", "STIDConfig"]
