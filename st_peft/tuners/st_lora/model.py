"""The ST-LoRA tuner: how PEFT injects, trains, saves and removes ST-LoRA adapters.

ST-LoRA's main part, the node-specific predictor, refines the forecaster's forecast. Every
st-peft forecaster passes its scaled forecast through an identity module, ``forecast_seam``
(:class:`~st_peft.forecasting.ForecastSeam`; a user's own module gets one from
:class:`~st_peft.tuners.st_lora.seamed.SeamedForecaster`). The tuner treats that seam as it treats any target:

1. ``_check_target_module_exists`` matches ``forecast_seam`` for every adapter (plus the
   optional ``target_modules``, matched by PEFT's own ``check_target_module_exists``);
2. ``_create_and_replace`` replaces the seam by an ``STLoraPredictorLayer`` wrapping it (one per
   forecaster, holding each adapter's predictor), and target layers by node-adaptive layers;
3. per call, ``_enable_peft_forward_hooks`` (entered by ``PeftModel.forward``, as LoRA's for
   ``adapter_names``) hands ``node_index`` to the node-adaptive layers and their scaling
   penalties to the predictor layer, refuses a wrapped layer that did not run, and keeps a frozen
   forecaster in evaluation mode for the call. Its hooks are removed when the call returns.

So PEFT's own ``set_adapter``, ``disable_adapter()``, ``delete_adapter``, trainable-parameter
bookkeeping, state-dict selection and ``unload()`` work as for LoRA, and nothing stays attached
to the user's model outside a call.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from st_peft.checks import check_past_values
from st_peft.forecasting import ForecastSeam
from st_peft.tuners.checkpoint_keys import PerNodeCheckpointMixin
from st_peft.tuners.options import check_layer_indices_apply
from st_peft.tuners.placement import forecaster_placement
from st_peft.tuners.st_lora.config import STLoraConfig
from st_peft.tuners.st_lora.layer import (
    MERGE_REFUSAL,
    NodeAdaptiveLayer,
    STLoraLayer,
    STLoraPredictorLayer,
    check_wrappable,
)
from st_peft.tuners.st_lora.seamed import SeamedForecaster
from st_peft.tuners.st_lora.space import forecaster_scaler, history_channels_of

SEAM_NAME = "forecast_seam"
"""Name of the output seam under the forecaster's root (every st-peft model's, and
``SeamedForecaster``'s), which the predictor layer replaces."""

HEADS_NAME = "stl_heads"


