"""The ``st-peft`` console script.

``st-peft train`` fits a backbone (optionally wrapped by an adapter) on a data set and
writes a run folder (:mod:`st_peft.runs`): the trained model, which carries its own scaling
statistics, the run's options and the test metrics. ``st-peft evaluate`` reloads such a
folder and writes metrics as JSON; ``st-peft push`` puts its model on the Hub with a card.

Every option can also come from a YAML file (``--config run.yaml``, keys spelled like the
flags with ``_`` or ``-``); flags given on the command line override the file.

A mistake in the input (a flag, a data file, a busy or finished run folder, the Hub) prints
one line that says what to fix and exits with status 2; ``--debug`` shows the traceback.

Extending the script:
    * a subcommand is a function ``(options) -> None`` plus one :class:`Command` entry in
      :data:`COMMANDS`;
    * an adapter is a function ``(backbone, splits, options) -> model`` plus one entry in
      :data:`ADAPTERS` (``options.adapter_args`` carries its settings).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from st_peft.data.errors import DataError
from st_peft.hub import HubError, card_dataset, push_adapter, push_backbone, save_for_hub
from st_peft.models.factost.pretraining import add_pretrain_arguments, run_pretrain
from st_peft.models.st_link import STLinkForForecasting
from st_peft.runs import RunFolder, RunFolderError, RunWarning, write_json_atomic
from st_peft.training.trainer import NonFiniteLossError
from st_peft.tuners.factost.model import factost_cli_adapter
from st_peft.tuners.st_lora.model import st_lora_cli_adapter

USAGE_ERROR = 2
RUN_FAILED = 1


class UsageError(Exception):
    """A mistake in what the user asked for; the message says what to fix."""


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

# options that do not change what a run computes
NOT_RUN_OPTIONS = ("command", "config", "resume", "overwrite", "debug")


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
    parser.add_argument("--dataset", help="built-in name (los-loop, sz-taxi, ...), a data file (.npz, .h5, .csv), "
                        "a folder saved by datasets' save_to_disk, or a Hub dataset id (org/name)")
    parser.add_argument("--steps-per-day", type=int, help="time steps per day of data without timestamps "
                        "(288 for 5 minutes; required for .npz)")
    parser.add_argument("--start", help="the first timestamp of data without timestamps, e.g. '2024-03-01 00:00'")
    parser.add_argument("--adjacency", help="graph file: dense .csv / .npz / .npy, PEMS distance CSV (from,to,cost "
                        "with a header), edge list, or DCRNN adj_mx.pkl")
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
    parser.add_argument("--epochs", type=float, default=10, help="passes over the training windows (> 0)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (> 0); overrides --epochs")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--loss", default="mae", choices=sorted(LOSSES),
                        help="training loss in original units, an argument of the model")
    parser.add_argument("--patience", type=int, default=5, help="early-stopping patience in evaluations")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run in --output-dir from its newest complete checkpoint")
    parser.add_argument("--output-dir", help="the run folder: model, checkpoints, options and metrics")
    parser.add_argument("--overwrite", action="store_true", help="remove the run in --output-dir and start over")


def add_run_dir_argument(parser: argparse.ArgumentParser) -> None:
    """The run folder to read: ``RUN_DIR``, or ``--model-dir`` (also a YAML key)."""
    parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="the --output-dir of an `st-peft train` run")
    parser.add_argument("--model-dir", help="RUN_DIR as a flag or YAML key")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``st-peft evaluate``."""
    add_run_dir_argument(parser)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", help="metrics JSON file (default: <model-dir>/metrics-<split>.json)")


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``st-peft push``."""
    add_run_dir_argument(parser)
    parser.add_argument("--repo-id", help="Hub repository to push to, org/name")
    parser.add_argument("--base-model", help="Hub id of the backbone an adapter belongs to (adapters only)")
    parser.add_argument("--license", default="apache-2.0", help="licence identifier written to the card")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--timeout", type=float, help="seconds without an answer before the push gives up "
                        "(default: ST_PEFT_HUB_TIMEOUT or 30)")
    parser.add_argument("--save-dir", help="write the upload folder here and do not upload")


@contextmanager
def _user_input(what: str) -> Iterator[None]:
    """Report a ``ValueError`` / ``TypeError`` raised while building ``what`` from the options as a :class:`UsageError`."""
    try:
        yield
    except DataError:
        raise
    except (ValueError, TypeError) as error:
        raise UsageError(f"{what}: {error}") from error


def _require(options: argparse.Namespace, *names: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(options, name) is None]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (flag or --config key)")


def _run_dir(options: argparse.Namespace) -> RunFolder:
    """The folder of the finished run ``RUN_DIR`` / ``--model-dir`` names.

    Raises:
        UsageError: no such folder. RunFolderError: it holds no finished run.
    """
    given = {path for path in (options.run_dir, options.model_dir) if path}
    if not given:
        raise UsageError("missing RUN_DIR (or --model-dir): the --output-dir of an `st-peft train` run")
    if len(given) > 1:
        raise UsageError(f"RUN_DIR {options.run_dir} and --model-dir {options.model_dir} differ: give one")
    path = given.pop()
    if not Path(path).is_dir():
        raise UsageError(f"no folder {path}: give the --output-dir of an `st-peft train` run")
    folder = RunFolder(path)
    folder.finished_run()
    return folder


def _model_arguments(model: str) -> set[str]:
    """The keyword arguments ``--model`` takes: its transformers config's fields, and ``adjacency`` for a graph model."""
    from st_peft.backbones import BACKBONES

    if model in MODELS:
        return set(inspect.signature(MODELS[model].__self__.config_class).parameters)
    model_class = BACKBONES[model]
    graph = {"adjacency"} & set(inspect.signature(model_class).parameters)
    return set(inspect.signature(model_class.config_class).parameters) | graph


