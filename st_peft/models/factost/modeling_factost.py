"""FactoST: an encoder-only temporal backbone that forecasts every series on its own.

The token pipeline of one forward pass, for ``past_values`` of shape ``(B, L, N, C)`` in
original units:

1. every (node, channel) series is cut to the last ``max_context_length`` steps and
   normalised by its own mean and standard deviation over the observed steps (its
   instance statistics, the output's ``loc`` / ``scale``: FactoST has no fixed graph, so
   this is its scaling inside the model);
2. it is left-padded (padding marked missing) to whole patches; each patch of values
   and its missing mask becomes a context token; one learned placeholder token per
   future patch follows;
3. the tokens ``(B, N, C, P, D)`` pass through ``token_hook`` -- an identity here, the
   place where the FACTOST adapter edits tokens and adds prompt tokens;
4. a register token and the prefix tokens (prompts), all at rotary position 0, precede
   the context tokens (positions ``1 .. P_ctx``) and future tokens (``P_ctx + 1 ..``), so
   prompts never move the positions the context had in pretraining;
5. rotary self-attention layers encode the sequence; a head maps each future token to
   ``patch_length`` steps of quantiles, which come back in original units with ``loss``
   whenever ``future_values`` is given (``config.loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from st_peft.checks import check_future_values, check_observed_mask
from st_peft.forecasting import (
    ForecastContext,
    ScaledForecast,
    STPreTrainedModel,
    forecast_loss,
    forecast_output,
)
from st_peft.losses import get_loss
from st_peft.metrics import pinball_loss
from st_peft.models.factost.configuration_factost import QUANTILE_LOSS, FactoSTConfig
from st_peft.outputs import ForecastOutput


@dataclass
class FactoSTTokenContext:
    """What the token hook may read besides the tokens.

    Attributes:
        num_context_patches: ``P_ctx``; tokens ``[..., :P_ctx, :]`` are context, the rest future.
        patch_time: int64 ``(B, P, F)`` calendar features of the last step of every context and
            future patch (``F`` columns as in ``past_time_features``; patches ``[:P_ctx]`` come from
            the history's, the rest from ``future_time_features``), or ``None`` when the model was
            not given both.
        node_index: int64 ``(N,)`` graph indices of the batch's nodes, or ``None`` for ``0 .. N-1``.
        codebook: ``(M, D)`` the backbone's domain prompts, for matching.
    """

    num_context_patches: int
    patch_time: torch.Tensor | None
    node_index: torch.Tensor | None
    codebook: torch.Tensor


@dataclass
class FactoSTTokenHookOutput:
    """Tokens after the hook, and the prompt tokens it wants prepended.

    Attributes:
        tokens: ``(B, N, C, P, D)`` context and future tokens.
        prefix_tokens: ``(B, N, C, K, D)`` tokens placed before the context at rotary position 0,
            or ``None``.
    """

    tokens: torch.Tensor
    prefix_tokens: torch.Tensor | None = None


class FactoSTTokenHook(nn.Module):
    """Extension point of the token pipeline; the backbone's own hook changes nothing.

    The FACTOST tuner replaces this module by a tuner layer that wraps it, so the
    adapted path and the backbone path differ only by what the hook returns.
    """

    def forward(self, tokens: torch.Tensor, context: FactoSTTokenContext) -> FactoSTTokenHookOutput:
        """Return ``tokens`` ``(B, N, C, P, D)`` unchanged and no prefix tokens."""
        return FactoSTTokenHookOutput(tokens=tokens)


def masked_instance_norm(
    values: torch.Tensor, mask: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise each series by the mean and standard deviation of its observed steps.

    Args:
        values: ``(S, L)`` series; entries where ``mask`` is False are ignored.
        mask: bool ``(S, L)``, True where observed.
        eps: added to the variance, so constant or empty series do not divide by zero.

    Returns:
        ``(normalised (S, L) with missing entries set to 0, loc (S, 1), scale (S, 1))``.
    """
    weight = mask.to(values.dtype)
    count = weight.sum(dim=1, keepdim=True).clamp_min(1.0)
    loc = (values * weight).sum(dim=1, keepdim=True) / count
    var = (((values - loc) * weight) ** 2).sum(dim=1, keepdim=True) / count
    scale = torch.sqrt(var + eps)
    return (values - loc) / scale * weight, loc, scale


def rotate_half_pairs(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Apply rotary position embeddings.

    Args:
        x: ``(S, heads, T, head_dim)`` queries or keys; ``head_dim`` is even.
        positions: ``(T,)`` position of every token (several tokens may share one).
        theta: base of the rotary frequencies.

    Returns:
        ``x`` rotated, same shape.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class FactoSTPatchEmbedding(nn.Module):
    """Residual MLP from a patch of values and its missing mask to a token.

    Input ``(S, P_ctx, 2 * patch_length)``, output ``(S, P_ctx, hidden_size)``.
    """

    def __init__(self, config: FactoSTConfig):
        super().__init__()
        width = 2 * config.patch_length
        self.hidden = nn.Linear(width, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.residual = nn.Linear(width, config.hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Embed ``(S, P_ctx, 2 * patch_length)`` patches into ``(S, P_ctx, D)`` tokens."""
        return self.output(F.gelu(self.hidden(patches))) + self.residual(patches)


class FactoSTAttention(nn.Module):
    """Bidirectional multi-head self-attention with rotary positions. ``(S, T, D) -> (S, T, D)``."""

    def __init__(self, config: FactoSTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rope_theta = float(config.rope_theta)
        self.dropout = float(config.dropout)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Attend over all ``T`` tokens of each sequence; ``positions`` is ``(T,)``."""
        batch, length, _ = hidden.shape
        qkv = self.qkv(hidden).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query = rotate_half_pairs(qkv[0], positions, self.rope_theta)
        key = rotate_half_pairs(qkv[1], positions, self.rope_theta)
        attended = F.scaled_dot_product_attention(
            query, key, qkv[2], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(attended.transpose(1, 2).reshape(batch, length, -1))


class FactoSTEncoderLayer(nn.Module):
    """Pre-norm transformer layer: rotary attention, then a GELU feed-forward. ``(S, T, D) -> (S, T, D)``."""

    def __init__(self, config: FactoSTConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attention = FactoSTAttention(config)
        self.feed_forward_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.feed_forward = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Update ``hidden`` ``(S, T, D)``; ``positions`` ``(T,)`` are the rotary positions."""
        hidden = hidden + self.dropout(self.attention(self.attention_norm(hidden), positions))
        return hidden + self.dropout(self.feed_forward(self.feed_forward_norm(hidden)))


class FactoSTPreTrainedModel(STPreTrainedModel):
    """Weight initialisation and loading glue shared by FactoST models."""

    config: FactoSTConfig
    config_class = FactoSTConfig
    base_model_prefix = "factost"
    main_input_name = "past_values"
    _no_split_modules = ["FactoSTEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        PreTrainedModel._init_weights(self, module)
        if isinstance(module, FactoSTModel):
            std = self.config.initializer_range
            init.normal_(module.register_token, mean=0.0, std=std)
            init.normal_(module.future_token, mean=0.0, std=std)
            # Unit-scale codebook entries keep cosine matching well spread at initialisation.
            init.normal_(module.domain_prompts, mean=0.0, std=1.0 / math.sqrt(self.config.hidden_size))


class FactoSTModel(FactoSTPreTrainedModel):
    """FactoST backbone: ``(B, L, N, C)`` history in, ``(B, H, N, C)`` forecast and quantiles out.

    Every (node, channel) series is forecast independently, in original units; the model knows
    nothing of the graph and takes any number of nodes. The FACTOST PEFT adapter adds the
    spatio-temporal parts through ``token_hook``.
    """

    forecasts_nodes_independently = True

    def __init__(self, config: FactoSTConfig):
        super().__init__(config)
        self.patch_embedding = FactoSTPatchEmbedding(config)
        self.register_token = nn.Parameter(torch.empty(config.hidden_size))
        self.future_token = nn.Parameter(torch.empty(config.hidden_size))
        self.domain_prompts = nn.Parameter(torch.empty(config.num_domain_prompts, config.hidden_size))
        self.token_hook = FactoSTTokenHook()
        self.layers = nn.ModuleList(FactoSTEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.head = nn.Linear(config.hidden_size, config.patch_length * len(config.quantiles))
        self.post_init()

    def match_domain_prompts(self, query: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
        """Pick the codebook entries closest (cosine) to each query.

        Args:
            query: ``(..., D)`` one summary vector per series.
            top_k: number of entries; defaults to ``config.prompt_top_k``.

        Returns:
            ``(..., top_k, D)`` the matched codebook entries, best match first.
        """
        top_k = top_k or self.config.prompt_top_k
        similarity = F.normalize(query, dim=-1) @ F.normalize(self.domain_prompts, dim=-1).T
        index = similarity.topk(top_k, dim=-1).indices
        return self.domain_prompts[index]

    def forward(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor | None = None,
        past_time_features: torch.Tensor | None = None,
        future_time_features: torch.Tensor | None = None,
        future_values: torch.Tensor | None = None,
        future_observed_mask: torch.Tensor | None = None,
        node_index: torch.Tensor | None = None,
        horizon: int | None = None,
        rollout: bool = False,
        use_domain_prompts: bool = False,
        **kwargs: Any,
    ) -> ForecastOutput:
        """Forecast every series of ``past_values`` in its original units.

        Args:
            past_values: ``(B, L, N, C)`` history in original units (any affine scaling works the
                same: each series is normalised on its own). NaN entries count as missing, and so do
                entries equal to ``config.missing_value`` when no ``past_observed_mask`` is given.
            past_observed_mask: bool ``(B, L, N, C)``, True where observed.
            past_time_features: int64 ``(B, L, F)`` calendar features of the history, for the adapter.
            future_time_features: int64 ``(B, H', F)`` calendar features of the horizon (``H' >= H``),
                for the adapter.
            future_values: ``(B, H, N, C)`` targets in original units; when given the output holds
                ``loss`` (``config.loss``, masked, over the observed targets).
            future_observed_mask: bool ``(B, H, N, C)``, True where the target was observed; by
                default every finite target.
            node_index: int64 ``(N,)`` graph indices of the batch's nodes, for the adapter.
            horizon: steps ``H`` to forecast; by default ``future_time_features.shape[1]``, else
                ``future_values.shape[1]``, else ``config.max_horizon``.
            rollout: allow horizons above ``config.max_horizon`` by feeding median forecasts back.
            use_domain_prompts: prepend the ``prompt_top_k`` codebook entries closest to each series.
            **kwargs: other batch entries (``num_items_in_batch``), ignored.

        Returns:
            :class:`~st_peft.outputs.ForecastOutput` with ``prediction_outputs`` ``(B, H, N, C)`` (the
            0.5 quantile) and ``quantile_outputs`` ``(B, H, N, C, Q)`` in original units, ``loc`` /
            ``scale`` ``(B, 1, N, C)`` (each series' instance statistics), and ``loss`` when
            ``future_values`` is given.
        """
        name = type(self).__name__
        horizon = self._check_inputs(
            past_values, past_time_features, future_time_features, future_values, horizon, rollout
        )
        mask = check_observed_mask(past_observed_mask, past_values, model=name, name="past_observed_mask",
                                   values_name="past_values") & torch.isfinite(past_values)
        if past_observed_mask is None and self.config.missing_value is not None:
            mask = mask & (past_values != self.config.missing_value)
        values = torch.where(mask, past_values, torch.zeros_like(past_values))
        past_mask = mask
        history_time = past_time_features
        pieces = []
        loc = scale = None
        done = 0
        while done < horizon:
            step = min(horizon - done, self.config.max_horizon)
            step_time = None if future_time_features is None else future_time_features[:, done : done + step]
            normalised, pass_loc, pass_scale = self._forecast_once(
                values, mask, history_time, step_time, step, node_index, use_domain_prompts
            )
            if loc is None:
                loc, scale = pass_loc, pass_scale
            else:
                # a later pass normalised its longer history by that history's statistics
                in_units = normalised * pass_scale[..., None] + pass_loc[..., None]
                normalised = (in_units - loc[..., None]) / scale[..., None]
            pieces.append(normalised)
            done += step
            if done < horizon:
                median = normalised[..., self.config.median_index] * scale + loc
                values = torch.cat((values, median), dim=1)
                mask = torch.cat((mask, torch.ones_like(median, dtype=torch.bool)), dim=1)
                history_time = None if history_time is None or step_time is None else torch.cat(
                    (history_time, step_time), dim=1
                )
        scaled_quantiles = torch.cat(pieces, dim=1)
        # the history in the first pass's instance normalisation, the space of the forecast
        scaled_past = torch.where(past_mask, (past_values - loc) / scale, torch.zeros_like(past_values))
        forecast = self.forecast_seam(
            ScaledForecast(scaled_quantiles[..., self.config.median_index], scaled_quantiles),
            ForecastContext(scaled_past, past_mask, node_index),
        )
        quantile_loss = self.config.loss == QUANTILE_LOSS
        # forecast_output scores the point forecast; the pinball loss scores every quantile, below
        output = forecast_output(
            forecast.prediction, loc, scale, model=name,
            loss_fn=get_loss("mae" if quantile_loss else self.config.loss),
            future_values=None if quantile_loss else future_values, future_observed_mask=future_observed_mask,
            scaled_quantiles=forecast.quantiles, aux_loss=forecast.aux_loss,
        )
        if quantile_loss and future_values is not None:
            output["loss"] = self._quantile_loss(output, future_values, future_observed_mask)
        return output

    def _quantile_loss(
        self, output: ForecastOutput, future_values: torch.Tensor, future_observed_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Pinball loss of the quantile forecasts against ``future_values`` ``(B, H, N, C)``, masked, original units."""
        name = type(self).__name__
        batch, horizon, nodes, channels = output.prediction_outputs.shape
        check_future_values(future_values, model=name, batch_size=batch, horizon=horizon, nodes=nodes,
                            out_channels=channels)
        levels = list(self.config.quantiles)
        return forecast_loss(
            output.quantile_outputs, future_values, future_observed_mask,
            lambda quantiles, target, mask: pinball_loss(quantiles, target, levels, mask=mask), model=name,
        )

    def _check_inputs(
        self,
        past_values: torch.Tensor,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        future_values: torch.Tensor | None,
        horizon: int | None,
        rollout: bool,
    ) -> int:
        """Refuse inputs the model cannot forecast from, naming the tensors and shapes; return the horizon."""
        name = type(self).__name__
        if not isinstance(past_values, torch.Tensor) or past_values.dim() != 4:
            got = (
                f"a {past_values.dim()}-d tensor of shape {tuple(past_values.shape)}"
                if isinstance(past_values, torch.Tensor) else type(past_values).__name__
            )
            raise ValueError(f"{name} expects past_values of shape (batch, time, nodes, channels); got {got}.")
        if past_values.shape[1] < self.config.patch_length:
            raise ValueError(
                f"past_values has shape {tuple(past_values.shape)}: its history of {past_values.shape[1]} steps is "
                f"shorter than one patch ({self.config.patch_length} steps); give at least "
                f"{self.config.patch_length} steps or use a model with a shorter patch_length."
            )
        if horizon is None:
            given = [t for t in (future_time_features, future_values) if isinstance(t, torch.Tensor) and t.dim() > 1]
            horizon = given[0].shape[1] if given else self.config.max_horizon
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}.")
        if horizon > self.config.max_horizon and not rollout:
            raise ValueError(
                f"horizon {horizon} exceeds the model's max_horizon ({self.config.max_horizon}); "
                "pass rollout=True to forecast it in several passes."
            )
        self._check_time_features(past_values, past_time_features, future_time_features, horizon)
        return horizon

    def _check_time_features(
        self,
        past_values: torch.Tensor,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        horizon: int,
    ) -> None:
        """Refuse calendar features of the wrong shape or dtype; their ranges are the adapter's to check."""
        name = type(self).__name__
        batch, length = past_values.shape[:2]
        columns = {}
        for label, features, expected in (
            ("past_time_features", past_time_features, f"({batch}, {length}, F)"),
            ("future_time_features", future_time_features, f"({batch}, H >= {horizon}, F)"),
        ):
            if features is None:
                continue
            steps_ok = features.shape[1] == length if label == "past_time_features" else features.shape[1] >= horizon
            if features.dim() != 3 or features.shape[0] != batch or not steps_ok:
                raise ValueError(
                    f"{name}: {label} has shape {tuple(features.shape)} but past_values has shape "
                    f"{tuple(past_values.shape)} and the horizon is {horizon}, so it must be {expected}."
                )
            if features.dtype.is_floating_point or features.dtype == torch.bool:
                raise ValueError(f"{name} expects integer {label} (calendar slots); got dtype {features.dtype}.")
            columns[label] = features.shape[-1]
        if len(set(columns.values())) > 1:
            raise ValueError(
                f"{name}: past_time_features has shape {tuple(past_time_features.shape)} but future_time_features has "
                f"shape {tuple(future_time_features.shape)}; they must have the same number of calendar columns F."
            )

    def _forecast_once(
        self,
        values: torch.Tensor,
        mask: torch.Tensor,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        horizon: int,
        node_index: torch.Tensor | None,
        use_domain_prompts: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One encoder pass over a ``(B, L, N, C)`` history.

        Returns:
            ``(normalised quantiles (B, horizon, N, C, Q), loc (B, 1, N, C), scale (B, 1, N, C))``:
            the quantiles in units of each series' instance statistics, ``quantile * scale + loc``
            in original units.
        """
        config = self.config
        values = values[:, -config.max_context_length :]
        mask = mask[:, -config.max_context_length :]
        if past_time_features is not None:
            past_time_features = past_time_features[:, -config.max_context_length :]
        batch, length, nodes, channels = values.shape
        series = values.permute(0, 2, 3, 1).reshape(-1, length)
        series_mask = mask.permute(0, 2, 3, 1).reshape(-1, length)
        normalised, loc, scale = masked_instance_norm(series, series_mask, config.norm_eps)

        pad = (-length) % config.patch_length
        normalised = F.pad(normalised, (pad, 0))
        series_mask = F.pad(series_mask, (pad, 0), value=False)
        num_context = normalised.shape[1] // config.patch_length
        num_future = -(-horizon // config.patch_length)
        patches = torch.cat(
            (
                normalised.view(-1, num_context, config.patch_length),
                series_mask.view(-1, num_context, config.patch_length).to(normalised.dtype),
            ),
            dim=-1,
        )
        # the series' statistics stay in the input's precision; the network computes in its weights' dtype
        context_tokens = self.patch_embedding(patches.to(self.future_token.dtype))
        future_tokens = self.future_token.expand(context_tokens.shape[0], num_future, -1)
        tokens = torch.cat((context_tokens, future_tokens), dim=1)
        tokens = tokens.view(batch, nodes, channels, num_context + num_future, -1)

        hook_context = FactoSTTokenContext(
            num_context_patches=num_context,
            patch_time=self._patch_time(past_time_features, future_time_features, pad, num_context, num_future),
            node_index=node_index,
            codebook=self.domain_prompts,
        )
        hooked = self.token_hook(tokens, hook_context)
        width = tokens.shape[-1]
        tokens = hooked.tokens.reshape(-1, num_context + num_future, width)
        prefixes = [self.register_token.expand(tokens.shape[0], 1, -1)]
        if hooked.prefix_tokens is not None:
            prefixes.append(hooked.prefix_tokens.reshape(tokens.shape[0], -1, width))
        if use_domain_prompts:
            prefixes.append(self.match_domain_prompts(tokens[:, :num_context].mean(dim=1)))
        prefix = torch.cat(prefixes, dim=1)
        hidden = torch.cat((prefix, tokens), dim=1)
        positions = torch.cat(
            (
                torch.zeros(prefix.shape[1], device=hidden.device),
                torch.arange(1, num_context + num_future + 1, device=hidden.device, dtype=torch.float32),
            )
        )
        for layer in self.layers:
            hidden = layer(hidden, positions)
        future = self.final_norm(hidden[:, -num_future:])
        quantiles = self.head(future).view(-1, num_future * config.patch_length, len(config.quantiles))
        # Sorting keeps the quantile levels from crossing; gradients flow through the sort.
        quantiles = quantiles[:, :horizon].sort(dim=-1).values
        quantiles = quantiles.view(batch, nodes, channels, horizon, -1).permute(0, 3, 1, 2, 4)
        loc, scale = (statistic.view(batch, 1, nodes, channels) for statistic in (loc, scale))
        return quantiles, loc, scale

    def _patch_time(
        self,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        pad: int,
        num_context: int,
        num_future: int,
    ) -> torch.Tensor | None:
        """Calendar features ``(B, P_ctx + P_fut, F)`` of the last step of every patch, or ``None``.

        The first context patch may be padded on the left, but its last step is always real.
        A future patch that reaches past ``future_time_features`` takes the last step it covers.
        """
        if past_time_features is None or future_time_features is None:
            return None
        patch = self.config.patch_length
        context_ends = torch.arange(1, num_context + 1, device=past_time_features.device) * patch - 1 - pad
        future_ends = (torch.arange(1, num_future + 1, device=future_time_features.device) * patch - 1).clamp_max(
            future_time_features.shape[1] - 1
        )
        return torch.cat((past_time_features[:, context_ends], future_time_features[:, future_ends]), dim=1)


__all__ = [
    "FactoSTModel",
    "FactoSTPreTrainedModel",
    "FactoSTTokenContext",
    "FactoSTTokenHook",
    "FactoSTTokenHookOutput",
    "masked_instance_norm",
]
