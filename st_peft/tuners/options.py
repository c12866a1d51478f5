"""peft's standard config options on st-peft's tuners: the rules both tuners share.

Both tuners choose their targets with peft's own matching (``check_target_module_exists``), so
``target_modules``, ``exclude_modules`` and ``layers_to_transform`` / ``layers_pattern`` mean what
they mean for LoRA, with LoRA's rules on combining them. ``modules_to_save``, ``init_weights``
and ``inference_mode`` apply too. An option that cannot apply is refused with the reason, never
accepted and ignored.
"""

from __future__ import annotations

from typing import Any


def normalise_target_options(config: Any) -> None:
    """Turn list-valued ``target_modules`` / ``exclude_modules`` into sets, as ``LoraConfig`` does."""
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name)
        if isinstance(value, (list, tuple)):
            setattr(config, name, set(value))


def check_shared_options(config: Any, method: str) -> None:
    """Refuse option values neither st-peft tuner can honour, and LoRA's invalid combinations.

    Args:
        config: an ``STLoraConfig`` or ``FactoSTAdapterConfig``.
        method: the method's name in messages (``"ST-LoRA"``).

    Raises:
        ValueError: naming the option and why it cannot apply.
    """
    if config.target_parameters:
        raise ValueError(
            f"{method} wraps modules, not bare parameters: target_parameters={config.target_parameters!r} cannot "
            "apply; name the module that owns the parameter in target_modules"
        )
    if config.task_type is not None:
        raise ValueError(
            f"{method} adapters are called like the forecaster, model(past_values=..., **batch); "
            f"task_type={config.task_type!r} would make get_peft_model wrap the model for a transformers language "
            "task (input_ids, labels). Leave task_type unset"
        )
    layer_selection = config.layers_to_transform is not None or bool(config.layers_pattern)
    if layer_selection and isinstance(config.target_modules, str):
        raise ValueError(
            f"{method}: layers_to_transform / layers_pattern pick layers among the modules named in target_modules; "
            f"with a regex target_modules={config.target_modules!r} write the layer numbers into the regex instead"
        )
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(
            f"{method}: layers_pattern={config.layers_pattern!r} names the layer lists that layers_to_transform "
            "indexes into; it needs layers_to_transform too"
        )


def check_layer_indices_apply(config: Any, keys: list[str], method: str) -> None:
    """Refuse ``layers_to_transform`` for targets it would not filter.

    PEFT's matching reads a layer index only from a name that ``target_modules`` matches by
    suffix; a module it names exactly (``token_hook`` of a ``FactoSTModel``, a forecaster's
    top-level ``head``) is adapted whatever ``layers_to_transform`` says.

    Args:
        config: the adapter's config.
        keys: the modules its targets select, by name.
        method: the method's name in messages.
    """
    if config.layers_to_transform is None or isinstance(config.target_modules, str):
        return
    exact = sorted(key for key in keys if key in config.target_modules)
    if exact:
        raise ValueError(
            f"{method}: layers_to_transform={config.layers_to_transform!r} picks layers by the index in a module's "
            f"name, but target_modules names {exact} in full, and those are adapted whatever the index; name the "
            "repeated layer by its own name (its suffix) or drop layers_to_transform"
        )
