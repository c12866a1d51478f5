"""Configuration of the FactoST temporal backbone."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from st_peft.losses import LOSSES

QUANTILE_LOSS = "pinball"
"""The name of the loss on every quantile forecast; the other names of ``loss`` score the median."""

# Named sizes. "tiny" follows the paper's tiny model (about 4.4M parameters with its
# patch length 16); "base" is the next step up; "cpu" is small enough to pretrain in
# minutes on two CPU cores and uses patches of 4 steps so that the 12-step windows of
# the standard ST benchmarks are three full patches. "small" (147k parameters), "medium"
# (880k) and "tiny-long" (the paper's tiny widths, 4.4M) are the sizes of the long-context
# scaling study (benchmarks/factost_pretraining.py): patches of 8 steps, so a 12-step
# window still fits, and histories of up to 2048 steps, seven days at 5 minutes.
FACTOST_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {
        "patch_length": 4,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 192,
        "max_context_length": 96,
        "max_horizon": 48,
    },
    "small": {
        "patch_length": 8,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 192,
        "max_context_length": 2048,
        "max_horizon": 64,
    },
    "medium": {
        "patch_length": 8,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "max_context_length": 2048,
        "max_horizon": 64,
    },
    "tiny-long": {
        "patch_length": 8,
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "intermediate_size": 832,
        "max_context_length": 2048,
        "max_horizon": 64,
    },
    "tiny": {
        "patch_length": 16,
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "intermediate_size": 832,
        "max_context_length": 512,
        "max_horizon": 128,
    },
    "base": {
        "patch_length": 16,
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "intermediate_size": 2048,
        "max_context_length": 1024,
        "max_horizon": 256,
    },
}


@strict
class FactoSTConfig(PreTrainedConfig):
    r"""Configuration of [`FactoSTModel`], an encoder-only temporal forecaster over patches.

    Args:
        patch_length: steps per patch. A context that is not a whole number of patches is
            left-padded with steps marked missing; a context shorter than one patch is refused.
        hidden_size: width of the tokens.
        num_hidden_layers: number of transformer encoder layers.
        num_attention_heads: attention heads; ``hidden_size`` must be divisible by it and the
            head size must be even (rotary embeddings rotate pairs of dimensions).
        intermediate_size: width of the feed-forward layers.
        dropout: dropout inside the encoder layers.
        max_context_length: longest history used; longer inputs keep their last steps.
        max_horizon: longest horizon forecast in one pass; longer horizons need ``rollout``.
        quantiles: quantile levels of the head, increasing; must contain 0.5 (the point forecast).
        num_domain_prompts: size of the codebook of domain prompts.
        prompt_top_k: how many codebook entries are matched and prepended.
        rope_theta: base of the rotary frequencies.
        norm_eps: epsilon of the layer norms and of the instance normalisation.
        initializer_range: standard deviation of the initial weights.
        missing_value: when ``forward`` gets no ``past_observed_mask``, entries of ``past_values``
            equal to this value count as missing (the built-in data sets hold 0, in original units,
            where a value is missing); ``None`` treats only NaN as missing.
        loss: the training loss ``forward`` returns when given ``future_values``, masked and in
            original units: ``"mae"`` (the default, the objective of the benchmark), ``"mse"`` or
            ``"huber"`` score the point forecast (the 0.5 quantile); ``"pinball"`` scores every
            quantile forecast. Pretraining does not use it: it minimises the pinball loss in units
            of each window's spread.
    """

    model_type = "factost"

    patch_length: int = 16
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 768
    dropout: float | int = 0.1
    max_context_length: int = 512
    max_horizon: int = 128
    quantiles: list[float] | tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    num_domain_prompts: int = 8
    prompt_top_k: int = 3
    rope_theta: float | int = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    missing_value: float | None = 0.0
    loss: str = "mae"

    def __post_init__(self, **kwargs):
        self.quantiles = [float(q) for q in self.quantiles]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Refuse sizes the model cannot be built with, naming the offending numbers."""
        if self.patch_length < 1:
            raise ValueError(f"patch_length must be at least 1, got {self.patch_length}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"the head size hidden_size / num_attention_heads = {self.hidden_size // self.num_attention_heads} "
                "must be even for rotary embeddings."
            )
        if self.max_context_length < self.patch_length or self.max_horizon < 1:
            raise ValueError(
                f"max_context_length ({self.max_context_length}) must be at least patch_length "
                f"({self.patch_length}) and max_horizon ({self.max_horizon}) at least 1."
            )
        if 0.5 not in self.quantiles or list(self.quantiles) != sorted(set(self.quantiles)):
            raise ValueError(f"quantiles must be increasing and contain 0.5, got {list(self.quantiles)}.")
        if self.loss not in (*LOSSES, QUANTILE_LOSS):
            raise ValueError(f"loss must be one of {sorted((*LOSSES, QUANTILE_LOSS))}, got {self.loss!r}.")
        if not 1 <= self.prompt_top_k <= self.num_domain_prompts:
            raise ValueError(
                f"prompt_top_k ({self.prompt_top_k}) must be between 1 and num_domain_prompts "
                f"({self.num_domain_prompts})."
            )

    @property
    def median_index(self) -> int:
        """Index of the 0.5 quantile, whose forecast is the point forecast."""
        return list(self.quantiles).index(0.5)

    @property
    def max_context_patches(self) -> int:
        """Number of patches the longest context occupies."""
        return -(-self.max_context_length // self.patch_length)

    @property
    def max_future_patches(self) -> int:
        """Number of placeholder patches that cover ``max_horizon``."""
        return -(-self.max_horizon // self.patch_length)

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> FactoSTConfig:
        """Build the configuration of a named size (``"cpu"``, ``"tiny"``, ``"base"``).

        Args:
            size: one of ``FACTOST_SIZES``.
            **overrides: fields that replace the named size's values.
        """
        if size not in FACTOST_SIZES:
            raise ValueError(f"unknown FactoST size {size!r}; choose one of {sorted(FACTOST_SIZES)}.")
        return cls(**{**FACTOST_SIZES[size], **overrides})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> FactoSTConfig:
        """Load a configuration, refusing checkpoints of another model type.

        transformers only warns when the ``model_type`` of a checkpoint differs; a FactoST
        model built from another model's weights would forecast garbage, so this is an error.
        """
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **dict(kwargs))
        found = config_dict.get("model_type")
        if found != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a checkpoint of model type {found!r}, "
                f"not {cls.model_type!r}; FactoSTModel can only load FactoST checkpoints."
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


__all__ = ["FACTOST_SIZES", "QUANTILE_LOSS", "FactoSTConfig"]
