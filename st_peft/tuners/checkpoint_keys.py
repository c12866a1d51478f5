"""Checkpoint-key handling shared by st-peft's tuners, whose adapters hold per-node tensors."""

from __future__ import annotations

import torch
from torch import nn


class PerNodeCheckpointMixin:
    """Mixed into a ``BaseTuner`` before it, for adapters with per-node tensors and nested parts.

    PEFT strips the adapter name from a saved key only when it sits just before the last
    part; inside ``<part>.<adapter_name>.<...>`` containers it sits in the middle. And a
    checkpoint saved for another number of nodes must be refused with both numbers, not
    fail later on a shape mismatch.

    Attributes:
        adapter_key_parts: container names that hold one sub-module per adapter name.
        per_node_key_suffixes: key endings of tensors whose first axis is the node axis.
        method_label: the method's name in error messages.
    """

    adapter_key_parts: tuple[str, ...] = ()
    per_node_key_suffixes: tuple[str, ...] = ()
    method_label: str = ""

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Drop the adapter name, which sits right after a container's name inside the key."""
        for part in cls.adapter_key_parts:
            marker = f".{part}.{adapter_name}."
            if marker in key:
                return key.replace(marker, f".{part}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Refuse a checkpoint saved for another number of nodes, then map its keys onto the model."""
        for key, value in state_dict.items():
            if key.endswith(cls.per_node_key_suffixes) and value.shape[0] != config.num_nodes:
                raise ValueError(
                    f"the saved {cls.method_label} adapter was trained on {value.shape[0]} nodes ({key} has "
                    f"shape {tuple(value.shape)}) but its config asks for num_nodes={config.num_nodes}"
                )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
