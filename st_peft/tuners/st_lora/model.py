"""The ST-LoRA tuner: how PEFT injects, trains, saves and removes ST-LoRA adapters.

ST-LoRA's main part, the node-specific predictor, is not a replacement of one of the
forecaster's layers but a network appended to the forecaster's output. PEFT's
``BaseTuner.inject_adapter`` only replaces named sub-modules and ``PeftModel.forward`` calls the
forecaster itself, not the tuner, so the predictor is made a sub-module target of its own:

1. ``_prepare_model`` (run by ``inject_adapter`` for every new adapter) installs, once, an
   ``STLoraPredictorLayer`` as the child ``st_lora_predictor`` of the forecaster's root module;
   it hooks the root's forward: the forecaster gets the batch keys its forward accepts, and its
   prediction is replaced by the refined one, with ``loss`` computed on the refined forecast.
2. ``_check_target_module_exists`` matches that child for every adapter (plus the optional
   ``target_modules``), so ``_create_and_replace`` adds each adapter's own predictor to it.

Because the container is a regular tuner layer, PEFT's own ``set_adapter``,
``disable_adapter()``, ``delete_adapter``, trainable-parameter bookkeeping and state-dict
selection treat it like any LoRA layer; ``unload()`` removes it and its hooks.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from st_peft.tuners.checkpoint_keys import PerNodeCheckpointMixin
from st_peft.tuners.options import check_layer_indices_apply
from st_peft.tuners.st_lora.config import STLoraConfig
from st_peft.tuners.st_lora.layer import (
    MERGE_REFUSAL,
    NodeAdaptiveLayer,
    STLoraLayer,
    STLoraPredictorLayer,
    check_wrappable,
)
from st_peft.tuners.st_lora.space import forecaster_scaler, history_channels_of

PREDICTOR_NAME = "st_lora_predictor"
"""Name of the predictor container under the forecaster's root. It must not contain the method
prefix ``stlora_``: PEFT's ``delete_adapter`` skips modules whose name contains it."""

HEADS_NAME = "stlora_heads"


