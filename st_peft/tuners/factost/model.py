"""The FACTOST tuner: how PEFT injects, trains, saves and removes FactoST adapters.

A ``FactoSTModel`` backbone routes its tokens through one sub-module, ``token_hook``. The
tuner replaces that hook by a ``FactoSTAdapterLayer`` that wraps it, so PEFT's own
machinery (several adapters, ``set_adapter``, ``disable_adapter()``, ``delete_adapter``,
trainable-parameter bookkeeping, saving and loading) works as for LoRA, and the backbone
stays frozen. Nothing is monkey-patched and there is no fallback path: an adapter that
cannot run raises.
"""

from __future__ import annotations

import argparse
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from st_peft.models.factost.modeling_factost import FactoSTTokenHook
from st_peft.shipped import shipped_checkpoint
from st_peft.tuners.checkpoint_keys import PerNodeCheckpointMixin
from st_peft.tuners.factost.config import FactoSTAdapterConfig
from st_peft.tuners.factost.layer import MERGE_REFUSAL, FactoSTAdapterLayer
from st_peft.tuners.options import check_layer_indices_apply
from st_peft.tuners.placement import forecaster_placement


class FactoSTAdapterModel(PerNodeCheckpointMixin, BaseTuner):
    """FACTOST tuner (PEFT type ``FACTOST``) around a frozen ``FactoSTModel``.

    Build it with ``peft.get_peft_model(backbone, FactoSTAdapterConfig(**splits.size_kwargs(),
    steps_per_day=...))``; the adapted model is called like the backbone, ``model(**batch)`` with
    ``past_values`` ``(B, L, N, C)`` in original units, ``past_time_features``,
    ``future_time_features`` and optionally ``future_values``, and returns the backbone's
    ``ForecastOutput``: ``prediction_outputs`` ``(B, H, N, C)`` and ``quantile_outputs`` in original
    units, and ``loss`` of the adapted forecast when ``future_values`` is given. The adapter edits
    the backbone's tokens, which live in the units of each series' instance normalisation.

    Args:
        model: the ``FactoSTModel`` backbone.
        peft_config: the adapter's configuration, or a dict of them.
        adapter_name: name of the first adapter.
        low_cpu_mem_usage: create the adapter's weights on the meta device (for loading).
        state_dict: inject the adapters named by this state dict's keys.
    """

    prefix: str = "factost_"
    adapter_key_parts = FactoSTAdapterLayer.adapter_layer_names
    per_node_key_suffixes = ("factost_metadata.node_embedding.weight",)
    method_label = "FACTOST"
    tuner_layer_cls = FactoSTAdapterLayer
    target_module_mapping: dict[str, list[str]] = {"factost": ["token_hook"]}

    @property
    def forecasts_nodes_independently(self) -> bool:
        """Whether each node's forecast reads its own series only: the backbone's, unless an active
        adapter's interaction filtering attends across nodes."""
        mixing = any(self.peft_config[name].use_interaction for name in self.active_adapters if name in self.peft_config)
        return not mixing and bool(getattr(self.model, "forecasts_nodes_independently", False))

    def _prepare_model(self, peft_config: FactoSTAdapterConfig, model: nn.Module) -> None:
        """Refuse a config without num_nodes, backbones without a FactoST token hook, and layer indices that
        would not apply to it."""
        if peft_config.num_nodes is None:
            raise ValueError("FactoSTAdapterConfig needs num_nodes, the number of nodes N of the graph "
                             "(FactoSTAdapterConfig(**splits.size_kwargs(), ...) gives it)")
        hooks = [name for name, module in model.named_modules() if isinstance(module, FactoSTTokenHook)]
        if not hooks:
            raise TypeError(
                f"FACTOST adapters need a FactoSTModel backbone (a module with a FactoSTTokenHook); "
                f"got {type(model).__name__}."
            )
        check_layer_indices_apply(peft_config, [key for key in hooks if check_target_module_exists(peft_config, key)],
                                  "FACTOST")

    def _create_and_replace(
        self,
        peft_config: FactoSTAdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        """Add the adapter to the hook's tuner layer, wrapping the hook first if needed."""
        if isinstance(target, FactoSTAdapterLayer):
            target.update_layer(adapter_name, peft_config, *forecaster_placement(self.model, self.prefix))
            return
        if not isinstance(target, FactoSTTokenHook):
            raise TypeError(
                f"FACTOST can only wrap the backbone's FactoSTTokenHook; target_modules matched {current_key!r}, "
                f"a {type(target).__name__}."
            )
        new_module = FactoSTAdapterLayer(target, adapter_name, peft_config, self.model.config.hidden_size,
                                         *forecaster_placement(self.model, self.prefix))
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is made active
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Swap the hook for its tuner layer.

        PEFT's version places the new module by the weights of the replaced one; the token hook
        has none, so the tuner layer was placed on the backbone's device and dtype when built.
        """
        setattr(parent, child_name, new_module)

    def _check_merge_allowed(self) -> None:
        """FACTOST never merges; the error says why."""
        raise ValueError(MERGE_REFUSAL)


def factost_cli_adapter(backbone: nn.Module, splits: Any, options: argparse.Namespace) -> nn.Module:
    """``st-peft train --adapter factost``: a pretrained FactoST backbone with a FACTOST adapter.

    FACTOST adapts FactoST backbones only, so the ``--model`` backbone the command line built
    is not used. ``--adapter-args`` may name the backbone folder (``backbone``, default: the
    shipped ``DEFAULT_FACTOST_BACKBONE``) and any ``FactoSTAdapterConfig`` field; the sizes
    (``splits.size_kwargs()``) and ``steps_per_day`` come from the data, and ``--loss`` sets the
    backbone's training loss (``FactoSTConfig.loss``).

    Args:
        backbone: the command line's backbone (ignored, see above).
        splits: the data's ``ForecastingSplits``.
        options: parsed options; ``options.adapter_args`` is a mapping.

    Returns:
        The ``PeftModel`` with its FACTOST adapter.
    """
    from peft import get_peft_model

    from st_peft.models.factost import FactoSTModel

    settings = dict(options.adapter_args)
    overrides = {"loss": options.loss} if getattr(options, "loss", None) else {}
    pretrained = FactoSTModel.from_pretrained(settings.pop("backbone", shipped_checkpoint()), **overrides)
    for name, value in {**splits.size_kwargs(), "steps_per_day": splits.steps_per_day}.items():
        settings.setdefault(name, value)
    return get_peft_model(pretrained, FactoSTAdapterConfig(**settings))
