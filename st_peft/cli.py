"""The ``st-peft`` console script.

``st-peft train`` fits a backbone (optionally wrapped by an adapter) on a data set and
writes the trained model (which carries its own scaling statistics), the run's options and
the test metrics into ``--output-dir``; ``st-peft evaluate`` reloads such a folder and
writes metrics as JSON.

Every option can also come from a YAML file (``--config run.yaml``, keys spelled like the
flags with ``_`` or ``-``); flags given on the command line override the file.

Extending the script:
    * a subcommand is a function ``(options) -> None`` plus one :class:`Command` entry in
      :data:`COMMANDS`;
    * an adapter is a function ``(backbone, splits, options) -> model`` plus one entry in
      :data:`ADAPTERS` (``options.adapter_args`` carries its settings).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from st_peft.hub import add_push_arguments, run_push
from st_peft.models.factost.pretraining import add_pretrain_arguments, run_pretrain
from st_peft.models.st_link import STLinkForForecasting
from st_peft.tuners.factost.model import factost_cli_adapter
from st_peft.tuners.st_lora.model import st_lora_cli_adapter

RUN_FILE = "run.json"
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"


def no_adapter(backbone: nn.Module, splits: Any, options: argparse.Namespace) -> nn.Module:
    """Train the backbone itself (every parameter)."""
    return backbone


AdapterFn = Callable[[nn.Module, Any, argparse.Namespace], nn.Module]
ADAPTERS: dict[str, AdapterFn] = {
    "none": no_adapter,
    "factost": factost_cli_adapter,
    "st_lora": st_lora_cli_adapter,
}

# transformers models built from the data's shapes: ``builder(splits, **model_args)``
MODELS: dict[str, Callable[..., nn.Module]] = {"st_link": STLinkForForecasting.from_splits}


def _mapping(text: str) -> dict[str, Any]:
    """Parse a YAML / JSON mapping given on the command line, e.g. ``'{embed_dim: 16}'``."""
    value = yaml.safe_load(text)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{embed_dim: 16}}', got {text!r}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that choose the data set and the windows."""
    parser.add_argument("--dataset", help="built-in name (los-loop, sz-taxi, ...) or a path to a data file")
    parser.add_argument("--input-len", type=int, default=12, help="history steps L")
    parser.add_argument("--horizon", type=int, default=12, help="forecast steps H")
    parser.add_argument("--few-shot", type=float, default=1.0, help="fraction of training windows kept")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``st-peft train``."""
    from st_peft.backbones import BACKBONES
    from st_peft.losses import LOSSES

    add_data_arguments(parser)
    parser.add_argument("--model", default="stid", choices=sorted([*BACKBONES, *MODELS]), help="backbone")
    parser.add_argument("--model-args", type=_mapping, default={}, help="backbone keyword arguments (YAML mapping)")
    parser.add_argument("--backbone-from", help="folder of an earlier `st-peft train --adapter none` run to start from")
    parser.add_argument("--adapter", default="none", choices=sorted(ADAPTERS))
    parser.add_argument("--adapter-args", type=_mapping, default={}, help="adapter settings (YAML mapping)")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--loss", default="mae", choices=sorted(LOSSES),
                        help="training loss in original units, an argument of the model")
    parser.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="resume from a checkpoint folder, or the latest one in --output-dir")
    parser.add_argument("--output-dir", help="where the model, checkpoints and metrics go")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --output-dir")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``st-peft evaluate``."""
    parser.add_argument("--model-dir", help="the --output-dir of an `st-peft train` run")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", help="metrics JSON file (default: <model-dir>/metrics-<split>.json)")


def _require(options: argparse.Namespace, *names: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(options, name) is None]
    if missing:
        raise SystemExit(f"st-peft {options.command}: missing {', '.join(missing)} (flag or --config key)")


def _model_arguments(model: str) -> set[str]:
    """The keyword arguments ``--model`` takes: its constructor's, or its transformers config's fields."""
    from st_peft.backbones import BACKBONES

    if model in MODELS:
        config_class = MODELS[model].__self__.config_class
        return set(inspect.signature(config_class).parameters)
    return set(inspect.signature(BACKBONES[model]).parameters)


