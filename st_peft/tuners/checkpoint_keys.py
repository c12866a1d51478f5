"""Checkpoint handling shared by st-peft's tuners: per-node tensors, nested adapter keys, safe loading."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

PEFT_PREFIX = "base_model.model."
"""What ``PeftModel`` puts before the forecaster's own keys, in checkpoints and in its state dict."""

_BACKBONE_WEIGHTS_ALLOWED: ContextVar[bool] = ContextVar("st_peft_backbone_weights_allowed", default=False)


@contextmanager
def loading_backbone_weights() -> Iterator[None]:
    """Let the adapters loaded inside this block write the forecaster's own weights they carry.

    An adapter saved with ``train_backbone=True`` holds the trained forecaster too, and loading
    it overwrites the forecaster the caller passed in. The adapter's own config cannot decide
    that (a downloaded ``adapter_config.json`` could say anything), so the caller does, at load
    time::

        with st_peft.loading_backbone_weights():
            model = PeftModel.from_pretrained(backbone, "adapters/joint")

    (``st_peft.hub.load_adapter(..., load_backbone_weights=True)`` does the same.) The permission
    holds in this thread or task only, until the block ends.
    """
    token = _BACKBONE_WEIGHTS_ALLOWED.set(True)
    try:
        yield
    finally:
        _BACKBONE_WEIGHTS_ALLOWED.reset(token)