def build_backbone(options: argparse.Namespace, splits: Any) -> nn.Module:
    """Instantiate ``options.model`` for ``splits``.

    Shapes, the training span's scaling statistics (``splits.model_kwargs()``), the calendar
    resolution and the graph come from the data; ``--loss`` and ``--model-args`` are passed on.
    """
    from st_peft.backbones import BACKBONES

    accepted = _model_arguments(options.model)
    if "loss" not in accepted and options.loss != "mae":
        raise UsageError(f"--loss: {options.model} takes no loss argument")
    unknown = sorted(set(options.model_args) - accepted)
    if unknown:
        raise UsageError(f"--model-args {unknown} are not arguments of {options.model}")
    settings = {**({"loss": options.loss} if "loss" in accepted else {}), **options.model_args}
    if options.model in MODELS:
        return MODELS[options.model](splits, **settings)
    kwargs: dict[str, Any] = dict(splits.model_kwargs())
    if "steps_per_day" in accepted:
        kwargs["steps_per_day"] = splits.steps_per_day
    if "adjacency" in accepted and splits.adjacency is not None:
        kwargs["adjacency"] = splits.adjacency
    return BACKBONES[options.model](**kwargs, **settings)


def build_model(options: argparse.Namespace, splits: Any) -> nn.Module:
    """The backbone (optionally initialised from the finished run ``--backbone-from``) wrapped by ``--adapter``."""
    backbone = build_backbone(options, splits)
    if options.backbone_from:
        RunFolder(options.backbone_from).load_model(backbone)
    return ADAPTERS[options.adapter](backbone, splits, options)


def splits_for(options: argparse.Namespace) -> Any:
    """The windows of ``--dataset`` (with ``--steps-per-day``, ``--start``, ``--adjacency``) for
    ``--input-len`` / ``--horizon`` / ``--few-shot``."""
    import st_peft.data

    data = st_peft.data.load(options.dataset, steps_per_day=options.steps_per_day, start=options.start,
                             adjacency=options.adjacency)
    return st_peft.data.build_splits(data, input_len=options.input_len, horizon=options.horizon,
                                     few_shot=options.few_shot)


def load_run(folder: RunFolder) -> tuple[nn.Module, Any, argparse.Namespace]:
    """Rebuild the finished run of ``folder``: its model with the trained weights, its splits and options."""
    run = folder.finished_run()
    options = argparse.Namespace(command="train", **run.options)
    options.backbone_from = None  # the weights come from the run folder, not from the run's starting point
    with _user_input(f"the run in {folder.path}"):
        splits = splits_for(options)
        model = build_model(options, splits)
    folder.load_model(model)
    return model, splits, options


def run_options(options: argparse.Namespace) -> dict[str, Any]:
    """The options a run folder records: everything that decides what the run computes.

    Local files and folders are recorded as absolute paths, so the run reads back from any
    working directory.
    """
    from st_peft.data import BUILTIN_DATASETS

    recorded = {key: value for key, value in vars(options).items() if key not in NOT_RUN_OPTIONS}
    for key in ("dataset", "adjacency", "backbone_from"):
        value = recorded.get(key)
        if value and value not in BUILTIN_DATASETS and Path(value).expanduser().exists():
            recorded[key] = str(Path(value).expanduser().resolve())
    return recorded


def adapter_sampler(model: nn.Module, splits: Any, options: argparse.Namespace) -> Any:
    """The training sampler an adapter asks for, or ``None``.

    A PEFT config may define ``replay_sampler(starts, batch_size, seed)`` (FACTOST's memory
    replay does); it receives the training windows' starts and returns a sampler or ``None``.
    """
    config = getattr(model, "active_peft_config", None)
    if config is None or not hasattr(config, "replay_sampler"):
        return None
    return config.replay_sampler(splits.train["start"], batch_size=options.batch_size, seed=options.seed)


