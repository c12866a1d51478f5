"""Configuration of ST-LINK, a spatially aware GPT-2 forecaster (Jeon et al., CIKM 2025)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config, PreTrainedConfig

from st_peft.losses import LOSSES


@strict
class STLinkConfig(PreTrainedConfig):
    r"""Configuration of [`STLinkModel`] and [`STLinkForForecasting`].

    The backbone is described by a nested GPT-2 configuration (`gpt2_config`); every other
    field describes the spatio-temporal wrapping around it. Turning `use_se_attention`,
    `use_mrffn` and `use_partial_freeze` all off gives the plain GPT-2 + partially frozen
    attention baseline of ST-LLM (with every layer trainable, since freezing is off).

    Args:
        gpt2_config (`GPT2Config` or `dict`, *optional*):
            The GPT-2 backbone: width (`n_embd`), depth (`n_layer`), heads, dropouts, `n_positions`.
            Defaults to GPT-2 small.
        num_nodes (`int`): number of nodes `N` of the graph.
        input_len (`int`): history length `L`.
        horizon (`int`): forecast length `H`.
        in_channels (`int`): channels `C_in` of the history.
        out_channels (`int`): channels `C_out` of the forecast.
        steps_per_day (`int`): time-of-day slots of the calendar embedding.
        patch_len (`int`): time steps per token; `input_len` must be a multiple of it, giving
            `P = input_len // patch_len` tokens per node and `N * P` tokens per sample.
        use_se_attention (`bool`): rotate queries and keys by patch position and by a learned
            per-node rotation (SE-Attention). When off, GPT-2's learned absolute position
            embedding `wpe` is added to the tokens instead.
        spatial_rotary_ratio (`float`): share of each head's dimensions given to the spatial
            rotation; the rest take the temporal rotation.
        rope_theta (`float`): base of the rotary frequencies.
        use_mrffn (`bool`): replace the MLP of the upper `num_unfrozen_layers` blocks with the
            memory-retrieval mixture of experts (MRFFN).
        num_memory_slots (`int`): key-value memory slots per MRFFN layer.
        memory_top_k (`int`): slots each token retrieves.
        memory_ema_decay (`float`): decay of the exponential moving average that moves the
            memory keys towards the tokens assigned to them while training.
        num_experts (`int`): experts per MRFFN layer, each initialised from the GPT-2 MLP.
        experts_per_token (`int`): experts each token is routed through; one keeps the feed-forward
            cost of a GPT-2 MLP.
        router_aux_loss_coef (`float`): weight of the load-balancing loss returned as `aux_loss`.
        use_partial_freeze (`bool`): freeze the lower `n_layer - num_unfrozen_layers` blocks
            except their LayerNorms.
        num_unfrozen_layers (`int`): `U`, the number of upper blocks that train (and host MRFFN).
        is_causal (`bool`): keep GPT-2's causal attention over the token sequence.
        use_revin (`bool`): normalise each node and channel by its own window statistics and
            undo it on the forecast.
        revin_affine (`bool`): learn a per-channel scale and shift inside that normalisation.
        revin_eps (`float`): added to the variance before its square root.
        scaling (`dict`, *optional*): the training span's statistics, a mapping of
            `past_loc` / `past_scale` (`(N, C_in)` nested lists) and `future_loc` / `future_scale`
            (`(N, C_out)`), as `splits.model_kwargs()` gives them. The forecaster normalises
            `past_values` with them and returns forecasts in original units; `None` scales by the
            identity.
        loss (`str`): training loss in original units, one of `"mae"`, `"mse"`, `"huber"`
            (`st_peft.losses.LOSSES`).

    Example:

    ```python
    >>> from transformers import GPT2Config
    >>> from st_peft.models.st_link import STLinkConfig, STLinkForForecasting
    >>> config = STLinkConfig(gpt2_config=GPT2Config(n_embd=64, n_layer=4, n_head=4), num_nodes=20)
    >>> model = STLinkForForecasting(config)
    ```
    """

    model_type = "st_link"
    sub_configs_defaults = {"gpt2_config": GPT2Config}

    gpt2_config: dict | GPT2Config | None = None
    num_nodes: int = 1
    input_len: int = 12
    horizon: int = 12
    in_channels: int = 1
    out_channels: int = 1
    steps_per_day: int = 288
    patch_len: int = 3
    use_se_attention: bool = True
    spatial_rotary_ratio: float = 0.5
    rope_theta: float = 10000.0
    use_mrffn: bool = True
    num_memory_slots: int = 32
    memory_top_k: int = 4
    memory_ema_decay: float = 0.99
    num_experts: int = 4
    experts_per_token: int = 1
    router_aux_loss_coef: float = 0.01
    use_partial_freeze: bool = True
    num_unfrozen_layers: int = 2
    is_causal: bool = True
    use_revin: bool = True
    revin_affine: bool = True
    revin_eps: float = 1e-5
    scaling: dict | None = None
    loss: str = "mae"

    @property
    def num_patches(self) -> int:
        """Tokens per node, `P = input_len // patch_len`."""
        return self.input_len // self.patch_len

    @property
    def hidden_size(self) -> int:
        """Width of the GPT-2 backbone."""
        return self.gpt2_config.n_embd

    @property
    def num_hidden_layers(self) -> int:
        """Depth of the GPT-2 backbone."""
        return self.gpt2_config.n_layer

    @property
    def initializer_range(self) -> float:
        """Standard deviation of the normal initialisation, taken from the GPT-2 configuration."""
        return self.gpt2_config.initializer_range

    @property
    def rotary_dims(self) -> tuple[int, int]:
        """Head dimensions rotated by patch position and by node: `(temporal, spatial)`, both even."""
        head_dim = self.gpt2_config.n_embd // self.gpt2_config.n_head
        spatial = 2 * int(round(head_dim * self.spatial_rotary_ratio / 2))
        return head_dim - spatial, spatial

    def validate_architecture(self):
        """Refuse settings that cannot build a model, naming the numbers involved."""
        super().validate_architecture()
        gpt2 = self.gpt2_config
        for name in ("num_nodes", "input_len", "horizon", "in_channels", "out_channels", "patch_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.input_len % self.patch_len != 0:
            raise ValueError(
                f"`input_len` ({self.input_len}) must be a multiple of `patch_len` ({self.patch_len})."
            )
        if not 0 <= self.num_unfrozen_layers <= gpt2.n_layer:
            raise ValueError(
                f"`num_unfrozen_layers` U={self.num_unfrozen_layers} must lie between 0 and the number of "
                f"GPT-2 layers ({gpt2.n_layer})."
            )
        if gpt2.n_embd % gpt2.n_head != 0:
            raise ValueError(f"GPT-2 width n_embd={gpt2.n_embd} is not a multiple of n_head={gpt2.n_head}.")
        head_dim = gpt2.n_embd // gpt2.n_head
        if self.use_se_attention and head_dim % 2 != 0:
            raise ValueError(
                f"SE-Attention rotates pairs of dimensions: the head width {head_dim} must be even."
            )
        if not 0.0 <= self.spatial_rotary_ratio <= 1.0:
            raise ValueError(f"`spatial_rotary_ratio` must lie in [0, 1], got {self.spatial_rotary_ratio}.")
        if not self.use_se_attention and self.num_nodes * self.num_patches > gpt2.n_positions:
            raise ValueError(
                f"Without SE-Attention the tokens take GPT-2's absolute positions: {self.num_nodes} nodes x "
                f"{self.num_patches} patches = {self.num_nodes * self.num_patches} tokens exceed "
                f"n_positions={gpt2.n_positions}."
            )
        if self.use_mrffn:
            if not 1 <= self.memory_top_k <= self.num_memory_slots:
                raise ValueError(
                    f"`memory_top_k` ({self.memory_top_k}) must lie between 1 and `num_memory_slots` "
                    f"({self.num_memory_slots})."
                )
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ValueError(
                    f"`experts_per_token` ({self.experts_per_token}) must lie between 1 and `num_experts` "
                    f"({self.num_experts})."
                )
            if not 0.0 <= self.memory_ema_decay < 1.0:
                raise ValueError(f"`memory_ema_decay` must lie in [0, 1), got {self.memory_ema_decay}.")
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {sorted(LOSSES)}, got {self.loss!r}.")
        if self.use_revin and self.out_channels > self.in_channels:
            raise ValueError(
                f"RevIN undoes the normalisation of output channel c with the statistics of input channel c: "
                f"out_channels ({self.out_channels}) cannot exceed in_channels ({self.in_channels})."
            )


__all__ = ["STLinkConfig"]
