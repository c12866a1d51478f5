"""The one declaration of every ``st-peft`` option: command-line flags, YAML keys and ``run.json`` come from it.

Each subcommand's options are a dataclass; each field is one option, spelled ``--input-len`` on the
command line and ``input_len`` (or ``input-len``) in a ``--config`` YAML file. A field's type and its
:func:`option` metadata say how a flag's text is read (``parse``), what values are allowed
(``minimum``, ``maximum``, ``above``, ``choices``, ``pattern``; floats must be finite) and whether a
run records it in ``run.json`` (``recorded``). :func:`add_arguments` builds the argparse flags,
:func:`validate` checks the parsed values, whatever their source, and :func:`recorded_options`
picks what ``run.json`` keeps.

Why not ``transformers.HfArgumentParser``: it reads the same kind of declaration, but importing it
imports transformers (about 2 s here), and ``st-peft --help`` and argument errors must answer in well
under that; it has no range or finiteness checks, and it turns a YAML ``resume: 'no'`` into a string
without a word. This module keeps its conventions (dataclasses, ``metadata={"help": ...}``, ``None``
for "not given") on the standard library alone, so it imports in milliseconds.

It lives outside the ``st_peft`` package because importing anything under ``st_peft`` runs
``st_peft/__init__.py``, which registers the PEFT methods and so imports torch, transformers and peft
(about 10 s). For the same reason the choices that registries hold (``--model``, ``--adapter``,
``--loss``, ``--missing-inputs``, ``pretrain --size``) are written out here; ``tests/test_cli_front.py``
and ``tests/test_missing_inputs.py`` keep them equal to the registries, and :func:`add_arguments` / :func:`validate` take the registries' own names where the
caller has them (``st_peft.cli``, where a user may register an adapter).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MODEL_NAMES = ("gwnet", "st_link", "stgcn", "stid")
"""``--model``'s choices: ``st_peft.backbones.BACKBONES`` and ``st_peft.cli.MODELS``."""
ADAPTER_NAMES = ("factost", "none", "st_lora")
"""``--adapter``'s choices: ``st_peft.cli.ADAPTERS``."""
LOSS_NAMES = ("huber", "mae", "mse")
"""``--loss``'s choices: ``st_peft.losses.LOSSES``."""
FACTOST_SIZE_NAMES = ("base", "cpu", "medium", "small", "tiny", "tiny-long")
"""``pretrain --size``'s choices: ``st_peft.models.factost.FACTOST_SIZES``."""
MISSING_INPUTS = ("mean", "carry-forward", "mask-channel")
"""``--missing-inputs``' choices: ``st_peft.data.missing_inputs.MISSING_INPUTS``."""

Choices = Mapping[str, Sequence[str]]
"""Choices of named options that replace the schema's own (a registry's names), e.g. ``{"adapter": [...]}``."""

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
NON_EMPTY = re.compile(r".*\S.*")


class OptionError(ValueError):
    """An option's value is refused; the message names the flag, the YAML key, the value and what is allowed."""


class OptionWarning(UserWarning):
    """An option is accepted but does nothing here (a graph given to a model that reads none)."""


def option(default: Any = None, help: str = "", *, parse: Callable[[str], Any] | None = None,
           minimum: float | None = None, maximum: float | None = None, above: float | None = None,
           choices: Iterable[str] | None = None, pattern: re.Pattern | None = None,
           recorded: bool = True, positional: bool = False) -> Any:
    """A dataclass field declaring one option.

    Args:
        default: the value when neither the command line nor the YAML file gives one (a dict or list is copied).
        help: the line ``--help`` shows (with the default appended).
        parse: reads the flag's text (default: from the field's type).
        minimum, maximum: inclusive bounds of a number.
        above: an exclusive lower bound of a number.
        choices: the allowed values of a text option.
        pattern: a regular expression a text option must match whole.
        recorded: whether ``run.json`` keeps it (options that change what a run computes).
        positional: an argument without a flag (``RUN_DIR``).
    """
    metadata = {"help": help, "parse": parse, "minimum": minimum, "maximum": maximum, "above": above,
                "choices": None if choices is None else tuple(choices), "pattern": pattern,
                "recorded": recorded, "positional": positional}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def parse_mapping(text: str) -> dict[str, Any]:
    """A YAML / JSON mapping given on the command line, e.g. ``'{embed_dim: 16}'``."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise argparse.ArgumentTypeError(f"{text!r} is not a YAML mapping such as '{{embed_dim: 16}}' ({problem})") \
            from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{embed_dim: 16}}', got {text!r}")
    return value


def parse_channel(text: str) -> int | str:
    """A channel given on the command line: its index (``0``) or its name (``inflow``)."""
    return int(text) if text.strip().isdigit() else text


def parse_missing_value(text: str) -> float | str:
    """``--missing-value``: a finite number, or ``none`` (nothing is missing)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number or none, got {text!r}")
    return value