def _check_budget(options: argparse.Namespace) -> None:
    if options.max_steps is not None and options.max_steps <= 0:
        raise UsageError(f"--max-steps {options.max_steps} trains nothing; give a positive number of steps")
    if options.max_steps is None and not options.epochs > 0:
        raise UsageError(f"--epochs {options.epochs:g} trains nothing; give a positive number of epochs")


def is_main_process() -> bool:
    """True in the process that writes the run folder (rank 0 of a launched run, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def train(options: argparse.Namespace) -> None:
    """Train ``--model`` (+ ``--adapter``) on ``--dataset`` and write the run into ``--output-dir``."""
    from transformers import PrinterCallback, set_seed

    from st_peft.progress import ProgressPrinter
    from st_peft.training import STTrainer, st_training_args

    _require(options, "dataset", "output_dir")
    _check_budget(options)
    if options.resume and options.overwrite:
        raise UsageError("--resume continues a run and --overwrite starts over: pass one of them")
    set_seed(options.seed)
    # a mistake in the data or the model is reported before the run folder is touched
    with _user_input(f"--model {options.model} --adapter {options.adapter} on {options.dataset}"):
        splits = splits_for(options)
        model = build_model(options, splits)
    folder = RunFolder(options.output_dir)
    main = is_main_process()
    with folder.locked() if main else nullcontext():
        run = folder.begin(run_options(options), overwrite=options.overwrite, resume=options.resume) if main \
            else folder.read_run()
        try:
            checkpoint = folder.resume_checkpoint(run) if options.resume else None
            args = st_training_args(
                str(folder.checkpoints),
                epochs=options.epochs,
                batch_size=options.batch_size,
                lr=options.lr,
                weight_decay=options.weight_decay,
                seed=options.seed,
                max_steps=options.max_steps or -1,
                disable_tqdm=True,
            )
            callbacks = [ProgressPrinter(), *([folder.checkpoint_marker(run)] if main else [])]
            trainer = STTrainer(model, args, splits.train, splits.val, splits.collator,
                                train_sampler=adapter_sampler(model, splits, options),
                                early_stopping_patience=options.patience, callbacks=callbacks)
            trainer.remove_callback(PrinterCallback)  # ProgressPrinter prints one line per epoch instead
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            metrics = trainer.evaluate_test(splits.test)
        except BaseException as error:
            if main:
                folder.fail(run, error)
            raise
        if main:
            folder.finish(run, model, metrics)
            print_metrics(metrics, options, splits, f"Test metrics of the run in {folder.path} (also in metrics.json)")


def print_metrics(metrics: dict[str, float], options: argparse.Namespace, splits: Any, title: str) -> None:
    """Print ``metrics`` as the demo's table: MAE / RMSE / MAPE at steps 3, 6, 12 (those that fit) and averaged."""
    from st_peft.progress import format_table
    from st_peft.training import default_horizons

    name = options.model if options.adapter == "none" else f"{options.model} + {options.adapter}"
    print(f"\n{title}: {card_dataset(options.dataset)}, {splits.input_len} steps in, {splits.horizon} out, "
          "original units, MAPE in %")
    print(format_table({name: metrics}, default_horizons(splits.horizon)))


def evaluate(options: argparse.Namespace) -> None:
    """Reload a finished ``st-peft train`` folder, evaluate its model on a split and write the metrics JSON.

    The model carries its scaling statistics; the data set is read again only for its windows.
    """
    import tempfile

    from st_peft.training import STTrainer, st_training_args

    folder = _run_dir(options)
    with folder.locked() if is_main_process() else nullcontext(), tempfile.TemporaryDirectory() as scratch:
        model, splits, run = load_run(folder)
        args = st_training_args(scratch, batch_size=options.batch_size, eval_strategy="no", save_strategy="no",
                                load_best_model_at_end=False, disable_tqdm=True)
        trainer = STTrainer(model, args, data_collator=splits.collator)
        metrics = trainer.evaluate_test(splits.split(options.split))
        if trainer.is_world_process_zero():
            if options.output:
                output = Path(options.output)
                write_json_atomic(output, metrics)
            else:
                output = folder.write_metrics(f"metrics-{options.split}.json", metrics)
            print_metrics(metrics, run, splits,
                          f"{options.split.capitalize()} metrics of the run in {folder.path} (also in {output})")


