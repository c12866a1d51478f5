"""The FACTOST adapter's parts and the tuner layer that applies them to the backbone's tokens.

All tensors of tokens are ``(B, N, C, P, D)``: batch, nodes, channels, patches (context
first, then future), token width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from st_peft.models.factost.modeling_factost import FactoSTTokenContext, FactoSTTokenHookOutput
from st_peft.tuners.factost.config import FactoSTAdapterConfig

MERGE_REFUSAL = (
    "FACTOST adapters add tokens, gates and embeddings to the backbone's token pipeline; there are no "
    "weights to merge them into. Use unload() to get the backbone back, or keep the PeftModel."
)


class MetadataFusion(nn.Module):
    """Adds a projected node embedding and projected calendar embeddings to every token.

    Both projections start at zero, so a new adapter's fusion adds nothing until trained.

    Args:
        num_nodes: rows of the node embedding.
        calendar_sizes: number of values of every calendar column.
        node_dim: width of the node embedding.
        calendar_dim: width of each calendar embedding.
        hidden_size: token width ``D``.
        init_weights: False keeps the projections' random initialisation.
    """

    def __init__(
        self,
        num_nodes: int,
        calendar_sizes: list[int],
        node_dim: int,
        calendar_dim: int,
        hidden_size: int,
        init_weights: bool = True,
    ):
        super().__init__()
        self.calendar_sizes = list(calendar_sizes)
        self.node_embedding = nn.Embedding(num_nodes, node_dim)
        self.calendar_embeddings = nn.ModuleList(nn.Embedding(size, calendar_dim) for size in calendar_sizes)
        self.node_projection = nn.Linear(node_dim, hidden_size, bias=False)
        self.calendar_projection = nn.Linear(calendar_dim * len(calendar_sizes), hidden_size)
        if init_weights:
            nn.init.zeros_(self.node_projection.weight)
            nn.init.zeros_(self.calendar_projection.weight)
            nn.init.zeros_(self.calendar_projection.bias)

    def forward(self, tokens: torch.Tensor, context: FactoSTTokenContext) -> torch.Tensor:
        """Return ``tokens`` ``(B, N, C, P, D)`` plus node and calendar terms."""
        nodes = self._node_index(tokens.shape[1], context.node_index, tokens.device)
        patch_time = self._check_calendar(context)
        node_term = self.node_projection(self.node_embedding(nodes))
        calendar = torch.cat(
            [embedding(patch_time[..., column]) for column, embedding in enumerate(self.calendar_embeddings)], dim=-1
        )
        time_term = self.calendar_projection(calendar)
        return tokens + node_term[None, :, None, None, :] + time_term[:, None, None, :, :]

    def _node_index(self, nodes: int, node_index: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        known = self.node_embedding.num_embeddings
        if node_index is None:
            if nodes != known:
                raise ValueError(
                    f"past_values has {nodes} nodes but the FACTOST adapter was built for num_nodes={known}; "
                    "pass node_index (N,) when a batch covers a subset of the graph."
                )
            return torch.arange(nodes, device=device)
        if node_index.shape != (nodes,):
            raise ValueError(
                f"node_index has shape {tuple(node_index.shape)} but past_values has {nodes} nodes; "
                f"it must be ({nodes},)."
            )
        if int(node_index.min()) < 0 or int(node_index.max()) >= known:
            raise ValueError(
                f"node_index holds values in [{int(node_index.min())}, {int(node_index.max())}] but the adapter "
                f"knows nodes 0 .. {known - 1}."
            )
        return node_index.to(device)

    def _check_calendar(self, context: FactoSTTokenContext) -> torch.Tensor:
        """The patches' calendar features ``(B, P, F)``, refused when missing or outside ``calendar_sizes``."""
        patch_time = context.patch_time
        if patch_time is None:
            raise ValueError(
                "FACTOST metadata fusion needs calendar features: pass past_time_features (B, L, F) and "
                "future_time_features (B, H, F) to the model, or build the adapter with use_metadata=False."
            )
        if patch_time.shape[-1] != len(self.calendar_sizes):
            raise ValueError(
                f"the calendar features have {patch_time.shape[-1]} columns (past_time_features / "
                f"future_time_features of shape (B, steps, {patch_time.shape[-1]})) but the adapter was built for "
                f"{len(self.calendar_sizes)} (calendar_sizes={self.calendar_sizes})."
            )
        split = context.num_context_patches
        parts = {"past_time_features": patch_time[:, :split], "future_time_features": patch_time[:, split:]}
        for name, part in parts.items():
            if part.numel() == 0:
                continue
            for column, size in enumerate(self.calendar_sizes):
                low, high = int(part[..., column].min()), int(part[..., column].max())
                if low < 0 or high >= size:
                    raise ValueError(
                        f"{name} column {column} holds values from {low} to {high} but the FACTOST adapter allows "
                        f"0 .. {size - 1} (calendar_sizes={self.calendar_sizes}; check steps_per_day of the adapter "
                        "config)."
                    )
        return patch_time


