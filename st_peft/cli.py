"""The ``st-peft`` console script.

``st-peft train`` fits a backbone (optionally wrapped by an adapter) on a data set and
writes a run folder (:mod:`st_peft.runs`): the trained model, which carries its own scaling
statistics, the run's options and the test metrics. ``st-peft evaluate`` reloads such a
folder and writes metrics as JSON; ``st-peft push`` puts its model on the Hub with a card.

Every option can also come from a YAML file (``--config run.yaml``, keys spelled like the
flags with ``_`` or ``-``); flags given on the command line override the file.

A mistake in the input (a flag, a data file, a busy or finished run folder, the Hub) prints
one line that says what to fix and exits with status 2; ``--debug`` shows the traceback.

The installed ``st-peft`` script is :func:`st_peft_cli.parser.main`: it parses the arguments without
importing this package (so ``--help`` and argument errors answer at once), then calls :func:`run`.
``python -m st_peft.cli`` and :func:`main` parse with this module's registries instead, so an
adapter a user adds to :data:`ADAPTERS` is a valid ``--adapter``.

Extending the script:
    * a subcommand is its options' dataclass and help in :data:`st_peft_cli.options.COMMANDS`
      plus a function ``(options) -> None`` in :data:`RUNNERS`;
    * an adapter is a function ``(backbone, splits, options) -> model`` plus one entry in
      :data:`ADAPTERS` (``options.adapter_args`` carries its settings).
"""

from __future__ import annotations

import argparse
import errno
import inspect
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from torch import nn

from st_peft.data.errors import DataError
from st_peft.data.fingerprint import changes, data_fingerprints
from st_peft.data.missing_inputs import MASK_CHANNEL, MEAN
from st_peft.hub import HubError, card_dataset, push_adapter, push_backbone, save_for_hub
from st_peft.losses import LOSSES
from st_peft.models.st_link import STLinkForForecasting
from st_peft.options import Choices, OptionError, OptionWarning, TrainOptions, check_graph, recorded_options
from st_peft.runs import (
    DATA_FINGERPRINTS,
    DATA_SUMMARY_FILE,
    MODEL_FILE,
    RunFolder,
    RunFolderError,
    RunWarning,
    write_json_atomic,
)
from st_peft.training.trainer import NonFiniteLossError
from st_peft.tuners.factost.model import factost_cli_adapter
from st_peft.tuners.st_lora.model import st_lora_cli_adapter
from st_peft_cli import parser as front
from st_peft_cli.parser import USAGE_ERROR

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


@contextmanager
def _user_input(what: str) -> Iterator[None]:
    """Report a ``ValueError`` / ``TypeError`` raised while building ``what`` from the options as a :class:`UsageError`,
    and a ``RuntimeError`` too: torch's answer to a size such as ``--model-args '{embed_dim: -1}'``."""
    try:
        yield
    except (DataError, OptionError):
        raise
    except (ValueError, TypeError, RuntimeError) as error:
        raise UsageError(f"{what}: {' '.join(str(error).split())}") from error


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
    check_graph(options.model, accepted, has_graph=splits.adjacency is not None, given=options.adjacency,
                model_args=options.model_args)
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
        start = RunFolder(options.backbone_from)
        theirs = start.finished_run().options.get("missing_inputs", MEAN)
        if theirs != splits.missing_inputs:
            raise UsageError(f"--backbone-from {options.backbone_from} read missing inputs as {theirs} and this run "
                             f"as {splits.missing_inputs}: pass --missing-inputs {theirs}")
        start.load_model(backbone)
    return ADAPTERS[options.adapter](backbone, splits, options)


def _reader_options(options: argparse.Namespace) -> dict[str, Any]:
    """What ``--missing-value``, ``--date-column`` and ``--columns`` ask of the data set's reader."""
    given = {}
    missing = getattr(options, "missing_value", None)
    if missing is not None:
        given["missing_value"] = None if missing == "none" else missing
    date_column = getattr(options, "date_column", None)
    if date_column is not None:
        given["date_column"] = None if date_column.lower() == "none" else date_column
    if getattr(options, "columns", None):
        given["columns"] = options.columns
    csv_only = sorted({"date_column", "columns"} & set(given))
    if csv_only and Path(str(options.dataset)).suffix.lower() != ".csv":
        raise UsageError(f"{', '.join('--' + name.replace('_', '-') for name in csv_only)} choose columns of a .csv "
                         f"file; {options.dataset} is not one")
    return given