def push(options: argparse.Namespace) -> None:
    """``st-peft push``: rebuild a finished run and push its adapter or backbone with its model card.

    The card reports the run's test metrics from ``metrics.json``; a backbone carries its
    scaling statistics in its weights. With ``--save-dir`` the upload folder is written locally
    instead.
    """
    from peft import PeftModel

    _require(options, "repo_id")
    folder = _run_dir(options)
    with folder.locked():
        model, splits, run = load_run(folder)
        metrics = {key: value for key, value in folder.read_metrics().items()
                   if key != "loss" and isinstance(value, int | float)}
    card = {
        "dataset": run.dataset,
        "metrics": metrics,
        "license": options.license,
        "num_nodes": splits.num_nodes,
        "input_len": splits.input_len,
        "horizon": splits.horizon,
    }
    if isinstance(model, PeftModel):
        if options.base_model is None:
            raise UsageError("an adapter's card names its backbone: pass --base-model org/backbone")
        card["base_model"] = options.base_model
    with _user_input(f"the card of {options.repo_id}"):
        if options.save_dir:
            target = save_for_hub(model, options.save_dir, repo_id=options.repo_id, **card)
            print(f"wrote {sorted(path.name for path in target.iterdir())} to {target}")
            return
        upload = push_adapter if isinstance(model, PeftModel) else push_backbone
        url = upload(model, options.repo_id, private=options.private or None, token=options.token,
                     timeout=options.timeout, **card)
    print(url)


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
    "push": Command(push, "push a trained model folder to the Hub with its model card", add_push_arguments),
}

USER_ERRORS = (UsageError, DataError, RunFolderError, HubError, FileExistsError, FileNotFoundError)
"""Errors in what the user gave: one line and exit status 2 (``--debug`` shows the traceback)."""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per entry of :data:`COMMANDS`."""
    from st_peft import __version__

    parser = argparse.ArgumentParser(prog="st-peft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"st-peft {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        sub.add_argument("--config", help="YAML file of options; command-line flags override it")
        sub.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        command.add_arguments(sub)
        commands[name] = sub
    return parser, commands


def _yaml_defaults(path: str, sub: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        with open(path) as handle:
            content = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        sub.error(f"--config {path}: {error}")
    if not isinstance(content, dict):
        sub.error(f"{path}: expected a mapping of options, got {type(content).__name__}")
    settings = {key.replace("-", "_"): value for key, value in content.items()}
    known = {action.dest for action in sub._actions} - {"help", "config"}
    unknown = sorted(set(settings) - known)
    if unknown:
        sub.error(f"{path}: unknown options {unknown}; known: {sorted(known)}")
    for action in sub._actions:
        if action.dest not in settings:
            continue
        value = settings[action.dest]
        # YAML values get the flags' conversions and checks; PyYAML reads `1e-3` as a string
        if isinstance(value, str) and action.type is not None:
            try:
                value = settings[action.dest] = action.type(value)
            except (ValueError, argparse.ArgumentTypeError) as error:
                sub.error(f"{path}: {action.dest}={value!r}: {error}")
        if action.choices is not None and value not in action.choices:
            sub.error(f"{path}: {action.dest}={value!r} is not one of {list(action.choices)}")
    return settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``--config`` YAML values as defaults under the flags.

    Raises:
        SystemExit: with status 2 after argparse's one-line message, for a bad flag or file.
    """
    parser, commands = build_parser()
    options = parser.parse_args(argv)
    if options.config:
        sub = commands[options.command]
        sub.set_defaults(**_yaml_defaults(options.config, sub))
        options = parser.parse_args(argv)
    return options


def _warnings_as_lines(show: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints a run folder's warnings as one line and leaves others to ``show``."""

    def showwarning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, RunWarning):
            print(f"st-peft: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    return showwarning


@contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """Hide transformers' own progress bars ("Writing model shards") while a command runs: the
    command prints its progress as lines, and its errors as one line."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``st-peft`` console script (also under ``accelerate launch``).

    Returns:
        0 on success, 2 for a mistake in the input, 1 when training failed (a non-finite loss).
    """
    from st_peft.training.distributed import leave_process_group

    options = parse_args(argv)
    prefix = f"st-peft {options.command}"
    try:
        with warnings.catch_warnings(), _quiet_transformers_progress():
            warnings.simplefilter("always", RunWarning)
            if not options.debug:
                warnings.showwarning = _warnings_as_lines(warnings.showwarning)
            COMMANDS[options.command].run(options)
    except USER_ERRORS as error:
        if options.debug:
            raise
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except NonFiniteLossError as error:
        if options.debug:
            raise
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return RUN_FAILED
    except SystemExit as error:
        # subcommands of other modules (pretrain) say what is missing with SystemExit(message)
        if isinstance(error.code, str) and not options.debug:
            print(error.code, file=sys.stderr)
            return USAGE_ERROR
        raise
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