class PerNodeCheckpointMixin:
    """Mixed into a ``BaseTuner`` before it, for adapters with per-node tensors and nested parts.

    PEFT strips the adapter name from a saved key only when it sits just before the last
    part; inside ``<part>.<adapter_name>.<...>`` containers it sits in the middle. And a
    checkpoint saved for another number of nodes must be refused with both numbers, not
    fail later on a shape mismatch.

    Loading is safe: a checkpoint writes the tensors of its own adapter (its tuner layers'
    parts and its copies of ``modules_to_save``) and nothing else. PEFT loads a LoRA checkpoint
    with ``load_state_dict(strict=False)``, which writes any key that names a model weight, loads
    NaN as readily as numbers, and drops unknown keys without a word (``load_adapter`` returns
    them as ``unexpected_keys``; ``from_pretrained`` does not even warn). Here each of these is
    refused, naming the keys:

    - a key of the forecaster itself, unless the adapter's config says ``train_backbone=True``
      (then the checkpoint holds the trained forecaster on purpose) and the caller allows it
      with :func:`loading_backbone_weights`;
    - a key that is neither the adapter's nor the forecaster's;
    - a tensor of another shape than the model's;
    - a tensor holding NaN or infinity.

    Loading is all or nothing: every check runs before the first tensor is written, and a
    refused checkpoint takes its adapter out of the model again (``unload()`` when it was the
    only one, ``delete_adapter`` otherwise), so the user's forecaster is left exactly as it was:
    the same modules, no adapter layer, the same forward.

    Attributes:
        adapter_key_parts: container names that hold one sub-module per adapter name.
        per_node_key_suffixes: key endings of tensors whose first axis is the node axis.
        method_label: the method's name in error messages.
    """

    adapter_key_parts: tuple[str, ...] = ()
    per_node_key_suffixes: tuple[str, ...] = ()
    method_label: str = ""

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """PEFT's injection; before the first adapter, remember which of the forecaster's weights trained.

        PEFT freezes the forecaster at the first injection; a refused checkpoint hands it back as
        it was, ``requires_grad`` included (torch picks its matmul kernel by it).
        """
        if not getattr(self, "_trainability_before_adapters", None):
            self._trainability_before_adapters = [(parameter, parameter.requires_grad)
                                                  for parameter in model.parameters()]
        super().inject_adapter(model, adapter_name, *args, **kwargs)

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
        """Check the checkpoint (nodes, finite values, only the adapter's own keys), then map its keys onto the model.

        Raises:
            ValueError: naming the keys, for a checkpoint of another number of nodes, a tensor with
                NaN or infinity, a key of the forecaster in an adapter that does not train it, or
                a key of neither.
        """
        try:
            for key, value in state_dict.items():
                if key.endswith(cls.per_node_key_suffixes) and value.shape[0] != config.num_nodes:
                    raise ValueError(
                        f"the saved {cls.method_label} adapter was trained on {value.shape[0]} nodes ({key} has "
                        f"shape {tuple(value.shape)}) but its config asks for num_nodes={config.num_nodes}"
                    )
            broken = [key for key, value in state_dict.items()
                      if value.is_floating_point() and not bool(torch.isfinite(value).all())]
            if broken:
                raise ValueError(
                    f"the saved {cls.method_label} adapter {adapter_name!r} holds NaN or infinite values in "
                    f"{broken}; refused, it would forecast NaN"
                )
            remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
            cls._refuse_keys_outside_the_adapter(model, config, adapter_name, remapped)
        except ValueError:
            cls._take_out_refused_adapter(model, adapter_name)
            raise
        return remapped

    @staticmethod
    def _take_out_refused_adapter(model: nn.Module, adapter_name: str) -> None:
        """Remove the adapter a refused checkpoint was going to fill, so the forecaster is as it was.

        ``model`` is the ``PeftModel`` being loaded into; its tuner injected the adapter's layers
        into the user's forecaster before the checkpoint was read.
        """
        tuner = getattr(model, "base_model", None)
        if not isinstance(tuner, BaseTuner) or adapter_name not in tuner.peft_config:
            return
        if len(tuner.peft_config) == 1:
            tuner.unload()
            for parameter, requires_grad in getattr(tuner, "_trainability_before_adapters", ()):
                parameter.requires_grad_(requires_grad)
        else:
            tuner.delete_adapter(adapter_name)

    @classmethod
    def _refuse_keys_outside_the_adapter(
        cls, model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> None:
        """Raise unless every tensor of the checkpoint belongs to adapter ``adapter_name`` and fits its place.

        Args:
            model: the model the checkpoint is loaded into (a ``PeftModel``, or a forecaster with
                adapters injected).
            config: the adapter's config; with ``train_backbone=True`` the forecaster's keys are allowed.
            adapter_name: the adapter being loaded.
            state_dict: the checkpoint, its keys mapped onto the model's.
        """
        model_state = model.state_dict()
        own = set(_filter_state_dict_by_key_prefixes(
            model_state, _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        ))
        for name, module in model.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                own.update(f"{name}.{key}" for key in module.adapter_state_dict_load_map(adapter_name).values())
        backbone, unknown, misshapen = [], [], []
        trained_along = bool(getattr(config, "train_backbone", False))
        for key, value in state_dict.items():
            # a checkpoint's keys carry PEFT's prefix even when loaded into a bare forecaster
            target = key if key in model_state else key.removeprefix(PEFT_PREFIX)
            if target not in model_state:
                unknown.append(key)
                continue
            if target not in own and not (trained_along and _BACKBONE_WEIGHTS_ALLOWED.get()):
                backbone.append(key)
            if tuple(value.shape) != tuple(model_state[target].shape):
                misshapen.append(f"{key} {tuple(value.shape)} vs {tuple(model_state[target].shape)}")
        if backbone and trained_along:
            raise ValueError(
                f"the saved {cls.method_label} adapter {adapter_name!r} carries the forecaster's own weights "
                f"{backbone} (it was saved with train_backbone=True); loading them overwrites the forecaster you "
                "passed in, so they load only when you ask at load time: `with st_peft.loading_backbone_weights(): "
                "PeftModel.from_pretrained(...)`, or st_peft.hub.load_adapter(..., load_backbone_weights=True)"
            )
        if backbone:
            raise ValueError(
                f"the saved {cls.method_label} adapter {adapter_name!r} holds weights of the forecaster itself, "
                f"{backbone}, but its config has train_backbone=False: loading them would overwrite the frozen "
                "forecaster. Refused; an adapter checkpoint holds only the adapter's tensors (and the forecaster's "
                "only when it was trained along, train_backbone=True)"
            )
        if unknown:
            raise ValueError(
                f"the saved {cls.method_label} adapter {adapter_name!r} holds {unknown}, which are neither tensors "
                "of this adapter nor of the forecaster (a checkpoint of another model, method or adapter layout?); "
                "refused rather than dropped without a word"
            )
        if misshapen:
            raise ValueError(
                f"the saved {cls.method_label} adapter {adapter_name!r} holds tensors of other shapes than the "
                f"model's ({', '.join(misshapen)}); refused before anything was loaded"
            )