# ---- the options of each subcommand -------------------------------------------------------------


@dataclass
class DataOptions:
    """The data set, the data choices and the windows (``st-peft train``)."""

    dataset: str | None = option(help="built-in name (los-loop, sz-taxi, ...), a data file (.npz, .h5, .csv), a "
                                 "folder saved by datasets' save_to_disk, or a Hub dataset id (org/name)")
    steps_per_day: int | None = option(help="time steps per day of data without timestamps (288 for 5 minutes; "
                                       "required for .npz)", minimum=1, maximum=86400)
    start: str | None = option(help="the first timestamp of data without timestamps, e.g. '2024-03-01 00:00'")
    adjacency: str | None = option(help="graph file: dense .csv / .npz / .npy, PEMS distance CSV (from,to,cost with "
                                   "a header), edge list, or DCRNN adj_mx.pkl")
    channels: list[int | str] | None = option(
        help="channels the model reads, by index or name (all by default); they are also forecast and scored "
        "unless --target-channels says otherwise", parse=parse_channel)
    target_channels: list[int | str] | None = option(
        help="channels forecast and scored, by index or name (default: --channels)", parse=parse_channel)
    missing_value: float | str | None = option(
        help="the value that means 'missing' (a number), or none when every value, zeros included, is real "
        "(default: the format's: 0 for .npz and .h5, empty cells for .csv)", parse=parse_missing_value)
    missing_inputs: str | None = option(
        help="how missing inputs reach the model: mask-channel (the observed mask of each input channel with a "
        "missing entry in the training span is one more input channel), carry-forward (the node's last observed "
        "value) or mean (the training mean alone) (default: mask-channel, measured best in "
        "benchmarks/missing_inputs.py; mean with --adapter factost, whose backbone reads the mask itself)",
        choices=MISSING_INPUTS)
    date_column: str | None = option(help="the date column of a .csv (default: date); none when it has none")
    columns: list[str] | None = option(help="the node columns of a .csv to read (default: all but the date)")
    input_len: int = option(12, "history steps L", minimum=1)
    horizon: int = option(12, "forecast steps H", minimum=1)
    few_shot: float = option(1.0, "fraction of training windows kept", above=0.0, maximum=1.0)
    batch_size: int = option(32, "windows per batch", minimum=1)
    seed: int = option(0, "seed of the weights, the batches and the dropout", minimum=0, maximum=2**32 - 1)


@dataclass
class TrainOptions(DataOptions):
    """``st-peft train``."""

    model: str = option("stid", "backbone", choices=MODEL_NAMES)
    model_args: dict[str, Any] = option({}, "backbone keyword arguments (YAML mapping)", parse=parse_mapping)
    backbone_from: str | None = option(help="folder of an earlier `st-peft train --adapter none` run to start from")
    adapter: str = option("none", "adapter wrapped around the backbone", choices=ADAPTER_NAMES)
    adapter_args: dict[str, Any] = option({}, "adapter settings (YAML mapping)", parse=parse_mapping)
    epochs: float = option(10.0, "passes over the training windows", above=0.0)
    max_steps: int | None = option(help="optimizer steps; overrides --epochs", minimum=1)
    lr: float = option(1e-3, "learning rate", above=0.0)
    weight_decay: float = option(1e-4, "weight decay of AdamW", minimum=0.0)
    loss: str = option("mae", "training loss in original units, an argument of the model", choices=LOSS_NAMES)
    node_batch_size: int | None = option(
        help="train on this many nodes (K of the graph's N) per batch, drawn anew for every batch (default: every "
        "node); an epoch then visits each training window ceil(N / K) times, so that it sees every (window, node) "
        "pair about once and --epochs, --patience and the learning-rate schedule mean what they mean on the whole "
        "graph (--max-steps still counts optimizer steps); evaluation still scores every node, in chunks of this "
        "size where the model forecasts each node on its own",
        minimum=1)
    node_sampler: str | None = option(
        help="how --node-batch-size draws its nodes: uniform, or bfs (graph-local patches grown by breadth-first "
        "search, so that graph convolutions see neighbours) (default: uniform)", choices=("uniform", "bfs"))
    patience: int = option(5, "early-stopping patience in evaluations", minimum=1)
    resume: bool = option(False, "continue the unfinished run in --output-dir from its newest complete checkpoint",
                          recorded=False)
    output_dir: str | None = option(help="the run folder: model, checkpoints, options and metrics",
                                    pattern=NON_EMPTY)
    overwrite: bool = option(False, "remove the run in --output-dir and start over", recorded=False)
    allow_changed_data: bool = option(False, "--resume even if a data or graph file changed since the run started",
                                      recorded=False)