class STLoraModel(PerNodeCheckpointMixin, BaseTuner):
    """ST-LoRA tuner (PEFT type ``STLORA``) around a spatio-temporal forecaster.

    The forecaster is any ``nn.Module`` whose forward takes ``past_values`` ``(B, L, N, C_in)``
    (and any other batch keys it names, or ``**kwargs``) and returns ``(B, H, N, C_out)`` or a
    ``ForecastOutput`` in original units. Build it with
    ``peft.get_peft_model(forecaster, STLoraConfig(**splits.size_kwargs()))``; the adapted model
    is called as ``model(**batch)`` and returns a ``ForecastOutput`` with ``loss`` when
    ``future_values`` is given.

    Args:
        model: the forecaster.
        peft_config: the adapter's configuration, or a dict of them.
        adapter_name: name of the first adapter.
        low_cpu_mem_usage: create the adapter's weights on the meta device (for loading).
        state_dict: inject the adapters named by this state dict's keys.
    """

    prefix: str = "stlora_"
    adapter_key_parts = (HEADS_NAME,)
    per_node_key_suffixes = (f".{HEADS_NAME}.node_embedding", ".stlora_node_scale")
    method_label = "ST-LoRA"
    tuner_layer_cls = STLoraLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: STLoraConfig, model_config: dict) -> STLoraConfig:
        """ST-LoRA needs no ``target_modules``: its predictor is always a target."""
        return peft_config

    def _check_new_adapter_config(self, config: STLoraConfig) -> None:
        """Refuse an adapter whose sizes differ from the adapters already on the (same) forecaster."""
        super()._check_new_adapter_config(config)
        for name, other in self.peft_config.items():
            if other is config:
                continue
            for size in ("num_nodes", "input_len", "horizon", "in_channels", "out_channels"):
                if getattr(other, size) != getattr(config, size):
                    raise ValueError(
                        f"The new ST-LoRA adapter has {size}={getattr(config, size)} but adapter {name!r} on the "
                        f"same forecaster has {size}={getattr(other, size)}"
                    )

    def _prepare_model(self, peft_config: STLoraConfig, model: nn.Module) -> None:
        """Check the forecaster against the config and install the predictor container once."""
        self._check_forecaster(peft_config, model)
        predictor = model._modules.get(PREDICTOR_NAME)
        if predictor is None:
            # PEFT freezes the base model only on the first injection, recognised by the absence of tuner
            # layers; the container installed here is one, so PEFT will restore the forecaster's current
            # trainability instead. Set it here to what this first adapter asks for.
            model.requires_grad_(peft_config.train_backbone and not peft_config.inference_mode)
            predictor = STLoraPredictorLayer(peft_config.num_nodes)
            model.add_module(PREDICTOR_NAME, predictor)
            predictor.attach(model)
        elif not isinstance(predictor, STLoraPredictorLayer):
            raise ValueError(
                f"The forecaster already has a sub-module named {PREDICTOR_NAME!r} "
                f"({type(predictor).__name__}); ST-LoRA needs that name for its predictor"
            )

    def train(self, mode: bool = True) -> STLoraModel:
        """Set training mode; a frozen forecaster keeps its evaluation behaviour.

        While no active adapter trains the backbone (``train_backbone=False``), the forecaster's
        own modules stay in evaluation mode and only the adapter's (and the trained copies of
        ``modules_to_save``) train: dropout does not
        perturb the prediction that the predictor learns to refine, and batch-norm running
        statistics, part of the frozen forecaster, do not drift, so ``disable_adapter()`` still
        gives the original forecaster. (It also saves the backbone's dropout masks, a third of
        a frozen STID's step.)
        """
        super().train(mode)
        self._forecaster_held_in_eval = mode and not any(
            self.peft_config[name].train_backbone for name in self.active_adapters if name in self.peft_config
        )
        if self._forecaster_held_in_eval:
            # what trains: the adapter parts of ST-LoRA layers and the copies of modules_to_save
            adapter_modules = {
                id(child)
                for layer in self.model.modules() if isinstance(layer, (STLoraLayer, AuxiliaryTrainingWrapper))
                for key, child in layer.named_modules() if not key.startswith(("base_layer", "original_module"))
            }
            for module in self.model.modules():
                if id(module) not in adapter_modules:
                    module.training = False
        return self

    def _check_forecaster(self, config: STLoraConfig, model: nn.Module) -> None:
        """Refuse a forecaster of another size, a space the predictor cannot build, unknown target
        names and layers a NALL cannot wrap."""
        # an st-peft model says it in its config; a user's module may say it as an attribute
        nodes = getattr(getattr(model, "config", None), "num_nodes", getattr(model, "num_nodes", None))
        if isinstance(nodes, int) and nodes != config.num_nodes:
            raise ValueError(
                f"STLoraConfig.num_nodes={config.num_nodes} but the forecaster {type(model).__name__} has "
                f"num_nodes={nodes}"
            )
        if config.num_blocks > 0 and forecaster_scaler(model) is None:
            history_channels_of(config.in_channels, config.out_channels, config.output_history_channels)
        if not config.target_modules:
            return
        wrapped = [key for key, module in model.named_modules() if isinstance(module, NodeAdaptiveLayer)]
        keys = [
            key
            for key, _ in model.named_modules()
            if key
            and key != PREDICTOR_NAME
            and not key.startswith(PREDICTOR_NAME + ".")
            and not any(key.startswith(prefix + ".") for prefix in wrapped)
        ]
        targets = config.target_modules
        if isinstance(targets, str):
            if not any(re.fullmatch(targets, key) for key in keys):
                raise ValueError(
                    f"target_modules={targets!r} matches no module of {type(model).__name__}; its modules are "
                    f"{keys}"
                )
        else:
            for name in sorted(targets):
                if not any(key == name or key.endswith("." + name) for key in keys):
                    raise ValueError(
                        f"target_modules entry {name!r} matches no module of {type(model).__name__}; its modules "
                        f"are {keys}"
                    )
        selected = [key for key in keys if check_target_module_exists(config, key)]
        check_layer_indices_apply(config, selected, "ST-LoRA")
        if not selected:
            raise ValueError(
                f"target_modules={sorted(targets) if isinstance(targets, set) else targets!r} names modules of "
                f"{type(model).__name__}, but exclude_modules={config.exclude_modules!r}, "
                f"layers_to_transform={config.layers_to_transform!r}, layers_pattern={config.layers_pattern!r} and "
                f"modules_to_save={config.modules_to_save!r} leave none of them to wrap"
            )
        for key in selected:
            module = model.get_submodule(key)
            base = module.base_layer if isinstance(module, NodeAdaptiveLayer) else module
            check_wrappable(base, config.node_axis, key)

    @staticmethod
    def _check_target_module_exists(peft_config: STLoraConfig, key: str) -> Any:
        """The predictor container always; a forecaster layer as PEFT's own matching decides.

        PEFT's ``check_target_module_exists`` applies ``target_modules``, ``exclude_modules``,
        ``layers_to_transform`` / ``layers_pattern`` and ``modules_to_save`` as for LoRA; its
        "excluded" answer is passed on as it is, so PEFT reports the excluded modules.
        """
        if key == PREDICTOR_NAME:
            return True
        if key.startswith(PREDICTOR_NAME + ".") or not peft_config.target_modules:
            return False
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(
        self,
        peft_config: STLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        """Add the adapter to the predictor container, or wrap the target layer with a NALL."""
        if isinstance(target, STLoraPredictorLayer):
            target.update_layer(adapter_name, peft_config, *self._forecaster_placement())
            return
        if isinstance(target, NodeAdaptiveLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = NodeAdaptiveLayer(target, self.model.get_submodule(PREDICTOR_NAME).selection, current_key)
        new_module.update_layer(adapter_name, peft_config)
        self._replace_module(parent, target_name, new_module, target)

    def _forecaster_placement(self) -> tuple[torch.device | None, torch.dtype | None]:
        """Device and dtype of the forecaster's first floating-point weight (None, None without any)."""
        for name, parameter in self.model.named_parameters():
            if self.prefix not in name and parameter.is_floating_point():
                return parameter.device, parameter.dtype
        return None, None

    def _check_merge_allowed(self) -> None:
        """ST-LoRA never merges; the error says why."""
        raise ValueError(MERGE_REFUSAL)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Refuse to merge; otherwise remove the predictor and its hooks and unwrap every NALL."""
        if merge:
            self._check_merge_allowed()
        predictor = self.model._modules.get(PREDICTOR_NAME)
        if isinstance(predictor, STLoraPredictorLayer):
            predictor.detach()
            delattr(self.model, PREDICTOR_NAME)
        forecaster = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        # train() held the frozen forecaster's modules in evaluation mode; they go back in training mode
        return forecaster.train() if getattr(self, "_forecaster_held_in_eval", False) else forecaster

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: STLoraConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """The adapter's weights, plus the forecaster's own when it was trained along (``train_backbone``)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.train_backbone:
            # safetensors refuses non-contiguous tensors, which forecasters may hold as (transposed) buffers
            selected.update({key: value.contiguous() for key, value in state_dict.items() if cls.prefix not in key})
        return selected


def st_lora_cli_adapter(backbone: nn.Module, splits: Any, options: argparse.Namespace) -> nn.Module:
    """``st-peft train --adapter st_lora``: ST-LoRA around the command line's backbone.

    The sizes (``num_nodes``, ``input_len``, ``horizon``, channels) come from the data
    (``splits.size_kwargs()``; the scaling statistics are the backbone's);
    ``--adapter-args`` may set any other ``STLoraConfig`` field, e.g.
    ``'{r: 8, target_modules: [fc1], train_backbone: true}'``.

    Args:
        backbone: the backbone the command line built (and possibly loaded with ``--backbone-from``).
        splits: the data's ``ForecastingSplits``.
        options: parsed options; ``options.adapter_args`` is a mapping.

    Returns:
        The ``PeftModel`` with its ST-LoRA adapter.
    """
    from peft import get_peft_model

    return get_peft_model(backbone, STLoraConfig(**{**splits.size_kwargs(), **dict(options.adapter_args)}))
