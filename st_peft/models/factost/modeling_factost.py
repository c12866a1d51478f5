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
from st_peft.forecasting import ScaledForecast, STPreTrainedModel, forecast_loss, forecast_output
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
        prefix_gate: ``(K,)`` or ``None``. ``None``: the prefix tokens join the sequence as ordinary
            tokens. Given: they are gated prompts (as peft's adaption prompts): they attend to every
            token, while the other tokens see them only through a second softmax whose values are
            multiplied by the gate, so a gate of 0 leaves every other token exactly as without them.
    """

    tokens: torch.Tensor
    prefix_tokens: torch.Tensor | None = None
    prefix_gate: torch.Tensor | None = None


class FactoSTTokenHook(nn.Module):
    """Extension point of the token pipeline; the backbone's own hook changes nothing.

    The FACTOST tuner replaces this module by a tuner layer that wraps it, so the
    adapted path and the backbone path differ only by what the hook returns.
    """

    def forward(self, tokens: torch.Tensor, context: FactoSTTokenContext) -> FactoSTTokenHookOutput:
        """Return ``tokens`` ``(B, N, C, P, D)`` unchanged and no prefix tokens."""
        return FactoSTTokenHookOutput(tokens=tokens)


def masked_instance_statistics(
    values: torch.Tensor, mask: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each series over its observed steps.

    Args:
        values: ``(S, L)`` series; entries where ``mask`` is False are ignored.
        mask: bool ``(S, L)``, True where observed.
        eps: added to the variance, so constant or empty series do not divide by zero.

    Returns:
        ``(loc (S, 1), scale (S, 1))``.
    """
    weight = mask.to(values.dtype)
    count = weight.sum(dim=1, keepdim=True).clamp_min(1.0)
    loc = (values * weight).sum(dim=1, keepdim=True) / count
    var = (((values - loc) * weight) ** 2).sum(dim=1, keepdim=True) / count
    return loc, torch.sqrt(var + eps)


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
    loc, scale = masked_instance_statistics(values, mask, eps)
    return (values - loc) / scale * mask.to(values.dtype), loc, scale


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

    def forward_with_prompts(
        self, hidden: torch.Tensor, positions: torch.Tensor, prompts: torch.Tensor, gate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention with gated prompts (at rotary position 0) beside the sequence.

        Args:
            hidden: ``(S, T, D)`` the sequence; ``positions`` ``(T,)`` its rotary positions.
            prompts: ``(S, K, D)`` prompt tokens.
            gate: ``(K,)`` weight of each prompt's value for the sequence.

        Returns:
            ``(S, T, D)`` for the sequence, exactly :meth:`forward` plus the gated prompt term, and
            ``(S, K, D)`` for the prompts, which attend to the prompts and the sequence.
        """
        batch, length, _ = hidden.shape
        qkv = self.qkv(hidden).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query = rotate_half_pairs(qkv[0], positions, self.rope_theta)
        key = rotate_half_pairs(qkv[1], positions, self.rope_theta)
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(query, key, qkv[2], dropout_p=dropout)
        count = prompts.shape[1]
        prompt_qkv = self.qkv(prompts).view(batch, count, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        origin = torch.zeros(count, device=prompts.device)
        prompt_query = rotate_half_pairs(prompt_qkv[0], origin, self.rope_theta)
        prompt_key = rotate_half_pairs(prompt_qkv[1], origin, self.rope_theta)
        gated_value = prompt_qkv[2] * gate.to(prompt_qkv.dtype).view(1, 1, count, 1)
        attended = attended + F.scaled_dot_product_attention(query, prompt_key, gated_value, dropout_p=dropout)
        prompt_attended = F.scaled_dot_product_attention(
            prompt_query, torch.cat((prompt_key, key), dim=2), torch.cat((prompt_qkv[2], qkv[2]), dim=2),
            dropout_p=dropout,
        )
        return (
            self.out(attended.transpose(1, 2).reshape(batch, length, -1)),
            self.out(prompt_attended.transpose(1, 2).reshape(batch, count, -1)),
        )


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

    def forward_with_prompts(
        self, hidden: torch.Tensor, positions: torch.Tensor, prompts: torch.Tensor, gate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update ``hidden`` ``(S, T, D)`` and gated ``prompts`` ``(S, K, D)`` (see ``FactoSTAttention.forward_with_prompts``)."""
        attended, prompt_attended = self.attention.forward_with_prompts(
            self.attention_norm(hidden), positions, self.attention_norm(prompts), gate
        )
        hidden = hidden + self.dropout(attended)
        prompts = prompts + self.dropout(prompt_attended)
        hidden = hidden + self.dropout(self.feed_forward(self.feed_forward_norm(hidden)))
        return hidden, prompts + self.dropout(self.feed_forward(self.feed_forward_norm(prompts)))


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

        One pass is the path of every st-peft model (:meth:`_check`, :meth:`_scale` by each
        series' instance statistics, :meth:`_forecast`, ``forecast_seam``, :meth:`_output`);
        a rollout runs it once per ``max_horizon`` steps.

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
            ``scale`` ``(B, 1, N, C)`` (each series' instance statistics; of the first pass in a
            rollout), and ``loss`` when ``future_values`` is given.
        """
        horizon = self._horizon(future_time_features, future_values, horizon, rollout)
        if horizon <= self.config.max_horizon:
            return self._forecast_path(past_values, past_observed_mask, past_time_features, future_time_features,
                                       future_values, future_observed_mask, node_index, horizon=horizon,
                                       use_domain_prompts=use_domain_prompts)
        return self._rollout(past_values, past_observed_mask, past_time_features, future_time_features,
                             future_values, future_observed_mask, node_index, horizon, use_domain_prompts)

    def _horizon(
        self,
        future_time_features: torch.Tensor | None,
        future_values: torch.Tensor | None,
        horizon: int | None,
        rollout: bool,
    ) -> int:
        """The horizon to forecast (given, else that of the calendar or the targets, else ``max_horizon``)."""
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
        return horizon

    def _rollout(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor | None,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        future_values: torch.Tensor | None,
        future_observed_mask: torch.Tensor | None,
        node_index: torch.Tensor | None,
        horizon: int,
        use_domain_prompts: bool,
    ) -> ForecastOutput:
        """Forecast ``horizon > max_horizon`` steps in passes of the forward path, each pass's median fed back.

        Every pass after the first is expressed through the first pass's ``loc`` / ``scale`` (the
        output's) the way FactoST always expressed it, and every fed-back median is its own branch
        of the graph, so outputs and gradients are those of FactoST's rollout bit for bit.
        """
        mask = self._check(past_values, past_observed_mask, past_time_features, future_time_features, node_index,
                           horizon=horizon)
        values = torch.where(mask, past_values, torch.zeros_like(past_values))
        history_time = past_time_features
        predictions, quantiles, aux_losses = [], [], []
        loc = scale = None
        done = 0
        while done < horizon:
            step = min(horizon - done, self.config.max_horizon)
            step_time = None if future_time_features is None else future_time_features[:, done:]
            output = self._forecast_path(values, mask, history_time, step_time, None, None, node_index,
                                         horizon=step, use_domain_prompts=use_domain_prompts)
            if output.aux_loss is not None:
                aux_losses.append(output.aux_loss)
            if loc is None:
                loc, scale = output.loc, output.scale
                piece, median = output.quantile_outputs, output.prediction_outputs
            else:
                normalised = (output.quantile_outputs - loc[..., None]) / scale[..., None]
                piece = normalised * scale.unsqueeze(-1) + loc.unsqueeze(-1)
                median = normalised[..., self.config.median_index] * scale + loc
            quantiles.append(piece)
            predictions.append(piece[..., self.config.median_index])
            done += step
            if done < horizon:
                values = torch.cat((values, median), dim=1)
                mask = torch.cat((mask, torch.ones_like(median, dtype=torch.bool)), dim=1)
                history_time = None if history_time is None or step_time is None else torch.cat(
                    (history_time, step_time[:, :step]), dim=1
                )
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        return self._scored(torch.cat(predictions, dim=1), torch.cat(quantiles, dim=1), loc, scale, aux_loss,
                            future_values, future_observed_mask)

    def _check(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor | None,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        node_index: torch.Tensor | None,
        *,
        horizon: int,
        **options: Any,
    ) -> torch.Tensor:
        """Refuse inputs the model cannot forecast ``horizon`` steps from; return the observed mask.

        FactoST takes any number of nodes and any history of at least one patch. The mask, bool
        ``(B, L, N, C)``, is ``past_observed_mask`` (default: every finite entry) without the
        non-finite entries, and without the entries equal to ``config.missing_value`` when no
        mask is given. ``options`` (``use_domain_prompts``) do not change what is accepted.
        """
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
        self._check_time_features(past_values, past_time_features, future_time_features, horizon)
        mask = check_observed_mask(past_observed_mask, past_values, model=name, name="past_observed_mask",
                                   values_name="past_values") & torch.isfinite(past_values)
        if past_observed_mask is None and self.config.missing_value is not None:
            mask = mask & (past_values != self.config.missing_value)
        return mask

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

    def _scale(
        self, past_values: torch.Tensor, mask: torch.Tensor, node_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Instance normalisation: each series by the statistics of its last ``max_context_length`` observed steps.

        Returns:
            ``(scaled (B, L, N, C), loc (B, 1, N, C), scale (B, 1, N, C))``: the history as
            ``(value - loc) / scale``, 0 where not observed, in the input's precision.
        """
        config = self.config
        values = torch.where(mask, past_values, torch.zeros_like(past_values))
        context, context_mask = values[:, -config.max_context_length :], mask[:, -config.max_context_length :]
        batch, length, nodes, channels = context.shape
        # normalised one series per row, as FactoST was pretrained; the (B, L, N, C) result is a view of it
        normalised, loc, scale = masked_instance_norm(
            context.permute(0, 2, 3, 1).reshape(-1, length),
            context_mask.permute(0, 2, 3, 1).reshape(-1, length),
            config.norm_eps,
        )
        scaled = normalised.view(batch, nodes, channels, length).permute(0, 3, 1, 2)
        loc, scale = (statistic.view(batch, 1, nodes, channels) for statistic in (loc, scale))
        if values.shape[1] > length:
            early = values[:, : -config.max_context_length]
            early_mask = mask[:, : -config.max_context_length]
            scaled = torch.cat(((early - loc) / scale * early_mask.to(values.dtype), scaled), dim=1)
        return scaled, loc, scale

    def _forecast(
        self,
        scaled_past: torch.Tensor,
        past_observed_mask: torch.Tensor,
        past_time_features: torch.Tensor | None,
        future_time_features: torch.Tensor | None,
        node_index: torch.Tensor | None,
        *,
        horizon: int,
        use_domain_prompts: bool,
    ) -> ScaledForecast:
        """One encoder pass over the last ``max_context_length`` steps of the scaled history ``(B, L, N, C)``.

        Returns:
            :class:`~st_peft.forecasting.ScaledForecast` with the quantiles ``(B, horizon, N, C, Q)``
            in units of each series' instance statistics and their median as the prediction.
        """
        config = self.config
        scaled_past = scaled_past[:, -config.max_context_length :]
        mask = past_observed_mask[:, -config.max_context_length :]
        if past_time_features is not None:
            past_time_features = past_time_features[:, -config.max_context_length :]
        if future_time_features is not None:
            future_time_features = future_time_features[:, :horizon]
        batch, length, nodes, channels = scaled_past.shape
        normalised = scaled_past.permute(0, 2, 3, 1).reshape(-1, length)
        series_mask = mask.permute(0, 2, 3, 1).reshape(-1, length)

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
        prompts = None
        if hooked.prefix_tokens is not None:
            prompts = hooked.prefix_tokens.reshape(tokens.shape[0], -1, width)
            if hooked.prefix_gate is None:
                prefixes.append(prompts)
                prompts = None
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
            if prompts is None:
                hidden = layer(hidden, positions)
            else:
                hidden, prompts = layer.forward_with_prompts(hidden, positions, prompts, hooked.prefix_gate)
        future = self.final_norm(hidden[:, -num_future:])
        quantiles = self.head(future).view(-1, num_future * config.patch_length, len(config.quantiles))
        # Sorting keeps the quantile levels from crossing; gradients flow through the sort.
        quantiles = quantiles[:, :horizon].sort(dim=-1).values
        quantiles = quantiles.view(batch, nodes, channels, horizon, -1).permute(0, 3, 1, 2, 4)
        return ScaledForecast(quantiles[..., config.median_index], quantiles)

    def _output(
        self,
        forecast: ScaledForecast,
        loc: torch.Tensor,
        scale: torch.Tensor,
        future_values: torch.Tensor | None,
        future_observed_mask: torch.Tensor | None,
    ) -> ForecastOutput:
        """The forecast and its quantiles in original units, with ``config.loss`` when ``future_values`` is given."""
        units = forecast_output(forecast.prediction, loc, scale, model=type(self).__name__,
                                scaled_quantiles=forecast.quantiles, aux_loss=forecast.aux_loss)
        return self._scored(units.prediction_outputs, units.quantile_outputs, loc, scale, forecast.aux_loss,
                            future_values, future_observed_mask)

    def _scored(
        self,
        prediction: torch.Tensor,
        quantiles: torch.Tensor,
        loc: torch.Tensor,
        scale: torch.Tensor,
        aux_loss: torch.Tensor | None,
        future_values: torch.Tensor | None,
        future_observed_mask: torch.Tensor | None,
    ) -> ForecastOutput:
        """A forecast in original units, ``(B, H, N, C)`` and quantiles ``(B, H, N, C, Q)``, with its loss.

        ``config.loss`` is the pinball loss over every quantile, or a point loss of the median.
        """
        name = type(self).__name__
        loss = None
        if future_values is not None:
            batch, horizon, nodes, channels = prediction.shape
            check_future_values(future_values, model=name, batch_size=batch, horizon=horizon, nodes=nodes,
                                out_channels=channels)
            if self.config.loss == QUANTILE_LOSS:
                levels = list(self.config.quantiles)
                loss = forecast_loss(
                    quantiles, future_values, future_observed_mask,
                    lambda quantile, target, mask: pinball_loss(quantile, target, levels, mask=mask), model=name,
                    aux_loss=aux_loss,
                )
            else:
                loss = forecast_loss(prediction, future_values, future_observed_mask, get_loss(self.config.loss),
                                     model=name, aux_loss=aux_loss)
        return ForecastOutput(loss=loss, prediction_outputs=prediction, quantile_outputs=quantiles, loc=loc,
                              scale=scale, aux_loss=aux_loss)

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
    "masked_instance_statistics",
]