@dataclass
class RunDirOptions:
    """The run folder a command reads: ``RUN_DIR``, or ``--model-dir`` (also a YAML key)."""

    run_dir: str | None = option(help="the --output-dir of an `st-peft train` run", positional=True)
    model_dir: str | None = option(help="RUN_DIR as a flag or YAML key")
    allow_changed_data: bool = option(False, "read the run's data even if a data or graph file changed since it "
                                      "trained")


@dataclass
class EvaluateOptions(RunDirOptions):
    """``st-peft evaluate``."""

    split: str = option("test", "the split to score", choices=("val", "test"))
    batch_size: int = option(64, "windows per batch", minimum=1)
    output: str | None = option(help="metrics JSON file (default: <model-dir>/metrics-<split>.json)")


@dataclass
class PushOptions(RunDirOptions):
    """``st-peft push``."""

    repo_id: str | None = option(help="Hub repository to push to, org/name", pattern=HUB_ID)
    base_model: str | None = option(help="Hub id of the backbone an adapter belongs to (adapters only)",
                                    pattern=HUB_ID)
    license: str = option("apache-2.0", "licence identifier written to the card")
    private: bool = option(False, "create the repository as private")
    token: str | None = option(help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    timeout: float | None = option(help="seconds without an answer before the push gives up (default: "
                                   "ST_PEFT_HUB_TIMEOUT or 30)", above=0.0, maximum=86400.0)
    save_dir: str | None = option(help="write the upload folder here and do not upload")


@dataclass
class PretrainOptions:
    """``st-peft pretrain``: a FactoST backbone on the streamed corpus (``st_peft.models.factost.pretraining``).

    The defaults of the corpus and the optimiser are those of ``CorpusConfig`` and ``PretrainingOptions``
    (``tests/test_cli_front.py`` keeps them equal); the loop checks the values again.
    """

    size: str = option("cpu", "named model size", choices=FACTOST_SIZE_NAMES)
    data: list[str] = option(["nyc-taxi", "etth1", "chickenpox"], "built-in data set names or files whose series "
                             "form the real part of the corpus")
    hf_dataset: str | None = option(help="a datasets.Dataset saved with save_to_disk (one series per row), used "
                                    "instead of --data")
    column: str = option("target", "series column of --hf-dataset")
    output: str | None = option(help="run folder; a folder with a checkpoint is resumed (required)",
                                pattern=NON_EMPTY)
    max_steps: int = option(2000, "optimizer steps; the learning-rate schedule spans them", minimum=1)
    max_minutes: float | None = option(help="stop with a checkpoint after this much wall-clock time; run again to "
                                       "resume", above=0.0)
    learning_rate: float = option(1e-3, "peak AdamW learning rate", above=0.0)
    warmup_steps: int = option(100, "linear warm-up steps (at most --max-steps)", minimum=0)
    tokens_per_batch: int = option(4096, "target of windows x (context + horizon) / patch length per batch",
                                   minimum=1)
    max_batch_size: int = option(256, "most windows in a batch", minimum=1)
    long_context_probability: float = option(0.25, "share of batches whose context is drawn from the upper half "
                                             "of the lengths", minimum=0.0, maximum=1.0)
    synthetic_weight: float = option(0.5, "relative share of synthetic windows", minimum=0.0)
    real_weight: float = option(0.3, "relative share of real windows", minimum=0.0)
    mixup_weight: float = option(0.2, "relative share of TSMixup windows", minimum=0.0)
    seed: int = option(0, "seed of the weights, the training and the corpus", minimum=0, maximum=2**32 - 1)
    validate_every: int = option(500, "steps between validation scores (0: only at the end)", minimum=0)
    log_every: int = option(50, "steps between logged training losses", minimum=1)
    cpu: bool = option(False, "stay on the CPU even with an accelerator")


# ---- building flags, validating values ---------------------------------------------------------------


def _base(annotation: Any) -> tuple[Any, bool]:
    """The type of a field without ``None``, and whether it is a list."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _fields(schema: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(schema)
    return [(item, hints[item.name]) for item in dataclasses.fields(schema)]


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default, unless its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _choices(item: dataclasses.Field, choices: Choices | None) -> tuple[str, ...] | None:
    """The allowed values of the option ``item``: ``choices``' entry for it, else its declaration's."""
    if choices and item.name in choices:
        return tuple(choices[item.name])
    return item.metadata["choices"]


def flag(name: str) -> str:
    """The command-line spelling of the option ``name``: ``--input-len``."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, schema: type, choices: Choices | None = None) -> None:
    """Add one argparse argument per field of ``schema``; ``--help`` shows each default.

    ``choices`` replaces the declared choices of the options it names (a registry's names).
    """
    for item, annotation in _fields(schema):
        meta = item.metadata
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        base, many = _base(annotation)
        kwargs: dict[str, Any] = {"help": meta["help"], "default": default}
        if base is bool:
            parser.add_argument(flag(item.name), action="store_true", **kwargs)
            continue
        kwargs["type"] = meta["parse"] or (base if base in (int, float) else str)
        if _choices(item, choices):
            kwargs["choices"] = _choices(item, choices)
        if many:
            kwargs["nargs"] = "+"
        if meta["positional"]:
            parser.add_argument(item.name, nargs="?", metavar=item.name.upper(), **kwargs)
        else:
            parser.add_argument(flag(item.name), **kwargs)


def _describe(item: dataclasses.Field) -> str:
    return f"{flag(item.name)} ({item.name} in YAML)"


def _check_number(value: Any, whole: bool, meta: dict[str, Any]) -> str | None:
    """Why ``value`` is not allowed for a number option, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected a {'whole ' if whole else ''}number, got {value!r}"
    if whole and not isinstance(value, int):  # 64.0 too: a batch size or a seed must be an int downstream
        return f"expected a whole number, got {value!r}"
    if not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    if meta["minimum"] is not None and value < meta["minimum"]:
        return f"must be at least {meta['minimum']:g}, got {value!r}"
    if meta["above"] is not None and value <= meta["above"]:
        return f"must be above {meta['above']:g}, got {value!r}"
    if meta["maximum"] is not None and value > meta["maximum"]:
        return f"must be at most {meta['maximum']:g}, got {value!r}"
    return None


def _problem(value: Any, annotation: Any, meta: dict[str, Any], allowed: tuple[str, ...] | None) -> str | None:
    """Why ``value`` is not allowed for an option of type ``annotation`` with ``meta`` and the choices
    ``allowed``, or None."""
    base, many = _base(annotation)
    if many:
        if not isinstance(value, list) or not value:
            return f"expected a list of one or more values, got {value!r}"
        for element in value:
            problem = _problem(element, base, meta, allowed)
            if problem:
                return problem
        return None
    if base is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if base in (int, float):
        return _check_number(value, base is int, meta)
    if typing.get_origin(base) is dict:
        return None if isinstance(value, dict) else f"expected a mapping such as '{{embed_dim: 16}}', got {value!r}"
    if meta["parse"] is parse_missing_value:
        if value == "none":
            return None
        return _check_number(value, False, meta) and f"expected a number or none, got {value!r}"
    if meta["parse"] is parse_channel:
        ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        return None if ok else f"expected a channel index or name, got {value!r}"
    if not isinstance(value, str):
        return f"expected text, got {value!r}"
    if allowed and value not in allowed:
        return f"{value!r} is not one of {list(allowed)}{did_you_mean(value, allowed)}"
    if meta["pattern"] is not None and not meta["pattern"].fullmatch(value):
        what = "a repository id such as org/name" if meta["pattern"] is HUB_ID else "a non-empty path"
        return f"expected {what}, got {value!r}"
    return None


def validate(schema: type, values: dict[str, Any], choices: Choices | None = None) -> None:
    """Check every option of ``schema`` in ``values`` (parsed flags with YAML values under them).

    ``None`` means "not given" and is allowed wherever the default is None; ``choices`` replaces the
    declared choices of the options it names.

    Raises:
        OptionError: the first refused value, naming its flag and YAML key.
    """
    for item, annotation in _fields(schema):
        value = values.get(item.name)
        if value is None and item.default is None:
            continue
        problem = _problem(value, annotation, item.metadata, _choices(item, choices))
        if problem:
            raise OptionError(f"{_describe(item)}: {problem}")


def yaml_value(schema: type, name: str, value: Any) -> Any:
    """A YAML file's ``value`` for the option ``name``: text is read like the flag's text (PyYAML reads
    ``1e-3`` as a string), anything else is kept for :func:`validate` to judge."""
    item, annotation = next((item, hint) for item, hint in _fields(schema) if item.name == name)
    base, many = _base(annotation)
    parse = item.metadata["parse"] or (base if base in (int, float) else None)
    if parse is None:
        return value
    try:
        if many and isinstance(value, list):
            return [parse(element) if isinstance(element, str) else element for element in value]
        return parse(value) if isinstance(value, str) else value
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise OptionError(f"{_describe(item)}: {error}") from None


def recorded_options(schema: type, values: dict[str, Any]) -> dict[str, Any]:
    """The options of ``values`` that a run records in ``run.json``: those that change what it computes."""
    return {item.name: values.get(item.name) for item in dataclasses.fields(schema) if item.metadata["recorded"]}


def option_names(schema: type) -> list[str]:
    """The YAML keys of ``schema``, in declaration order."""
    return [item.name for item in dataclasses.fields(schema)]


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``"; did you mean 'epochs'?"`` for the known word closest to ``word``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def option_table(schema: type) -> str:
    """A markdown table of ``schema``'s options: flag, YAML key, default, allowed values and help (the docs')."""
    lines = ["| flag | YAML key | default | allowed | what it does |", "|---|---|---|---|---|"]
    for item, annotation in _fields(schema):
        meta = item.metadata
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        base, many = _base(annotation)
        allowed = []
        if meta["choices"]:
            allowed.append(", ".join(meta["choices"]))
        if base is bool:
            allowed.append("true, false")
        for key, sign in (("minimum", ">="), ("above", ">"), ("maximum", "<=")):
            if meta[key] is not None:
                allowed.append(f"{sign} {meta[key]:g}")
        if base in (int, float):
            allowed.append("whole number" if base is int else "finite number")
        if many:
            allowed.append("one or more")
        name = item.name.upper() if meta["positional"] else f"`{flag(item.name)}`"
        shown = "" if default is None else f"`{default}`"
        text = meta["help"].replace("|", "\\|")
        lines.append(f"| {name} | `{item.name}` | {shown} | {'; '.join(allowed)} | {text} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Command:
    """A subcommand as the parser knows it: its one-line help and the dataclass of its options.

    What it runs is ``st_peft.cli.RUNNERS[name]``, imported only once its options are parsed.
    """

    help: str
    schema: type


COMMANDS: dict[str, Command] = {
    "train": Command("train a backbone or an adapter and write model + metrics", TrainOptions),
    "evaluate": Command("evaluate a trained model folder and write metrics JSON", EvaluateOptions),
    "pretrain": Command("pretrain a FactoST backbone on univariate series", PretrainOptions),
    "push": Command("push a trained model folder to the Hub with its model card", PushOptions),
}


def options_markdown() -> str:
    """``docs/options.md``: one table per subcommand, generated from the schema (``python -m st_peft_cli.options``)."""
    parts = [
        "# Command-line options",
        "",
        "Generated from `st_peft_cli/options.py` by `python -m st_peft_cli.options > docs/options.md`; "
        "`tests/test_options_docs.py` fails when they differ. Every option is also a key of a "
        "`--config` YAML file (`input_len` or `input-len`); flags override the file. Values are checked "
        "for type, range and finiteness wherever they come from, and YAML booleans must be `true` / `false`.",
    ]
    for name, command in COMMANDS.items():
        parts += ["", f"## st-peft {name}", "", option_table(command.schema)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(options_markdown(), end="")