def _channel_indices(channels: list[int | str] | None, data: Any, flag: str) -> list[int] | None:
    """Channel indices of ``data`` for channels given by index or name (None: all)."""
    if channels is None:
        return None
    indices = []
    for channel in channels:
        if isinstance(channel, str):
            if channel not in data.channel_names:
                raise UsageError(f"{flag}: no channel {channel!r}; the channels of {data.name} are "
                                 f"{data.channel_names} (or their indices 0..{data.num_channels - 1})")
            channel = data.channel_names.index(channel)
        if not 0 <= channel < data.num_channels:
            raise UsageError(f"{flag}: channel {channel} is out of range; {data.name} has {data.num_channels} "
                             f"channels {data.channel_names}")
        indices.append(channel)
    return indices


def missing_inputs_of(options: argparse.Namespace) -> str:
    """The treatment of missing inputs a run uses: ``--missing-inputs``, else ``mask-channel`` (measured best,
    ``benchmarks/missing_inputs.py``), or ``mean`` under ``--adapter factost``, whose backbone reads the mask itself.

    Raises:
        UsageError: another treatment than ``mean`` asked of ``--adapter factost``.
    """
    given = getattr(options, "missing_inputs", None)
    factost = getattr(options, "adapter", "none") == "factost"
    if given is None:
        return MEAN if factost else MASK_CHANNEL
    if factost and given != MEAN:
        raise UsageError(f"--missing-inputs {given}: --adapter factost's backbone reads the observed mask itself; "
                         f"use --missing-inputs mean (its default)")
    return given


def splits_for(options: argparse.Namespace) -> Any:
    """The windows of ``--dataset`` (with ``--steps-per-day``, ``--start``, ``--adjacency`` and the reader's
    options) for ``--input-len`` / ``--horizon`` / ``--few-shot`` over ``--channels`` / ``--target-channels``,
    their missing inputs treated as :func:`missing_inputs_of` says."""
    import st_peft.data

    data = st_peft.data.load(options.dataset, steps_per_day=options.steps_per_day, start=options.start,
                             adjacency=options.adjacency, **_reader_options(options))
    inputs = _channel_indices(getattr(options, "channels", None), data, "--channels")
    targets = _channel_indices(getattr(options, "target_channels", None), data, "--target-channels")
    return st_peft.data.build_splits(data, input_len=options.input_len, horizon=options.horizon,
                                     few_shot=options.few_shot, input_channels=inputs,
                                     target_channels=targets if targets is not None else inputs,
                                     missing_inputs=missing_inputs_of(options))


def summary_of(options: argparse.Namespace, splits: Any) -> dict[str, Any]:
    """The data summary (:func:`st_peft.data.summary.data_summary`) of the run ``options`` describe."""
    from st_peft.data import summary
    from st_peft.data.builtin import BUILTIN_DATASETS, BUILTIN_MISSING

    if options.steps_per_day is not None:
        source = summary.STEPS_PER_DAY_GIVEN
    elif options.dataset in BUILTIN_DATASETS:
        source = summary.STEPS_PER_DAY_BUILT_IN
    elif splits.data.timestamps is not None:
        source = summary.STEPS_PER_DAY_FROM_DATES
    else:
        source = summary.STEPS_PER_DAY_STORED
    missing = summary.missing_rule(options.dataset, getattr(options, "missing_value", None), BUILTIN_MISSING)
    return summary.data_summary(splits, steps_per_day_from=source, missing=missing)


def load_run(folder: RunFolder, allow_changed_data: bool = False,
             doing: str = "evaluate") -> tuple[nn.Module, Any, argparse.Namespace]:
    """Rebuild the finished run of ``folder``: its model with the trained weights, its splits and options.

    Data files that changed since the run trained are refused (:func:`check_same_data`, whose message
    says what the caller was ``doing``) unless ``allow_changed_data``.
    """
    run = folder.finished_run()
    check_same_data(run.options, folder, allow_changed_data, doing)
    # a run recorded before --missing-inputs existed read its missing inputs as the mean
    options = argparse.Namespace(command="train", **{"missing_inputs": MEAN, **{
        key: value for key, value in run.options.items() if key != DATA_FINGERPRINTS}})
    options.backbone_from = None  # the weights come from the run folder, not from the run's starting point
    with _user_input(f"the run in {folder.path}"):
        splits = splits_for(options)
        check_same_nodes(folder, splits)
        model = build_model(options, splits)
    from safetensors import SafetensorError

    try:
        folder.load_model(model)
    except (SafetensorError, RuntimeError, OSError, ValueError) as error:
        raise RunFolderError(f"the model in {folder.path} does not load into the model its run.json describes "
                             f"(a damaged or replaced {MODEL_FILE}, or changed data): "
                             f"{' '.join(str(error).split())[:300]}") from error
    return model, splits, options


