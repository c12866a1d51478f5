"""The options of the ``st-peft`` command line, and the checks of them that need the data or the model.

The schema itself (every flag, YAML key and ``run.json`` entry, their validation and ``docs/options.md``)
is declared in :mod:`st_peft_cli.options`, outside this package so that ``st-peft --help`` answers
without importing torch; its names are re-exported here.
"""

from __future__ import annotations

from typing import Any

from st_peft_cli.options import (
    ADAPTER_NAMES,
    COMMANDS,
    FACTOST_SIZE_NAMES,
    LOSS_NAMES,
    MISSING_INPUTS,
    MODEL_NAMES,
    Choices,
    Command,
    DataOptions,
    DefaultsHelpFormatter,
    EvaluateOptions,
    OptionError,
    OptionWarning,
    PretrainOptions,
    PushOptions,
    RunDirOptions,
    TrainOptions,
    add_arguments,
    did_you_mean,
    flag,
    option,
    option_names,
    option_table,
    options_markdown,
    recorded_options,
    validate,
    yaml_value,
)

__all__ = [
    "ADAPTER_NAMES",
    "COMMANDS",
    "FACTOST_SIZE_NAMES",
    "LOSS_NAMES",
    "MISSING_INPUTS",
    "MODEL_NAMES",
    "Choices",
    "Command",
    "DataOptions",
    "DefaultsHelpFormatter",
    "EvaluateOptions",
    "OptionError",
    "OptionWarning",
    "PretrainOptions",
    "PushOptions",
    "RunDirOptions",
    "TrainOptions",
    "add_arguments",
    "check_graph",
    "did_you_mean",
    "flag",
    "option",
    "option_names",
    "option_table",
    "options_markdown",
    "recorded_options",
    "validate",
    "yaml_value",
]


def check_graph(model: str, accepted: set[str], *, has_graph: bool, given: str | None,
                model_args: dict[str, Any]) -> None:
    """Refuse a graph model without a graph, and warn of a graph given to a model that reads none.

    Args:
        model: ``--model``.
        accepted: the keyword arguments the model takes (a graph model takes ``adjacency``).
        has_graph: whether the data carries a graph (its own, or ``--adjacency``).
        given: ``--adjacency``.
        model_args: ``--model-args``; ``adaptive_adjacency: true`` asks for a learned graph only.

    Raises:
        OptionError: a graph model, no graph, and no explicit request for a learned graph only.
    """
    import warnings

    if "adjacency" in accepted and not has_graph and model_args.get("adaptive_adjacency") is not True:
        learned = " or --model-args '{adaptive_adjacency: true}' for a learned graph only" \
            if "adaptive_adjacency" in accepted else ""
        raise OptionError(f"--model {model} is a graph model and the data has no graph: pass --adjacency{learned}")
    if "adjacency" not in accepted and given is not None:
        warnings.warn(f"--adjacency {given}: {model} reads no graph and ignores it", OptionWarning, stacklevel=2)