class STLoraModel(PerNodeCheckpointMixin, BaseTuner):
    """ST-LoRA tuner (PEFT type ``STLORA``) around a spatio-temporal forecaster.

    The forecaster is an st-peft model (STID, GWNet, STGCN, ST-LINK, FactoST) or a user's own
    module wrapped in :class:`~st_peft.tuners.st_lora.seamed.SeamedForecaster`: both have the output seam the
    predictor replaces. Build it with
    ``peft.get_peft_model(forecaster, STLoraConfig(**splits.size_kwargs()))``; the adapted model
    is called as ``model(**batch)`` and returns a ``ForecastOutput`` with ``loss`` when
    ``future_values`` is given.

    While no active adapter trains the forecaster (``train_backbone=False``), each call runs the
    forecaster's own modules in evaluation mode, whatever ``model.train()`` said: dropout does
    not perturb the prediction that the predictor learns to refine, and batch-norm running
    statistics, part of the frozen forecaster, never drift, so ``disable_adapter()`` still gives
    the original forecaster. The adapter's own modules (and the trained copies of
    ``modules_to_save``) follow ``model.train()``.

    Args:
        model: the forecaster.
        peft_config: the adapter's configuration, or a dict of them.
        adapter_name: name of the first adapter.
        low_cpu_mem_usage: create the adapter's weights on the meta device (for loading).
        state_dict: inject the adapters named by this state dict's keys.
    """

    prefix: str = "stl_"
    adapter_key_parts = (HEADS_NAME,)
    per_node_key_suffixes = (f".{HEADS_NAME}.node_embedding", ".stl_node_scale")
    method_label = "ST-LoRA"
    tuner_layer_cls = STLoraLayer
    target_module_mapping: dict[str, list[str]] = {}

    @property
    def forecasts_nodes_independently(self) -> bool:
        """The forecaster's: the predictor and the node-adaptive layers work on each node on its own."""
        return bool(getattr(self.model, "forecasts_nodes_independently", False))

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
        """Check the forecaster against the config: it must have the output seam, and fit the sizes."""
        if peft_config.num_nodes is None:
            raise ValueError("STLoraConfig needs num_nodes, the number of nodes N of the graph "
                             "(STLoraConfig(**splits.size_kwargs()) gives it)")
        seam = model._modules.get(SEAM_NAME)
        if not isinstance(seam, (ForecastSeam, STLoraPredictorLayer)):
            raise TypeError(
                f"ST-LoRA refines a forecast at the forecaster's output seam ({SEAM_NAME}), which "
                f"{type(model).__name__} does not have: use an st-peft model, or wrap your own module as "
                "st_peft.SeamedForecaster(module)"
            )
        self._check_forecaster(peft_config, model)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """PEFT's freezing, then the forecaster's own weights trainable again for ``train_backbone=True``."""
        super()._mark_only_adapters_as_trainable(model)
        if any(self.peft_config[name].train_backbone and not self.peft_config[name].inference_mode
               for name in self.active_adapters if name in self.peft_config):
            for name, parameter in model.named_parameters():
                if self.prefix not in name:
                    parameter.requires_grad_(True)

    def _call_modules(self, freeze: bool) -> tuple[list[NodeAdaptiveLayer], list[nn.Module]]:
        """The forecaster's node-adaptive layers and, when ``freeze``, its own modules in training mode.

        One walk of the module tree, in the order of ``self.model.modules()`` (each module once).
        A module is the adapter's, and keeps following ``model.train()``, when it is an ST-LoRA layer
        or a PEFT wrapper of ``modules_to_save`` or lies inside one, outside the wrapped
        ``base_layer`` / ``original_module``; every other module in training mode is the forecaster's own.
        """
        layers: list[NodeAdaptiveLayer] = []
        own_training: list[nn.Module] = []
        seen: set[int] = set()
        # one walk instead of three: it runs before every call, and on a small backbone (STID) it was
        # a few percent of the training step
        stack: list[tuple[nn.Module, bool]] = [(self.model, False)]
        while stack:
            module, adapter = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            wrapper = isinstance(module, (STLoraLayer, AuxiliaryTrainingWrapper))
            if isinstance(module, NodeAdaptiveLayer):
                layers.append(module)
            if freeze and module.training and not (adapter or wrapper):
                own_training.append(module)
            children = [
                (child, adapter or (wrapper and not key.startswith(("base_layer", "original_module"))))
                for key, child in module._modules.items() if child is not None
            ]
            stack.extend(reversed(children))
        return layers, own_training

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """What one call of the adapted model needs, removed when it returns.

        - ``past_values`` (keyword or first positional) is checked against the active adapters;
        - each node-adaptive layer is handed the call's ``node_index`` (a forward pre-hook, as
          LoRA's ``adapter_names``), and records that it ran: a wrapped layer of an active adapter
          that did not run while the forecaster did is refused by name, in every call;
        - the predictor layer is handed each adapter's scaling penalty over those layers;
        - without ``train_backbone``, the forecaster's modules run in evaluation mode.
        """
        active = [name for name in self.active_adapters if name in self.peft_config]
        past_values = args[0] if args else kwargs.get("past_values")
        node_index = kwargs.get("node_index")
        if active and past_values is not None:
            for name in active:
                config = self.peft_config[name]
                check_past_values(past_values, model=f"The ST-LoRA adapter {name!r}", num_nodes=config.num_nodes,
                                  input_len=config.input_len, in_channels=config.in_channels, node_index=node_index)
        freeze = self.model.training and not any(self.peft_config[name].train_backbone for name in active)
        layers, frozen = self._call_modules(freeze)
        ran: set[str] = set()

        def give_node_index(layer: NodeAdaptiveLayer, layer_args: tuple, layer_kwargs: dict) -> tuple[tuple, dict]:
            ran.add(layer.layer_name)
            return layer_args, {**layer_kwargs, "node_index": node_index}

        handles = [layer.register_forward_pre_hook(give_node_index, with_kwargs=True) for layer in layers]
        penalties = {
            name: torch.stack([layer.scaling_penalty(name) for layer in layers if name in layer.stl_node_scale]).sum()
            for name in active
            if self.peft_config[name].scaling_l2 > 0 and any(name in layer.stl_node_scale for layer in layers)
        }
        seam = self.model._modules.get(SEAM_NAME)
        if penalties and isinstance(seam, STLoraPredictorLayer):
            handles.append(seam.register_forward_pre_hook(
                lambda module, seam_args, seam_kwargs: (seam_args, {**seam_kwargs, "layer_penalties": penalties}),
                with_kwargs=True,
            ))
        for module in frozen:
            module.training = False
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in frozen:
                module.training = True
        silent = sorted(layer.layer_name for layer in layers
                        if layer.layer_name not in ran and any(name in layer.stl_down for name in active))
        if silent:
            raise RuntimeError(
                f"ST-LoRA wrapped {silent} of {type(self.model).__name__}, but its forward never called "
                f"{'them' if len(silent) > 1 else 'it'}: the forecaster reads the layer's weight directly or skips "
                "the layer, so the adapter would neither change the forecast nor get a gradient. Leave these layers "
                "out of target_modules (or exclude_modules), or make the forecaster call them"
            )

    def _check_forecaster(self, config: STLoraConfig, model: nn.Module) -> None:
        """Refuse a forecaster of another size, a space the predictor cannot build, unknown target
        names and layers a NALL cannot wrap."""
        # an st-peft model says it in its config; a user's module may say it as an attribute
        inner = model.forecaster if isinstance(model, SeamedForecaster) else model
        nodes = getattr(getattr(inner, "config", None), "num_nodes", getattr(inner, "num_nodes", None))
        if isinstance(nodes, int) and nodes != config.num_nodes:
            raise ValueError(
                f"STLoraConfig.num_nodes={config.num_nodes} but the forecaster {type(inner).__name__} has "
                f"num_nodes={nodes}"
            )
        if isinstance(model, SeamedForecaster) and config.num_blocks > 0 and forecaster_scaler(model) is None:
            # the wrapper's per-window space needs each forecast channel's history channel
            if model.output_history_channels is None and config.output_history_channels is not None:
                model.output_history_channels = list(config.output_history_channels)
            history_channels_of(config.in_channels, config.out_channels, model.output_history_channels)
        if not config.target_modules:
            return
        wrapped = [key for key, module in model.named_modules() if isinstance(module, NodeAdaptiveLayer)]
        keys = [
            key
            for key, _ in model.named_modules()
            if key
            and key != SEAM_NAME
            and not key.startswith(SEAM_NAME + ".")
            and not any(key.startswith(prefix + ".") for prefix in wrapped)
        ]
        targets = config.target_modules
        if isinstance(targets, str):
            if not any(re.fullmatch(targets, key) for key in keys):
                raise ValueError(
                    f"target_modules={targets!r} matches no module of {type(inner).__name__}; its modules are "
                    f"{keys}"
                )
        else:
            for name in sorted(targets):
                if not any(key == name or key.endswith("." + name) for key in keys):
                    raise ValueError(
                        f"target_modules entry {name!r} matches no module of {type(inner).__name__}; its modules "
                        f"are {keys}"
                    )
        selected = [key for key in keys if check_target_module_exists(config, key)]
        check_layer_indices_apply(config, selected, "ST-LoRA")
        if not selected:
            raise ValueError(
                f"target_modules={sorted(targets) if isinstance(targets, set) else targets!r} names modules of "
                f"{type(inner).__name__}, but exclude_modules={config.exclude_modules!r}, "
                f"layers_to_transform={config.layers_to_transform!r}, layers_pattern={config.layers_pattern!r} and "
                f"modules_to_save={config.modules_to_save!r} leave none of them to wrap"
            )
        for key in selected:
            module = model.get_submodule(key)
            base = module.base_layer if isinstance(module, NodeAdaptiveLayer) else module
            check_wrappable(base, config.node_axis, key)

    @staticmethod
    def _check_target_module_exists(peft_config: STLoraConfig, key: str) -> Any:
        """The output seam always; a forecaster layer as PEFT's own matching decides.

        PEFT's ``check_target_module_exists`` applies ``target_modules``, ``exclude_modules``,
        ``layers_to_transform`` / ``layers_pattern`` and ``modules_to_save`` as for LoRA; its
        "excluded" answer is passed on as it is, so PEFT reports the excluded modules.
        """
        if key == SEAM_NAME:
            return True
        if key.startswith(SEAM_NAME + ".") or not peft_config.target_modules:
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
        """Add the adapter to the seam's predictor layer or a NALL, wrapping the target first if needed."""
        if isinstance(target, (STLoraPredictorLayer, NodeAdaptiveLayer)):
            target.update_layer(adapter_name, peft_config, *self._layer_placement(target))
            return
        if isinstance(target, ForecastSeam):
            new_module = STLoraPredictorLayer(target, peft_config.num_nodes)
            new_module.update_layer(adapter_name, peft_config, *forecaster_placement(self.model, self.prefix))
            self._replace_module(parent, target_name, new_module, target)
            return
        new_module = NodeAdaptiveLayer(target, current_key)
        new_module.update_layer(adapter_name, peft_config)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """PEFT's replacement, except for the seam and its predictor layer, swapped as they are.

        PEFT's version places the new module by the weights of the replaced one; the seam has none
        (the predictor layer was placed on the forecaster's device and dtype when built).
        """
        if isinstance(child, (ForecastSeam, STLoraPredictorLayer)):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _layer_placement(self, layer: nn.Module) -> tuple[torch.device | None, torch.dtype | None] | tuple[()]:
        """Where a new adapter of ``layer`` goes: the forecaster's placement for the predictor layer."""
        return forecaster_placement(self.model, self.prefix) if isinstance(layer, STLoraPredictorLayer) else ()

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
        """Refuse to merge; otherwise put the seam and every wrapped layer back (PEFT's unloading)."""
        if merge:
            self._check_merge_allowed()
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)

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