def run_options(options: argparse.Namespace) -> dict[str, Any]:
    """The options a run folder records: everything that decides what the run computes.

    Local files and folders are recorded as absolute paths, so the run reads back from any
    working directory.
    """
    from st_peft.data import BUILTIN_DATASETS

    recorded = recorded_options(TrainOptions, vars(options))
    recorded["missing_inputs"] = missing_inputs_of(options)  # the treatment, default or not
    for key in ("dataset", "adjacency", "backbone_from"):
        value = recorded.get(key)
        if value and value not in BUILTIN_DATASETS and Path(value).expanduser().exists():
            recorded[key] = str(Path(value).expanduser().resolve())
    recorded[DATA_FINGERPRINTS] = data_fingerprints(recorded["dataset"], recorded["adjacency"])
    return recorded


def check_same_data(recorded: dict[str, Any], folder: RunFolder, allow: bool, doing: str) -> None:
    """Refuse to ``doing`` (evaluate, resume) the run in ``folder`` on data that differs from what it read.

    Args:
        recorded: the run's options, with the ``data_fingerprints`` it was started with.
        allow: ``--allow-changed-data``: warn instead.

    Raises:
        RunFolderError: naming each changed file and the flag that overrides.
    """
    sources = {"dataset": recorded.get("dataset"), "adjacency": recorded.get("adjacency")}
    found = changes(recorded.get(DATA_FINGERPRINTS), data_fingerprints(**sources), sources)
    if not found:
        return
    message = f"the data of the run in {folder.path} changed since it trained: {'; '.join(found)}"
    if not allow:
        raise RunFolderError(f"{message}; pass --allow-changed-data to {doing} it on the new data anyway")
    warnings.warn(f"{message}; going on (--allow-changed-data)", RunWarning, stacklevel=2)


def adapter_sampler(model: nn.Module, splits: Any, options: argparse.Namespace) -> Any:
    """The training sampler an adapter asks for, or ``None``.

    A PEFT config may define ``replay_sampler(starts, batch_size, seed)`` (FACTOST's memory
    replay does); it receives the training windows' starts and returns a sampler or ``None``.
    """
    config = getattr(model, "active_peft_config", None)
    if config is None or not hasattr(config, "replay_sampler"):
        return None
    return config.replay_sampler(splits.train["start"], batch_size=options.batch_size, seed=options.seed)


def node_sampler_for(options: argparse.Namespace, splits: Any) -> Any:
    """The ``NodeSampler`` of ``--node-batch-size`` / ``--node-sampler``, or None to train on every node.

    A size of at least the graph's node count trains on every node (above it, with a note). Each
    process of a launched run draws its own nodes (its seed is ``[--seed, rank]``).
    """
    size, strategy = options.node_batch_size, options.node_sampler
    if size is None:
        if strategy is not None:
            raise UsageError(f"--node-sampler {strategy} draws the nodes of --node-batch-size: give that too")
        return None
    nodes = splits.num_nodes
    if size >= nodes:
        if size > nodes:
            warnings.warn(f"--node-batch-size {size} is more than the {nodes} nodes of {options.dataset}: every batch "
                          f"carries all {nodes}", OptionWarning, stacklevel=2)
        return None
    from st_peft.data.node_batching import NodeSampler

    return NodeSampler(nodes, size, strategy or "uniform", splits.adjacency,
                       seed=[options.seed, int(os.environ.get("RANK", "0"))])


def check_same_nodes(folder: RunFolder, splits: Any) -> None:
    """Refuse to rebuild the run of ``folder`` on data of another node count than it trained on, naming both.

    Raises:
        RunFolderError: its data summary records another number of nodes.
    """
    summary = folder.path / DATA_SUMMARY_FILE
    if not summary.is_file():
        return
    trained = json.loads(summary.read_text(encoding="utf-8"))["shape"][1]
    if trained != splits.num_nodes:
        raise RunFolderError(f"the model in {folder.path} was trained on data of {trained} nodes, but its data now "
                             f"has {splits.num_nodes} nodes")