def build_backbone(options: argparse.Namespace, splits: Any) -> nn.Module:
    """Instantiate ``options.model`` for ``splits``.

    Shapes, the training span's scaling statistics (``splits.model_kwargs()``), the calendar
    resolution and the graph come from the data; ``--loss`` and ``--model-args`` are passed on.
    """
    from st_peft.backbones import BACKBONES

    accepted = _model_arguments(options.model)
    settings = {"loss": options.loss, **options.model_args}
    if "loss" not in accepted and options.loss != "mae":
        raise SystemExit(f"--loss: {options.model} takes no loss argument")
    settings = {key: value for key, value in settings.items() if key != "loss" or "loss" in accepted}
    if options.model in MODELS:
        return MODELS[options.model](splits, **settings)
    cls = BACKBONES[options.model]
    kwargs: dict[str, Any] = dict(splits.model_kwargs())
    if "steps_per_day" in accepted:
        kwargs["steps_per_day"] = splits.steps_per_day
    if "adjacency" in accepted and splits.adjacency is not None:
        kwargs["adjacency"] = splits.adjacency
    unknown = sorted(set(options.model_args) - accepted)
    if unknown:
        raise SystemExit(f"--model-args {unknown} are not arguments of {cls.__name__}")
    kwargs.update(settings)
    return cls(**kwargs)


def build_model(options: argparse.Namespace, splits: Any) -> nn.Module:
    """The backbone (optionally initialised from ``--backbone-from``) wrapped by ``--adapter``."""
    from safetensors.torch import load_model

    backbone = build_backbone(options, splits)
    if options.backbone_from:
        load_model(backbone, os.path.join(options.backbone_from, MODEL_FILE))
    return ADAPTERS[options.adapter](backbone, splits, options)


def _splits_for(options: argparse.Namespace) -> Any:
    import st_peft.data

    data = st_peft.data.load(options.dataset)
    return st_peft.data.build_splits(data, input_len=options.input_len, horizon=options.horizon,
                                     few_shot=options.few_shot)


def _write_json(path: str | Path, content: dict) -> None:
    with open(path, "w") as handle:
        json.dump(content, handle, indent=2)


def _run_options(options: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(options).items() if k not in ("command", "config", "resume", "overwrite")}


def save_run(output_dir: str, model: nn.Module, options: argparse.Namespace, metrics: dict) -> None:
    """Write ``model.safetensors`` (full state, scaling statistics included), ``run.json`` and ``metrics.json``.

    A ``PeftModel`` also gets its adapter saved the PEFT way under ``adapter/``.
    """
    from peft import PeftModel
    from safetensors.torch import save_model

    os.makedirs(output_dir, exist_ok=True)
    save_model(model, os.path.join(output_dir, MODEL_FILE))
    if isinstance(model, PeftModel):
        model.save_pretrained(os.path.join(output_dir, ADAPTER_DIR))
    _write_json(os.path.join(output_dir, RUN_FILE), _run_options(options))
    _write_json(os.path.join(output_dir, METRICS_FILE), metrics)


def adapter_sampler(model: nn.Module, splits: Any, options: argparse.Namespace) -> Any:
    """The training sampler an adapter asks for, or ``None``.

    A PEFT config may define ``replay_sampler(starts, batch_size, seed)`` (FACTOST's memory
    replay does); it receives the training windows' starts and returns a sampler or ``None``.
    """
    config = getattr(model, "active_peft_config", None)
    if config is None or not hasattr(config, "replay_sampler"):
        return None
    return config.replay_sampler(splits.train["start"], batch_size=options.batch_size, seed=options.seed)


def train(options: argparse.Namespace) -> None:
    """Train ``--model`` (+ ``--adapter``) on ``--dataset`` and write the run into ``--output-dir``."""
    from transformers import set_seed

    from st_peft.training import STTrainer, st_training_args

    _require(options, "dataset", "output_dir")
    finished = os.path.join(options.output_dir, MODEL_FILE)
    if os.path.exists(finished) and not (options.overwrite or options.resume):
        raise SystemExit(f"st-peft train: {options.output_dir} already holds a finished run ({MODEL_FILE}); "
                         "pass --overwrite to replace it or choose another --output-dir")
    set_seed(options.seed)
    splits = _splits_for(options)
    model = build_model(options, splits)
    args = st_training_args(
        os.path.join(options.output_dir, "checkpoints"),
        epochs=options.epochs,
        batch_size=options.batch_size,
        lr=options.lr,
        weight_decay=options.weight_decay,
        seed=options.seed,
    )
    trainer = STTrainer(model, args, splits.train, splits.val, splits.collator,
                        train_sampler=adapter_sampler(model, splits, options),
                        early_stopping_patience=options.patience)
    trainer.train(resume_from_checkpoint=options.resume)
    metrics = trainer.evaluate_test(splits.test)
    if trainer.is_world_process_zero():
        save_run(options.output_dir, model, options, metrics)
        print(json.dumps(metrics, indent=2))