class InteractionFilter(nn.Module):
    """Gates every token by spatial, temporal and lagged interaction scores.

    Three small attentions summarise, for every token, the tokens of the other nodes at the
    same patch (spatial, softmax over ``N`` keys), the other patches of the same series
    (temporal, over ``P`` keys) and the same series' last ``max_lag`` patches plus itself
    (lagged, over up to ``max_lag + 1`` keys). Their summaries set a gate
    ``1 + tanh(W s)`` per token and width; ``W`` starts at zero, so the gate starts at 1.

    Args:
        hidden_size: token width ``D``.
        rank: width of the queries, keys and values of each score.
        max_lag: patches back the lagged score looks.
        init_weights: False keeps ``W``'s random initialisation.
    """

    def __init__(self, hidden_size: int, rank: int, max_lag: int, init_weights: bool = True):
        super().__init__()
        self.rank = rank
        self.max_lag = max_lag
        self.norm = nn.LayerNorm(hidden_size)
        self.spatial = nn.Linear(hidden_size, 3 * rank)
        self.temporal = nn.Linear(hidden_size, 3 * rank)
        self.lagged = nn.Linear(hidden_size, 3 * rank)
        self.gate = nn.Linear(3 * rank, hidden_size)
        if init_weights:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def forward(self, tokens: torch.Tensor, context: FactoSTTokenContext) -> torch.Tensor:
        """Return ``tokens`` ``(B, N, C, P, D)`` multiplied by their gates."""
        normed = self.norm(tokens)
        query, key, value = self.spatial(normed).movedim(1, 3).chunk(3, dim=-1)
        spatial = F.scaled_dot_product_attention(query, key, value).movedim(3, 1)
        query, key, value = self.temporal(normed).chunk(3, dim=-1)
        temporal = F.scaled_dot_product_attention(query, key, value)
        lagged = self._lagged(*self.lagged(normed).chunk(3, dim=-1))
        gate = 1.0 + torch.tanh(self.gate(torch.cat((spatial, temporal, lagged), dim=-1)))
        return tokens * gate

    def _lagged(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention of each patch over itself and its ``max_lag`` predecessors; ``(..., P, r)`` in and out."""
        patches = query.shape[-2]
        lags = range(min(self.max_lag, patches - 1) + 1)
        shifted_keys = torch.stack([F.pad(key, (0, 0, lag, 0))[..., :patches, :] for lag in lags], dim=-2)
        shifted_values = torch.stack([F.pad(value, (0, 0, lag, 0))[..., :patches, :] for lag in lags], dim=-2)
        scores = (query[..., None, :] * shifted_keys).sum(dim=-1) / math.sqrt(self.rank)
        position = torch.arange(patches, device=query.device)[:, None]
        valid = position >= torch.tensor(list(lags), device=query.device)[None, :]
        weights = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1)
        return (weights[..., None] * shifted_values).sum(dim=-2)


class DomainPrompts(nn.Module):
    """Prompt tokens: the backbone's codebook entries closest to each series plus a learned low-rank part.

    Each series' query is the mean of its (adapted) context tokens; its ``num_tokens`` best
    cosine matches in the frozen codebook are taken in order of similarity, and prompt slot
    ``k`` adds row ``k`` of the learned ``down @ up`` (``up`` starts at zero).

    The backbone takes them as gated prompts (``FactoSTTokenHookOutput.prefix_gate``): the other
    tokens see prompt ``k`` through its ``gate[k]``, which starts at zero (as peft's adaption
    prompts), so a new adapter's prompts leave the forecast exactly as the backbone's.

    Args:
        hidden_size: token width ``D``.
        num_tokens: prompt tokens ``K``.
        rank: rank of the learned part.
        init_weights: False draws ``up`` at random too and opens the gates (1).
    """

    def __init__(self, hidden_size: int, num_tokens: int, rank: int, init_weights: bool = True):
        super().__init__()
        self.num_tokens = num_tokens
        self.down = nn.Parameter(torch.randn(num_tokens, rank) / math.sqrt(rank))
        up = torch.zeros(rank, hidden_size)
        self.up = nn.Parameter(up if init_weights else torch.randn_like(up) / math.sqrt(hidden_size))
        self.gate = nn.Parameter(torch.zeros(num_tokens) if init_weights else torch.ones(num_tokens))

    def forward(self, tokens: torch.Tensor, context: FactoSTTokenContext) -> torch.Tensor:
        """Prompt tokens ``(B, N, C, K, D)`` for ``tokens`` ``(B, N, C, P, D)``."""
        codebook = context.codebook.to(self.up.dtype)
        if codebook.shape[0] < self.num_tokens:
            raise ValueError(
                f"the adapter asks for {self.num_tokens} prompt tokens but the backbone's codebook has only "
                f"{codebook.shape[0]} entries."
            )
        query = tokens[..., : context.num_context_patches, :].mean(dim=-2)
        similarity = F.normalize(query, dim=-1) @ F.normalize(codebook, dim=-1).T
        matched = codebook[similarity.topk(self.num_tokens, dim=-1).indices]
        return matched + self.down @ self.up


class FactoSTAdapterLayer(nn.Module, BaseTunerLayer):
    """Tuner layer around the backbone's token hook; holds every adapter's parts by name.

    With adapters disabled it returns exactly what the wrapped hook returns. Otherwise each
    active adapter in turn adds its metadata terms, gates the tokens, and contributes its
    prompt tokens to the prefix.

    dtypes follow LoRA: a new adapter takes the backbone's dtype (which PEFT's
    ``autocast_adapter_dtype`` then raises from float16 / bfloat16 to float32); each adapter reads
    the tokens cast to its own dtype, and the tokens and prompts go back to the backbone in the
    tokens' dtype.

    Args:
        base_layer: the backbone's ``FactoSTTokenHook``.
        adapter_name: name of the first adapter.
        config: its configuration.
        hidden_size: the backbone's token width ``D``.
        device, dtype: those of the backbone's weights (the hook has none of its own).

    Attributes:
        in_features, out_features: the token width ``D``, in and out.
    """

    adapter_layer_names = ("factost_metadata", "factost_filter", "factost_prompts")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: FactoSTAdapterConfig,
        hidden_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = self.in_features = self.out_features = hidden_size
        self.factost_metadata = nn.ModuleDict()
        self.factost_filter = nn.ModuleDict()
        self.factost_prompts = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, device, dtype)

    def update_layer(
        self,
        adapter_name: str,
        config: FactoSTAdapterConfig,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build the parts that ``config`` switches on under ``adapter_name``, on the backbone's device and dtype.

        Parts created on the meta device (``low_cpu_mem_usage=True``, to be loaded) stay there.
        """
        self._backbone_placement = (device, dtype)
        if config.use_metadata:
            self.factost_metadata[adapter_name] = MetadataFusion(
                config.num_nodes,
                config.calendar_sizes,
                config.node_embedding_dim,
                config.calendar_embedding_dim,
                self.hidden_size,
                init_weights=config.init_weights,
            )
        if config.use_interaction:
            self.factost_filter[adapter_name] = InteractionFilter(
                self.hidden_size, config.filter_rank, config.max_lag, init_weights=config.init_weights
            )
        if config.use_prompts:
            self.factost_prompts[adapter_name] = DomainPrompts(
                self.hidden_size, config.num_prompt_tokens, config.prompt_rank, init_weights=config.init_weights
            )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
        """The backbone's device and dtype, given at creation: the token hook has no weight to read them from."""
        return self._backbone_placement

    def forward(self, tokens: torch.Tensor, context: FactoSTTokenContext) -> FactoSTTokenHookOutput:
        """Adapt ``tokens`` ``(B, N, C, P, D)``; prompt tokens come back as ``prefix_tokens`` ``(B, N, C, K, D)``.

        Both come back in the dtype of ``tokens``.
        """
        output = self.base_layer(tokens, context)
        if self.disable_adapters:
            return output
        dtype = tokens.dtype
        tokens = output.tokens
        prefixes = [] if output.prefix_tokens is None else [output.prefix_tokens]
        gates = [] if output.prefix_gate is None else [output.prefix_gate.to(dtype)]
        for name in self.active_adapters:
            parts = [part[name] for part in (self.factost_metadata, self.factost_filter, self.factost_prompts)
                     if name in part]
            if not parts:
                continue
            tokens = self._cast_input_dtype(tokens, next(parts[0].parameters()).dtype)
            if name in self.factost_metadata:
                tokens = self.factost_metadata[name](tokens, context)
            if name in self.factost_filter:
                tokens = self.factost_filter[name](tokens, context)
            if name in self.factost_prompts:
                prefixes.append(self.factost_prompts[name](tokens, context).to(dtype))
                gates.append(self.factost_prompts[name].gate.to(dtype))
        if len(gates) not in (0, len(prefixes)):
            raise ValueError("the wrapped token hook returns ungated prefix tokens; FACTOST's prompts are gated and "
                             "cannot be mixed with them")
        prefix = torch.cat(prefixes, dim=-2) if prefixes else None
        gate = torch.cat(gates) if gates else None
        return FactoSTTokenHookOutput(tokens=tokens.to(dtype), prefix_tokens=prefix, prefix_gate=gate)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """FACTOST adapters cannot be merged; always raises."""
        raise ValueError(MERGE_REFUSAL)

    def unmerge(self) -> None:
        """Nothing is ever merged, so there is nothing to undo."""

    def __repr__(self) -> str:
        return "factost." + super().__repr__()
