"""ST-LINK: GPT-2 blocks over (node, patch) tokens with SE-Attention, MRFFN and partially frozen attention.

Jeon et al., "ST-LINK: Spatially-Aware Large Language Models for Spatio-Temporal
Forecasting" (CIKM 2025, arXiv 2509.13753). The authors' code is not public; this file
follows the method as published and records each choice the paper leaves open.

Tokens are ordered patch-major: token ``p * N + n`` holds patch ``p`` of node ``n``, so that
under GPT-2's causal mask the tokens of the last patch see every node's earlier patches.

[`STLinkForForecasting`] speaks transformers' time-series language: ``past_values`` in original
units in, a ``ForecastOutput`` in original units (with ``loss`` when ``future_values`` is given)
out. It carries the training span's statistics as an ``STScaler`` and works in that scaled
space; [`STLinkModel`] encodes an already scaled history.

This file is copied next to the weights by ``save_pretrained`` (``register_for_auto_class``),
so it imports only ``torch``, ``transformers``, ``safetensors``, ``st_peft`` (outputs, checks,
scaling, losses, the shared forecast output) and its sibling configuration file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import GPT2Config, PreTrainedModel
from transformers import initialization as init
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput, cached_file, has_file

from st_peft.checks import check_node_index, check_time_features
from st_peft.forecasting import ScaledForecast, STPreTrainedModel
from st_peft.scaling import STATISTIC_NAMES, STScaler

from .configuration_st_link import STLinkConfig


@dataclass
class STLinkModelOutput(ModelOutput):
    """Output of [`STLinkModel`].

    Attributes:
        last_hidden_state: token states after the final LayerNorm, ``(B, P, N, d)``.
        aux_loss: router load-balancing loss summed over the MRFFN layers (unweighted), a scalar;
            ``None`` when no layer has an MRFFN.
        hidden_states: the token states entering each block and leaving the last one, each
            ``(B, P, N, d)``, when ``output_hidden_states=True``.
    """

    last_hidden_state: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn the pairs ``(x[..., i], x[..., i + D/2])`` by the angles of ``cos``, ``sin`` (``D/2`` each, broadcast).

    Each half is written in place into one output tensor (one multiply and one fused
    multiply-add per half) rather than building the rotated copy ``(-second, first)`` and
    adding two full products: the rotation is memory bound on CPU, so fewer passes is faster.
    """
    first, second = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out_first, out_second = out.chunk(2, dim=-1)
    torch.mul(first, cos, out=out_first).addcmul_(second, sin, value=-1.0)
    torch.mul(second, cos, out=out_second).addcmul_(first, sin)
    return out