def evaluate(options: argparse.Namespace) -> None:
    """Reload an ``st-peft train`` folder, evaluate it on a split and write the metrics JSON.

    The model carries its scaling statistics; the data set is read again only for its windows.
    """
    from safetensors.torch import load_model

    from st_peft.training import STTrainer, st_training_args

    _require(options, "model_dir")
    with open(os.path.join(options.model_dir, RUN_FILE)) as handle:
        run = argparse.Namespace(command="train", **json.load(handle))
    splits = _splits_for(run)
    # the weights come from the run folder, not from the run's starting point
    run.backbone_from = None
    model = build_model(run, splits)
    load_model(model, os.path.join(options.model_dir, MODEL_FILE))
    args = st_training_args(os.path.join(options.model_dir, "evaluation"), batch_size=options.batch_size,
                            eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    trainer = STTrainer(model, args, data_collator=splits.collator)
    metrics = trainer.evaluate_test(getattr(splits, options.split))
    if trainer.is_world_process_zero():
        output = options.output or os.path.join(options.model_dir, f"metrics-{options.split}.json")
        _write_json(output, metrics)
        print(json.dumps(metrics, indent=2))


@dataclass(frozen=True)
class Command:
    """A subcommand: what it runs, its one-line help and the function that declares its options."""

    run: Callable[[argparse.Namespace], None]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS: dict[str, Command] = {
    "train": Command(train, "train a backbone or an adapter and write model + metrics", add_train_arguments),
    "evaluate": Command(evaluate, "evaluate a trained model folder and write metrics JSON", add_evaluate_arguments),
    "pretrain": Command(run_pretrain, "pretrain a FactoST backbone on univariate series", add_pretrain_arguments),
    "push": Command(run_push, "push a trained model folder to the Hub with its model card", add_push_arguments),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="st-peft", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        sub.add_argument("--config", help="YAML file of options; command-line flags override it")
        command.add_arguments(sub)
        commands[name] = sub
    return parser, commands


def _yaml_defaults(path: str, sub: argparse.ArgumentParser) -> dict[str, Any]:
    with open(path) as handle:
        content = yaml.safe_load(handle) or {}
    if not isinstance(content, dict):
        raise SystemExit(f"{path}: expected a mapping of options, got {type(content).__name__}")
    settings = {key.replace("-", "_"): value for key, value in content.items()}
    known = {action.dest for action in sub._actions} - {"help", "config"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown options {unknown}; known: {sorted(known)}")
    for action in sub._actions:
        if action.dest not in settings:
            continue
        value = settings[action.dest]
        # YAML values get the flags' conversions and checks; PyYAML reads `1e-3` as a string
        if isinstance(value, str) and action.type is not None:
            try:
                value = settings[action.dest] = action.type(value)
            except (ValueError, argparse.ArgumentTypeError) as error:
                raise SystemExit(f"{path}: {action.dest}={value!r}: {error}") from error
        if action.choices is not None and value not in action.choices:
            raise SystemExit(f"{path}: {action.dest}={value!r} is not one of {list(action.choices)}")
    return settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``--config`` YAML values as defaults under the flags."""
    parser, commands = build_parser()
    options = parser.parse_args(argv)
    if options.config:
        sub = commands[options.command]
        sub.set_defaults(**_yaml_defaults(options.config, sub))
        options = parser.parse_args(argv)
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``st-peft`` console script (also under ``accelerate launch``)."""
    from st_peft.training.distributed import leave_process_group

    options = parse_args(argv)
    COMMANDS[options.command].run(options)
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