def is_main_process() -> bool:
    """True in the process that writes the run folder (rank 0 of a launched run, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def train(options: argparse.Namespace) -> None:
    """Train ``--model`` (+ ``--adapter``) on ``--dataset`` and write the run into ``--output-dir``."""
    from transformers import PrinterCallback, set_seed

    from st_peft.baselines import with_baselines
    from st_peft.data.summary import format_summary
    from st_peft.progress import ProgressPrinter
    from st_peft.training import STTrainer, default_horizons, st_training_args

    _require(options, "dataset", "output_dir")
    if options.resume and options.overwrite:
        raise UsageError("--resume continues a run and --overwrite starts over: pass one of them")
    set_seed(options.seed)
    # a mistake in the data or the model is reported before the run folder is touched
    with _user_input(f"--model {options.model} --adapter {options.adapter} on {options.dataset}"):
        splits = splits_for(options)
        data_summary = summary_of(options, splits)
        if is_main_process():
            print(format_summary(data_summary), flush=True)
        model = build_model(options, splits)
        node_sampler = node_sampler_for(options, splits)
    folder = RunFolder(options.output_dir)
    main = is_main_process()
    with folder.locked() if main else nullcontext():
        recorded = run_options(options)
        previous = folder.read_run() if main and options.resume else None
        if previous is not None:
            check_same_data(previous.options, folder, options.allow_changed_data, "resume")
        if previous is not None and "missing_inputs" not in previous.options:
            # a run begun before --missing-inputs existed read its inputs as the mean and records no treatment
            if recorded["missing_inputs"] != MEAN:
                raise UsageError(f"the run in {folder.path} began before --missing-inputs existed and reads missing "
                                 f"inputs as the mean: resume it with --missing-inputs mean")
            del recorded["missing_inputs"]
        run = folder.begin(recorded, overwrite=options.overwrite, resume=options.resume) if main \
            else folder.read_run()
        if main:
            write_json_atomic(folder.path / DATA_SUMMARY_FILE, data_summary)
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
                                train_sampler=adapter_sampler(model, splits, options), node_sampler=node_sampler,
                                early_stopping_patience=options.patience, callbacks=callbacks)
            trainer.remove_callback(PrinterCallback)  # ProgressPrinter prints one line per epoch instead
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            metrics = with_baselines(trainer.evaluate_test(splits.test), splits, "test", forecaster_name(options),
                                     default_horizons(splits.horizon))
        except BaseException as error:
            if main:
                folder.fail(run, error)
            raise
        if main:
            folder.finish(run, model, metrics)
            print_metrics(metrics, options, splits, f"Test metrics of the run in {folder.path} (also in metrics.json)")


def forecaster_name(options: argparse.Namespace) -> str:
    """The model and adapter of a run, as its reports name them: ``stid`` or ``stid + st_lora``."""
    return options.model if options.adapter == "none" else f"{options.model} + {options.adapter}"


def print_metrics(metrics: dict[str, Any], options: argparse.Namespace, splits: Any, title: str) -> None:
    """Print ``metrics`` (of :func:`~st_peft.baselines.with_baselines`) as the demo's table: MAE / RMSE / MAPE
    at steps 3, 6, 12 (those that fit) and averaged, the model's row above the baselines', then the verdict."""
    from st_peft.progress import format_table
    from st_peft.training import default_horizons

    baselines = {name: scores for name, scores in metrics["baselines"].items() if isinstance(scores, dict)}
    season = metrics["baselines"]["season_steps"]
    seasonal = f"seasonal naive repeats the value {season} steps earlier" if season else \
        "no season of a day or a week fits before the validation span, so no seasonal naive"
    print(f"\n{title}: {card_dataset(options.dataset)}, {splits.input_len} steps in, {splits.horizon} out, "
          f"original units, MAPE in %; {seasonal}")
    print(format_table({forecaster_name(options): metrics, **baselines}, default_horizons(splits.horizon)))
    print(f"verdict: {metrics['verdict']}")


def evaluate(options: argparse.Namespace) -> None:
    """Reload a finished ``st-peft train`` folder, evaluate its model on a split and write the metrics JSON.

    The model carries its scaling statistics; the data set is read again only for its windows.
    """
    import tempfile

    from st_peft.baselines import with_baselines
    from st_peft.training import STTrainer, default_horizons, st_training_args

    folder = _run_dir(options)
    with folder.locked() if is_main_process() else nullcontext(), tempfile.TemporaryDirectory() as scratch:
        model, splits, run = load_run(folder, options.allow_changed_data)
        args = st_training_args(scratch, batch_size=options.batch_size, eval_strategy="no", save_strategy="no",
                                load_best_model_at_end=False, disable_tqdm=True)
        trainer = STTrainer(model, args, data_collator=splits.collator,
                            eval_node_chunk=getattr(run, "node_batch_size", None))
        metrics = with_baselines(trainer.evaluate_test(splits.split(options.split)), splits, options.split,
                                 forecaster_name(run), default_horizons(splits.horizon))
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
        model, splits, run = load_run(folder, options.allow_changed_data, "push")
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
    if splits.mask_channels:  # a user of the pushed model must build these channels: the card says what they are
        names = splits.data.channel_names
        card["inputs"] = [*(names[i] for i in splits.input_channels),
                          *(f"the observed mask of {names[i]}" for i in splits.mask_channels)]
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


def _pretrain(options: argparse.Namespace) -> None:
    from st_peft.models.factost.pretraining import run_pretrain

    run_pretrain(options)


RUNNERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "train": train,
    "evaluate": evaluate,
    "pretrain": _pretrain,
    "push": push,
}
"""What each subcommand of :data:`st_peft_cli.options.COMMANDS` runs."""

USER_ERRORS = (UsageError, OptionError, DataError, RunFolderError, HubError, FileExistsError, FileNotFoundError)
"""Errors in what the user gave: one line and exit status 2 (``--debug`` shows the traceback)."""


def registry_choices() -> Choices:
    """The choices of ``--model``, ``--adapter`` and ``--loss`` as this process's registries hold them."""
    from st_peft.backbones import BACKBONES

    return {"model": sorted([*BACKBONES, *MODELS]), "adapter": sorted(ADAPTERS), "loss": sorted(LOSSES)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` as :func:`st_peft_cli.parser.parse_args` does, with the choices of :func:`registry_choices`.

    Raises:
        SystemExit: with status 2 after argparse's one-line message, for a bad flag or file.
    """
    return front.parse_args(argv, registry_choices())


DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
"""Errors of the disk a run writes to: a full disk or quota, a read-only or forbidden folder."""


def disk_error(error: OSError, options: argparse.Namespace) -> str:
    """One line for an ``OSError`` of :data:`DISK_ERRORS`: what could not be written and how to go on."""
    where = error.filename or getattr(options, "output_dir", None) or "the output"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        then = "free some space, then continue the run with --resume" if options.command == "train" else \
            "free some space and run it again"
    else:
        then = "make it writable or choose another --output-dir" if options.command == "train" else \
            "make it writable or write elsewhere"
    return f"cannot write {where}: {error.strerror}; {then}"


def _warnings_as_lines(show: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints a run folder's warnings as one line and leaves others to ``show``."""

    def showwarning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, (RunWarning, OptionWarning)):
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


def run(options: argparse.Namespace) -> int:
    """Run the parsed command ``options.command`` (of :func:`parse_args`); what a mistake prints is one line.

    Returns:
        0 on success, 2 for a mistake in the input, 1 when training failed (a non-finite loss).
    """
    from st_peft.training.distributed import leave_process_group

    prefix = f"st-peft {options.command}"
    try:
        with warnings.catch_warnings(), _quiet_transformers_progress():
            warnings.simplefilter("always", RunWarning)
            warnings.simplefilter("always", OptionWarning)
            if not options.debug:
                warnings.showwarning = _warnings_as_lines(warnings.showwarning)
            RUNNERS[options.command](options)
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
    except OSError as error:
        if options.debug or error.errno not in DISK_ERRORS:
            raise
        print(f"{prefix}: error: {disk_error(error, options)}", file=sys.stderr)
        return USAGE_ERROR
    except SystemExit as error:
        # subcommands of other modules (pretrain) say what is missing with SystemExit(message)
        if isinstance(error.code, str) and not options.debug:
            print(error.code, file=sys.stderr)
            return USAGE_ERROR
        raise
    leave_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m st_peft.cli`` (also under ``accelerate launch``): :func:`parse_args`, then :func:`run`.

    Returns:
        0 on success, 2 for a mistake in the input, 1 when training failed (a non-finite loss).
    """
    try:
        options = parse_args(argv)
    except SystemExit as error:  # --help, --version, or a refused option already printed in one line
        return error.code if isinstance(error.code, int) else USAGE_ERROR
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