class _PairRotation(torch.autograd.Function):
    """SE-Attention's rotation of queries and keys, with a backward written for it.

    Autograd through ``x * cos + rotate_half(x) * sin`` would keep ``x`` and its rotated copy
    and reduce two full-size products to get the gradients of ``cos`` and ``sin``. The angle
    gradient has a shorter form in the rotated output ``o``: for the pair ``(a, b)`` turned by
    ``t``, ``d o_a / dt = -o_b`` and ``d o_b / dt = o_a``, so ``dL/dt = sum(g_b * o_a - g_a * o_b)``
    over the batch and heads: one half-size product and reduction, computed only for the angle
    columns that need a gradient (the spatial ones; patch angles are constants). ``o`` is what
    the attention keeps for its own backward anyway, so nothing extra is stored.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, fixed_angles: torch.Tensor, learned_angles: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``(..., T, heads, D)`` by ``cat(fixed_angles, learned_angles)`` ``(T, D / 2)``."""
        angles = torch.cat((fixed_angles, learned_angles), dim=-1)[:, None, :]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        out = _rotate(x, cos, sin)
        ctx.save_for_backward(out, cos, sin)
        ctx.num_fixed = fixed_angles.shape[-1]
        ctx.angle_dtypes = (fixed_angles.dtype, learned_angles.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Gradients of ``x`` ``(..., T, heads, D)`` and of the angles ``(T, ·)`` from ``grad`` (shape of ``x``)."""
        out, cos, sin = ctx.saved_tensors
        # the inverse rotation (angle -t) carries the gradient back to x
        grad_x = _rotate(grad, cos, -sin) if ctx.needs_input_grad[0] else None
        grad_first, grad_second = grad.chunk(2, dim=-1)
        out_first, out_second = out.chunk(2, dim=-1)
        columns = (slice(None, ctx.num_fixed), slice(ctx.num_fixed, None))
        grad_angles = []
        for needed, cols, dtype in zip(ctx.needs_input_grad[1:], columns, ctx.angle_dtypes, strict=True):
            if not needed:
                grad_angles.append(None)
                continue
            product = grad_second[..., cols] * out_first[..., cols]
            product.addcmul_(grad_first[..., cols], out_second[..., cols], value=-1.0)
            # summing the batch dims first keeps that reduction over contiguous memory
            if product.ndim > 3:
                product = product.flatten(0, product.ndim - 4).sum(dim=0)
            grad_angles.append(product.sum(dim=-2).to(dtype))
        return grad_x, *grad_angles


def rotate_pairs(x: torch.Tensor, fixed_angles: torch.Tensor, learned_angles: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs ``(x[..., i], x[..., i + D/2])`` of every head by its token's angles.

    Pair ``i`` turns by ``angles[t, i]`` where ``angles = cat(fixed_angles, learned_angles)``:
    ``(a, b) -> (a cos - b sin, b cos + a sin)``. The split only says which angles may need a
    gradient (SE-Attention: patch angles fixed, node angles learned).

    Args:
        x: ``(..., T, heads, D)`` with ``D`` even.
        fixed_angles: ``(T, F)``.
        learned_angles: ``(T, D / 2 - F)``.

    Returns:
        The rotated tensor, shape of ``x``, contiguous.
    """
    tokens, pairs = fixed_angles.shape[0], fixed_angles.shape[-1] + learned_angles.shape[-1]
    if x.ndim < 3 or x.shape[-3] != tokens or x.shape[-1] != 2 * pairs or learned_angles.shape[0] != tokens:
        raise ValueError(
            f"rotate_pairs expects x (..., T, heads, 2 * pairs) and angles (T, pairs) split in two; got x "
            f"{tuple(x.shape)}, angles {tuple(fixed_angles.shape)} and {tuple(learned_angles.shape)}."
        )
    return _PairRotation.apply(x, fixed_angles, learned_angles)


class STLinkRotaryEmbedding(nn.Module):
    """Angles of SE-Attention: patch position for the temporal pairs, a learned node rotation for the spatial ones.

    Each head's dimensions form ``head_dim / 2`` rotary pairs ``(i, i + head_dim / 2)``; the
    first ``temporal_dims / 2`` pairs turn with the token's patch position, the other
    ``spatial_dims / 2`` with its node. Both sets share one rotation call. The spatial angle of node ``n`` at frequency ``i`` is ``node_rotation[n, i] * omega_i``: the
    base rotary frequencies ``omega_i`` scaled by a learnable per-node embedding. It starts at
    the node's index (plain RoPE over the node order) and moves during training, so the
    attention score between two nodes depends on their learned difference.

    Args:
        config: the model configuration (rotary split, theta, number of nodes).
    """

    def __init__(self, config: STLinkConfig):
        super().__init__()
        self.temporal_dims, self.spatial_dims = config.rotary_dims
        self.theta = config.rope_theta
        self.node_rotation = nn.Parameter(torch.empty(config.num_nodes, self.spatial_dims // 2))

    def base_frequencies(self, dims: int, device: torch.device) -> torch.Tensor:
        """The ``dims / 2`` rotary frequencies ``theta ** (-2i / dims)``, float32."""
        exponents = torch.arange(0, dims, 2, device=device, dtype=torch.float32) / max(dims, 1)
        return self.theta**-exponents

    def node_frequencies(self) -> torch.Tensor:
        """Effective spatial frequencies of every node, ``(N, spatial_dims / 2)``."""
        return self.node_rotation * self.base_frequencies(self.spatial_dims, self.node_rotation.device)

    def forward(self, num_patches: int, node_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles of every token's rotary pairs.

        Args:
            num_patches: ``P``.
            node_index: ``(N,)`` graph indices of the nodes in the batch.

        Returns:
            ``(temporal, spatial)`` float32 angles of the tokens ``t = p * N + n``:
            ``(P * N, temporal_dims / 2)`` (patch ``p`` times the base frequencies, constant)
            and ``(P * N, spatial_dims / 2)`` (the learned frequencies of node ``n``).
        """
        device = self.node_rotation.device
        num_nodes = node_index.shape[0]
        patch = torch.arange(num_patches, device=device, dtype=torch.float32)
        temporal = patch[:, None] * self.base_frequencies(self.temporal_dims, device)
        temporal = temporal[:, None, :].expand(num_patches, num_nodes, -1)
        spatial = self.node_frequencies()[node_index]
        spatial = spatial[None, :, :].expand(num_patches, num_nodes, -1)
        tokens = num_patches * num_nodes
        return temporal.reshape(tokens, -1), spatial.reshape(tokens, -1)


class STLinkAttention(nn.Module):
    """GPT-2 self-attention (``c_attn``, ``c_proj``) with SE-Attention rotations, computed by SDPA.

    Args:
        config: the model configuration.
        layer_idx: index of the block, for GPT-2's optional per-layer scaling.
    """

    def __init__(self, config: STLinkConfig, layer_idx: int):
        super().__init__()
        gpt2 = config.gpt2_config
        self.embed_dim = gpt2.n_embd
        self.num_heads = gpt2.n_head
        self.head_dim = self.embed_dim // self.num_heads
        self.is_causal = config.is_causal
        self.scaling = self.head_dim**-0.5 if gpt2.scale_attn_weights else 1.0
        if gpt2.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_dropout = gpt2.attn_pdrop
        self.resid_dropout = nn.Dropout(gpt2.resid_pdrop)

    def forward(
        self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """Attend over all tokens of each sample.

        Args:
            hidden_states: ``(B, T, d)`` with ``T = P * N``.
            rotary: SE-Attention angles ``(temporal, spatial)``, ``(T, ·)`` each (see
                [`STLinkRotaryEmbedding`]), or ``None`` for plain GPT-2 attention.

        Returns:
            ``(B, T, d)``.
        """
        batch, tokens, _ = hidden_states.shape
        heads = self.c_attn(hidden_states).view(batch, tokens, 3 * self.num_heads, self.head_dim)
        query_key, value = heads.split(2 * self.num_heads, dim=2)
        if rotary is not None:
            # queries and keys turn by the same angles: one rotation over both halves the calls
            query_key = rotate_pairs(query_key, *rotary)
        query, key = query_key.split(self.num_heads, dim=2)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=self.is_causal,
            scale=self.scaling,
        )
        attended = attended.transpose(1, 2).reshape(batch, tokens, self.embed_dim)
        return self.resid_dropout(self.c_proj(attended))


class STLinkMRFFN(nn.Module):
    """Memory-retrieval feed-forward network: key-value memory, top-k retrieval, routed GPT-2 experts.

    Each token (the LayerNorm output ``h``) retrieves its ``memory_top_k`` most similar slots
    (cosine similarity to ``memory_keys``) and mixes their ``memory_values`` by a softmax over
    the similarities. A router reads ``[h, retrieved, attention output]`` and sends the token
    through its ``experts_per_token`` best experts, weighted by their router probabilities
    divided by the (detached) sum of those probabilities; the retrieved pattern is added to
    the experts' output. Keys are a buffer moved by an exponential moving average of the
    tokens whose nearest slot they are (while training); values start at zero and learn by
    gradient, so a layer whose experts are copies of one MLP computes exactly that MLP until
    it trains.

    Args:
        config: the model configuration.
    """

    def __init__(self, config: STLinkConfig):
        super().__init__()
        gpt2 = config.gpt2_config
        width = gpt2.n_embd
        inner = gpt2.n_inner if gpt2.n_inner is not None else 4 * width
        self.experts = nn.ModuleList([GPT2MLP(inner, gpt2) for _ in range(config.num_experts)])
        self.router = nn.Linear(3 * width, config.num_experts)
        self.memory_values = nn.Parameter(torch.empty(config.num_memory_slots, width))
        self.register_buffer("memory_keys", torch.empty(config.num_memory_slots, width))
        self.memory_top_k = config.memory_top_k
        self.experts_per_token = config.experts_per_token
        self.ema_decay = config.memory_ema_decay
        # cosine similarities lie in [-1, 1]; scaling by sqrt(width) keeps the retrieval softmax from being flat
        self.retrieval_scale = math.sqrt(width)

    def retrieve(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the memory.

        Args:
            tokens: ``(T, d)``.

        Returns:
            ``(retrieved (T, d), slot indices (T, memory_top_k))``, the nearest slot first.
        """
        similarity = F.normalize(tokens, dim=-1) @ F.normalize(self.memory_keys, dim=-1).T
        top_similarity, slots = similarity.topk(self.memory_top_k, dim=-1)
        weights = torch.softmax(top_similarity * self.retrieval_scale, dim=-1)
        # the weights scattered over all slots (zero off the top k) make the mix one small matrix
        # product; gathering a (T, k, d) copy of the values and contracting it token by token
        # (and scatter-adding its gradient back) cost far more on CPU
        slot_weights = torch.zeros_like(similarity).scatter(1, slots, weights)
        return slot_weights @ self.memory_values, slots

    @torch.no_grad()
    def update_keys(self, tokens: torch.Tensor, nearest: torch.Tensor) -> None:
        """Move each key towards the mean of the tokens assigned to it; keys with no token stay put.

        Args:
            tokens: ``(T, d)``.
            nearest: ``(T,)`` the nearest slot of each token.
        """
        sums = torch.zeros_like(self.memory_keys).index_add_(
            0, nearest, tokens.detach().to(self.memory_keys.dtype)
        )
        counts = torch.bincount(nearest, minlength=self.memory_keys.shape[0]).to(sums.dtype)
        used = counts > 0
        means = sums[used] / counts[used, None]
        self.memory_keys[used] = self.ema_decay * self.memory_keys[used] + (1.0 - self.ema_decay) * means

    def forward(
        self, hidden_states: torch.Tensor, attention_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route every token through its experts.

        Args:
            hidden_states: LayerNorm output ``(B, T, d)``.
            attention_output: the block's attention output for the same tokens ``(B, T, d)``.

        Returns:
            ``(output (B, T, d), balance loss)``; the loss is the Switch-Transformer product of
            the share of routing slots and the mean router probability of each expert, times the
            number of experts (1.0 for perfectly even routing).
        """
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        retrieved, slots = self.retrieve(tokens)
        router_input = torch.cat((tokens, retrieved, attention_output.reshape(-1, shape[-1])), dim=-1)
        probabilities = torch.softmax(self.router(router_input), dim=-1)
        gates, chosen = probabilities.topk(self.experts_per_token, dim=-1)
        # the gates sum to one (so copies of one MLP compute that MLP), but the normaliser is
        # detached: with it attached, one expert per token, or identical experts, would give
        # the router no gradient from the forecast at all
        gates = gates / gates.sum(dim=-1, keepdim=True).detach()

        # dispatch: the (token, expert) assignments sorted by expert (stably, so each expert sees its
        # tokens in order) give one gather in, one contiguous chunk per expert and one scatter-add out
        flat_choice = chosen.flatten()
        order = flat_choice.argsort(stable=True)
        rows = order // self.experts_per_token
        counts = torch.bincount(flat_choice, minlength=len(self.experts))
        chunks = tokens.index_select(0, rows).split(counts.tolist())
        expert_output = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks, strict=True)])
        output = retrieved.index_add(0, rows, gates.flatten().index_select(0, order)[:, None] * expert_output)

        num_experts = len(self.experts)
        share = counts.to(probabilities.dtype) / flat_choice.numel()
        balance = num_experts * (share * probabilities.mean(dim=0)).sum()
        if self.training:
            self.update_keys(tokens, slots[:, 0])
        return output.reshape(shape), balance


class STLinkBlock(nn.Module):
    """A GPT-2 block (``ln_1``, ``attn``, ``ln_2``, ``mlp``) whose ``mlp`` may be an MRFFN.

    Args:
        config: the model configuration.
        layer_idx: index of the block.
        use_mrffn: put an [`STLinkMRFFN`] in place of GPT-2's MLP.
    """

    def __init__(self, config: STLinkConfig, layer_idx: int, use_mrffn: bool):
        super().__init__()
        gpt2 = config.gpt2_config
        inner = gpt2.n_inner if gpt2.n_inner is not None else 4 * gpt2.n_embd
        self.ln_1 = nn.LayerNorm(gpt2.n_embd, eps=gpt2.layer_norm_epsilon)
        self.attn = STLinkAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(gpt2.n_embd, eps=gpt2.layer_norm_epsilon)
        self.mlp = STLinkMRFFN(config) if use_mrffn else GPT2MLP(inner, gpt2)

    def forward(
        self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pre-LayerNorm attention and feed-forward, each with a residual connection.

        Args:
            hidden_states: ``(B, T, d)``.
            rotary: SE-Attention angles ``(temporal, spatial)`` or ``None``.

        Returns:
            ``(hidden_states (B, T, d), balance loss or None)``.
        """
        attention_output = self.attn(self.ln_1(hidden_states), rotary)
        hidden_states = hidden_states + attention_output
        normed = self.ln_2(hidden_states)
        if isinstance(self.mlp, STLinkMRFFN):
            feed_forward, balance = self.mlp(normed, attention_output)
        else:
            feed_forward, balance = self.mlp(normed), None
        return hidden_states + feed_forward, balance


class STLinkEmbeddings(nn.Module):
    """Tokens of (node, patch): patch values, node embedding, calendar of the patch's last step.

    Without SE-Attention GPT-2's learned absolute position embedding ``wpe`` is added over the
    patch-major token index, as ST-LLM does.

    Args:
        config: the model configuration.
    """

    def __init__(self, config: STLinkConfig):
        super().__init__()
        width = config.gpt2_config.n_embd
        self.patch_len = config.patch_len
        self.steps_per_day = config.steps_per_day
        self.patch = nn.Linear(config.patch_len * config.in_channels, width)
        self.node = nn.Embedding(config.num_nodes, width)
        self.time_of_day = nn.Embedding(config.steps_per_day, width)
        self.day_of_week = nn.Embedding(7, width)
        self.wpe = None if config.use_se_attention else nn.Embedding(config.gpt2_config.n_positions, width)
        self.dropout = nn.Dropout(config.gpt2_config.embd_pdrop)

    def forward(
        self, scaled_past_values: torch.Tensor, past_time_features: torch.Tensor | None, node_index: torch.Tensor
    ) -> torch.Tensor:
        """Embed a history.

        Args:
            scaled_past_values: ``(B, L, N, C_in)``, already normalised.
            past_time_features: ``(B, L, 2)`` time-of-day slot and day of week, or ``None`` to skip the calendar.
            node_index: ``(N,)`` graph indices of the nodes in ``scaled_past_values``.

        Returns:
            Tokens ``(B, P * N, d)``, patch-major.
        """
        batch, length, num_nodes, channels = scaled_past_values.shape
        num_patches = length // self.patch_len
        patches = scaled_past_values.reshape(batch, num_patches, self.patch_len, num_nodes, channels)
        patches = patches.permute(0, 1, 3, 2, 4)
        tokens = self.patch(patches.reshape(batch, num_patches, num_nodes, self.patch_len * channels))
        tokens = tokens + self.node(node_index)
        if past_time_features is not None:
            last_step = past_time_features[:, self.patch_len - 1 :: self.patch_len]
            calendar = self.time_of_day(last_step[..., 0]) + self.day_of_week(last_step[..., 1])
            tokens = tokens + calendar[:, :, None, :]
        tokens = tokens.reshape(batch, num_patches * num_nodes, -1)
        if self.wpe is not None:
            tokens = tokens + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        return self.dropout(tokens)


class STLinkRevIN(nn.Module):
    """Reversible instance normalisation per node and channel over the history window.

    Args:
        config: the model configuration (channels, affine switch, epsilon).
    """

    def __init__(self, config: STLinkConfig):
        super().__init__()
        self.eps = config.revin_eps
        self.affine = config.revin_affine
        self.weight = nn.Parameter(torch.ones(config.in_channels)) if config.revin_affine else None
        self.bias = nn.Parameter(torch.zeros(config.in_channels)) if config.revin_affine else None

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Normalise ``x`` ``(B, L, N, C_in)``; return it and its ``(mean, std)``, each ``(B, 1, N, C_in)``."""
        mean = x.mean(dim=1, keepdim=True).detach()
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        normed = (x - mean) / std
        if self.affine:
            normed = normed * self.weight + self.bias
        return normed, (mean, std)

    def denormalize(self, y: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Undo the normalisation on ``y`` ``(B, H, N, C_out)`` with the statistics of the first ``C_out`` input channels."""
        channels = y.shape[-1]
        mean, std = stats[0][..., :channels], stats[1][..., :channels]
        if self.affine:
            y = (y - self.bias[:channels]) / (self.weight[:channels] + self.eps**2)
        return y * std + mean


def _read_gpt2_state_dict(name_or_path: str | os.PathLike, keep: set[str]) -> dict[str, torch.Tensor]:
    """Read the tensors named in ``keep`` from a GPT-2 checkpoint (a folder or a Hub id), nothing else.

    Keys are read without the ``transformer.`` prefix that ``GPT2LMHeadModel`` checkpoints carry,
    so the token embedding table ``wte`` is never loaded.
    """
    if has_file(name_or_path, "model.safetensors"):
        tensors = {}
        safetensors_file = cached_file(name_or_path, "model.safetensors")
        with safe_open(safetensors_file, framework="pt") as handle:
            for key in handle.keys():
                short = key.removeprefix("transformer.")
                if short in keep:
                    tensors[short] = handle.get_tensor(key)
        return tensors
    if not has_file(name_or_path, "pytorch_model.bin"):
        raise FileNotFoundError(
            f"No model.safetensors or pytorch_model.bin found for GPT-2 checkpoint {name_or_path!r}."
        )
    state = torch.load(cached_file(name_or_path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    return {
        key.removeprefix("transformer."): value
        for key, value in state.items()
        if key.removeprefix("transformer.") in keep
    }


class STLinkPreTrainedModel(STPreTrainedModel):
    """Weight initialisation, partial freezing and GPT-2 loading shared by the ST-LINK models."""

    config: STLinkConfig
    config_class = STLinkConfig
    base_model_prefix = "st_link"
    main_input_name = "past_values"
    supports_gradient_checkpointing = False
    _no_split_modules = ["STLinkBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation, plus the ST-LINK parameters: node rotations, memory, RevIN, scaler."""
        PreTrainedModel._init_weights(self, module)
        std = self.config.initializer_range
        if isinstance(module, Conv1D):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)
        if isinstance(module, (STLinkAttention, GPT2MLP)):
            # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) (two residual paths per block)
            init.normal_(
                module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers)
            )
        if isinstance(module, STLinkRotaryEmbedding):
            node_positions = torch.arange(module.node_rotation.shape[0], dtype=module.node_rotation.dtype)
            init.copy_(module.node_rotation, node_positions[:, None].expand_as(module.node_rotation))
        if isinstance(module, STLinkMRFFN):
            init.normal_(module.memory_keys, mean=0.0, std=1.0)
            init.zeros_(module.memory_values)
        if isinstance(module, STLinkRevIN) and module.affine:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, STScaler):
            # from_pretrained builds the model on the meta device: a scaler the checkpoint lacks
            # takes the config's statistics (the identity without them)
            expected = STScaler(module.num_nodes, module.past_loc.shape[1], module.future_loc.shape[1],
                                self.config.scaling, model=module.model)
            for name in STATISTIC_NAMES:
                init.copy_(getattr(module, name), getattr(expected, name))

    def apply_partial_freeze(self) -> None:
        """Set ``requires_grad`` by the configuration: lower blocks frozen except ``ln_1``/``ln_2``, the rest trainable."""
        backbone = getattr(self, self.base_model_prefix, self)
        first_upper = self.config.num_hidden_layers - self.config.num_unfrozen_layers
        for index, block in enumerate(backbone.h):
            frozen = self.config.use_partial_freeze and index < first_upper
            for name, parameter in block.named_parameters():
                parameter.requires_grad_(not frozen or name.startswith(("ln_1.", "ln_2.")))

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """[`STPreTrainedModel.from_pretrained`] (a scaler of another graph is refused), then the configured freezing.

        Loading replaces every parameter by a new trainable one, so the freezing applied at
        construction has to be applied again.
        """
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model.apply_partial_freeze()
        return (model, info) if output_loading_info else model

    @classmethod
    def from_gpt2(cls, name_or_path: str | os.PathLike, **config_kwargs) -> STLinkPreTrainedModel:
        """Build the model around pretrained GPT-2 blocks.

        Each block's LayerNorms and attention come from the checkpoint's layer of the same
        index; its MLP either stays an MLP or is copied into every expert of the MRFFN;
        ``ln_f`` and (without SE-Attention) ``wpe`` are copied too. The token embedding table
        is neither allocated nor read.

        Args:
            name_or_path: a folder holding a GPT-2 checkpoint (``config.json`` and
                ``model.safetensors`` or ``pytorch_model.bin``) or a Hub id such as
                ``"openai-community/gpt2"``.
            **config_kwargs: fields of [`STLinkConfig`]. ``gpt2_config`` (a dict) overrides fields
                of the checkpoint's configuration, e.g. ``{"n_layer": 6}`` to keep the first six
                layers or new dropout rates; the width and the number of heads must match the checkpoint.

        Returns:
            The model with the checkpoint's weights, in training mode with the configured freezing.
        """
        checkpoint_config = GPT2Config.from_pretrained(name_or_path)
        overrides = config_kwargs.pop("gpt2_config", None) or {}
        if isinstance(overrides, GPT2Config):
            overrides = overrides.to_diff_dict()
        for name in ("n_embd", "n_head"):
            wanted = overrides.get(name, getattr(checkpoint_config, name))
            if wanted != getattr(checkpoint_config, name):
                raise ValueError(
                    f"GPT-2 checkpoint {str(name_or_path)!r} has {name}={getattr(checkpoint_config, name)} but the "
                    f"ST-LINK configuration asks for {name}={wanted}."
                )
        layers = overrides.get("n_layer", checkpoint_config.n_layer)
        if layers > checkpoint_config.n_layer:
            raise ValueError(
                f"ST-LINK asks for {layers} GPT-2 layers but checkpoint {str(name_or_path)!r} has only "
                f"{checkpoint_config.n_layer}."
            )
        gpt2_config = checkpoint_config.to_dict()
        gpt2_config.update(overrides)
        model = cls(STLinkConfig(gpt2_config=gpt2_config, **config_kwargs))

        backbone = getattr(model, cls.base_model_prefix, model)
        targets: dict[str, list[torch.Tensor]] = {
            "ln_f.weight": [backbone.ln_f.weight],
            "ln_f.bias": [backbone.ln_f.bias],
        }
        if backbone.embeddings.wpe is not None:
            targets["wpe.weight"] = [backbone.embeddings.wpe.weight]
        for index, block in enumerate(backbone.h):
            for name, parameter in block.named_parameters():
                if name.startswith(("ln_", "attn.")):
                    targets.setdefault(f"h.{index}.{name}", []).append(parameter)
            experts = block.mlp.experts if isinstance(block.mlp, STLinkMRFFN) else [block.mlp]
            for expert in experts:
                for name, parameter in expert.named_parameters():
                    targets.setdefault(f"h.{index}.mlp.{name}", []).append(parameter)
        state = _read_gpt2_state_dict(name_or_path, set(targets))
        missing = sorted(set(targets) - set(state))
        if missing:
            raise ValueError(
                f"GPT-2 checkpoint {str(name_or_path)!r} lacks {len(missing)} tensors: {missing[:5]}"
            )
        with torch.no_grad():
            for key, parameters in targets.items():
                for parameter in parameters:
                    parameter.copy_(state[key])
        return model


class STLinkModel(STLinkPreTrainedModel):
    """GPT-2 blocks over (node, patch) tokens; returns the token states ``(B, P, N, d)``.

    The lower ``n_layer - U`` blocks are frozen but for their LayerNorms when
    ``use_partial_freeze`` is set (partially frozen attention, from ST-LLM); the upper ``U``
    blocks train and, with ``use_mrffn``, hold an MRFFN instead of the MLP. Its input is a history
    already in the forecaster's scaled space (``scaled_past_values``); [`STLinkForForecasting`]
    takes ``past_values`` in original units.

    Args:
        config: the model configuration.
    """

    main_input_name = "scaled_past_values"
    # the token encoder of STLinkForForecasting, whose output seam is its parent's
    forecasts = False

    def __init__(self, config: STLinkConfig):
        super().__init__(config)
        gpt2 = config.gpt2_config
        first_upper = gpt2.n_layer - config.num_unfrozen_layers
        self.embeddings = STLinkEmbeddings(config)
        self.rotary = STLinkRotaryEmbedding(config) if config.use_se_attention else None
        self.h = nn.ModuleList(
            [
                STLinkBlock(config, i, use_mrffn=config.use_mrffn and i >= first_upper)
                for i in range(gpt2.n_layer)
            ]
        )
        self.ln_f = nn.LayerNorm(gpt2.n_embd, eps=gpt2.layer_norm_epsilon)
        self.post_init()
        self.apply_partial_freeze()

    def check_input(self, scaled_past_values: torch.Tensor, node_index: torch.Tensor | None) -> torch.Tensor:
        """Refuse a history that disagrees with the configuration; return the node indices ``(n,)``."""
        config = self.config
        shape = tuple(scaled_past_values.shape)
        nodes = f"nodes={config.num_nodes}" if node_index is None else "nodes=len(node_index)"
        expected = f"(batch, input_len={config.input_len}, {nodes}, in_channels={config.in_channels})"
        if (
            len(shape) != 4
            or shape[1] != config.input_len
            or shape[3] != config.in_channels
            or (node_index is None and shape[2] != config.num_nodes)
        ):
            hint = "; pass node_index for a subset of the graph" if len(shape) == 4 and node_index is None else ""
            raise ValueError(f"STLinkModel expects scaled_past_values of shape {expected}; got {shape}{hint}")
        if node_index is None:
            return torch.arange(shape[2], device=scaled_past_values.device)
        check_node_index(node_index, shape[2], config.num_nodes, model="STLinkModel")
        return node_index.to(scaled_past_values.device)

    def forward(
        self,
        scaled_past_values: torch.Tensor | None = None,
        past_time_features: torch.Tensor | None = None,
        node_index: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> STLinkModelOutput:
        """Encode a history that is already in the forecaster's scaled space.

        [`STLinkForForecasting`] takes ``past_values`` in original units and scales them before
        calling this encoder.

        Args:
            scaled_past_values: ``(B, L, N, C_in)`` (required; a keyword default only so that a call with
                ``past_values`` is told the difference).
            past_time_features: ``(B, L, 2)`` int64 time-of-day slot and day of week, or ``None``.
            node_index: ``(N,)`` graph indices of the nodes in ``scaled_past_values`` when it covers a subset.
            output_hidden_states: also return the states entering each block.
            **kwargs: other batch entries, ignored.

        Returns:
            [`STLinkModelOutput`] with ``last_hidden_state`` ``(B, P, N, d)``.
        """
        if scaled_past_values is None or "past_values" in kwargs:
            raise TypeError(
                "STLinkModel encodes a scaled history, scaled_past_values (B, L, N, C_in); STLinkForForecasting "
                "takes past_values in original units and scales them itself."
            )
        node_index = self.check_input(scaled_past_values, node_index)
        batch, _, num_nodes, _ = scaled_past_values.shape
        if past_time_features is not None:
            check_time_features(past_time_features, model="STLinkModel", name="past_time_features",
                                batch_size=batch, steps=self.config.input_len,
                                steps_per_day=self.config.steps_per_day)
        num_patches = self.config.num_patches
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )

        hidden = self.embeddings(scaled_past_values, past_time_features, node_index)
        # the angles depend on the node rotation, a parameter: computed once per forward, shared by every block
        rotary = None if self.rotary is None else self.rotary(num_patches, node_index)
        states = []
        balance_losses = []
        for block in self.h:
            if output_hidden_states:
                states.append(hidden)
            hidden, balance = block(hidden, rotary)
            if balance is not None:
                balance_losses.append(balance)
        hidden = self.ln_f(hidden)
        if output_hidden_states:
            states.append(hidden)

        def to_grid(tokens: torch.Tensor) -> torch.Tensor:
            return tokens.reshape(batch, num_patches, num_nodes, -1)

        return STLinkModelOutput(
            last_hidden_state=to_grid(hidden),
            aux_loss=torch.stack(balance_losses).sum() if balance_losses else None,
            hidden_states=tuple(to_grid(s) for s in states) if output_hidden_states else None,
        )


class STLinkForForecasting(STLinkPreTrainedModel):
    """ST-LINK forecaster: scaler, RevIN, [`STLinkModel`], and a per-node head from its ``P`` tokens to ``(H, C_out)``.

    It takes ``past_values`` in original units, normalises them with the training span's
    statistics (``config.scaling``, held by ``scaler``: float32 buffers saved with the weights),
    forecasts in that scaled space and returns the forecast in original units, with the masked
    ``loss`` (``config.loss``, plus the router balance ``aux_loss``) whenever ``future_values`` is
    given, so plain ``transformers.Trainer`` trains it.

    Args:
        config: the model configuration.
    """

    main_input_name = "past_values"

    def __init__(self, config: STLinkConfig):
        super().__init__(config)
        # registered first, so a saved scaler of another graph is reported before any other mismatch
        self.scaler = STScaler(config.num_nodes, config.in_channels, config.out_channels, config.scaling,
                               model=type(self).__name__)
        self.st_link = STLinkModel(config)
        self.revin = STLinkRevIN(config) if config.use_revin else None
        self.head = nn.Linear(config.num_patches * config.hidden_size, config.horizon * config.out_channels)
        self.post_init()

    @classmethod
    def from_splits(
        cls, splits, gpt2_name_or_path: str | os.PathLike | None = None, **config_kwargs
    ) -> STLinkForForecasting:
        """A forecaster shaped and scaled for a data split: sizes, statistics and calendar come from ``splits``.

        Args:
            splits: an object with ``model_kwargs()`` (``num_nodes``, ``input_len``, ``horizon``,
                ``in_channels``, ``out_channels``, ``scaling``) and ``steps_per_day``, such as
                ``st_peft.data.build_splits(...)``.
            gpt2_name_or_path: a GPT-2 checkpoint to start from (see [`from_gpt2`]); ``None`` builds
                random GPT-2 blocks from ``gpt2_config``.
            **config_kwargs: any other [`STLinkConfig`] field (``loss``, ``gpt2_config``, ...).
        """
        config_kwargs = {**splits.model_kwargs(), "steps_per_day": splits.steps_per_day, **config_kwargs}
        if gpt2_name_or_path is not None:
            return cls.from_gpt2(gpt2_name_or_path, **config_kwargs)
        return cls(STLinkConfig(**config_kwargs))

    def _check(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor | None,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        node_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """The shared checks, and the calendar ``past_time_features`` int64 ``(B, L, 2)`` when given
        (without it the tokens carry no calendar embedding)."""
        mask = super()._check(past_values, past_observed_mask, past_time_features, future_time_features, node_index)
        if past_time_features is not None:
            config = self.config
            check_time_features(past_time_features, model=type(self).__name__, name="past_time_features",
                                batch_size=past_values.shape[0], steps=config.input_len,
                                steps_per_day=config.steps_per_day)
        return mask

    def _forecast(
        self,
        scaled_past: torch.Tensor,
        past_observed_mask: torch.Tensor,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        node_index: torch.Tensor | None,
    ) -> ScaledForecast:
        """RevIN, the GPT-2 blocks and the per-node head on the scaled history ``(B, L, n, C_in)``.

        Returns the scaled forecast ``(B, H, n, C_out)`` and ``aux_loss``, the router balance loss
        times ``router_aux_loss_coef`` (None without MRFFN). ``future_time_features`` is unused (the
        tokens carry the history's calendar), and so is ``past_observed_mask`` (the scaled history
        holds 0 where not observed).
        """
        config = self.config
        scaled, stats = scaled_past, None
        if self.revin is not None:
            scaled, stats = self.revin.normalize(scaled)
        encoded = self.st_link(scaled_past_values=scaled, past_time_features=past_time_features,
                               node_index=node_index)
        hidden = encoded.last_hidden_state
        batch, num_patches, num_nodes, width = hidden.shape
        per_node = hidden.permute(0, 2, 1, 3).reshape(batch, num_nodes, num_patches * width)
        scaled_prediction = self.head(per_node).reshape(batch, num_nodes, config.horizon, config.out_channels)
        scaled_prediction = scaled_prediction.permute(0, 2, 1, 3)
        if stats is not None:
            scaled_prediction = self.revin.denormalize(scaled_prediction, stats)
        aux_loss = None if encoded.aux_loss is None else config.router_aux_loss_coef * encoded.aux_loss
        return ScaledForecast(scaled_prediction, aux_loss=aux_loss)


__all__ = ["STLinkForForecasting", "STLinkModel", "STLinkModelOutput", "STLinkPreTrainedModel"]
