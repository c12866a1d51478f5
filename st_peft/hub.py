"""The Hub: model cards from ``hub_cards/``, pushes that write them, pulls that read only safetensors and JSON.

Adapters (ST-LoRA, FactoST) and backbones (every ``STPreTrainedModel``: STID, GWNet, STGCN,
``FactoSTModel``, ``STLinkForForecasting``) already go up and come down through transformers'
and peft's own ``push_to_hub`` / ``from_pretrained``. This module adds what those
leave out:

- :func:`render_model_card` fills a template from ``hub_cards/`` (``adapter.md`` or
  ``backbone.md``) with the YAML metadata people filter on (library, base model, PEFT type,
  data set, node count, horizon, metrics with their values, licence, tags).
- :func:`save_for_hub` writes the exact folder a push uploads: safetensors weights, JSON
  configs and the card, nothing else, and either all of it or nothing.
- :func:`push_adapter` / :func:`push_backbone` stage that folder and upload it in one commit.
- :func:`load_adapter` / :func:`load_backbone` check what a repository holds before loading
  it, download only ``*.json`` and ``*.safetensors``, and leave the cache as they found it
  when they fail.

The endpoint, cache and offline mode are huggingface_hub's: ``HF_ENDPOINT``, ``HF_HOME`` /
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from huggingface_hub import (
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import PeftModel
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from st_peft.hub_http import HubError, hub_requests
from st_peft.tuners.checkpoint_keys import loading_backbone_weights
from st_peft.tuners.registration import ST_PEFT_TYPES

# st_peft/hub_cards links to the repository's hub_cards/, so a wheel ships the templates too
CARD_TEMPLATE_DIR = Path(__file__).resolve().parent / "hub_cards"
"""The templates shipped with the repository (``adapter.md``, ``backbone.md``)."""

CARD_NAME = "README.md"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
BACKBONE_CONFIG_NAME = "config.json"
HUB_FILE_SUFFIXES = (".json", ".safetensors")
TASK = "time-series-forecasting"
BASE_TAGS = ("spatio-temporal", TASK, "st-peft")

REQUIRED_TEMPLATE_FIELDS = {
    "adapter": (
        "card_data",
        "repo_id",
        "peft_type",
        "base_model",
        "dataset",
        "num_nodes",
        "horizon",
        "metrics_table",
    ),
    "backbone": ("card_data", "repo_id", "model_class", "dataset", "num_nodes", "horizon", "metrics_table"),
}
"""Fields a card template must use: without them a card would not say what the model is."""

REQUIRED_METADATA = {
    "adapter": (
        "library_name",
        "base_model",
        "peft_type",
        "datasets",
        "num_nodes",
        "horizon",
        "license",
        "tags",
        "model-index",
    ),
    "backbone": ("library_name", "datasets", "num_nodes", "horizon", "license", "tags", "model-index"),
}
"""YAML keys every rendered card carries; the Hub filters on them."""

NUM_NODES_KEYS = ("num_nodes",)
HORIZON_KEYS = ("horizon", "max_horizon")
INPUT_LEN_KEYS = ("input_len", "max_context_length")


def model_kind(model: nn.Module) -> str:
    """``"adapter"`` for a ``PeftModel``, ``"backbone"`` for any other module."""
    return "adapter" if isinstance(model, PeftModel) else "backbone"


def _config_of(module: nn.Module) -> dict[str, Any]:
    """The settings a backbone was saved with (its transformers config); empty for a plain module."""
    config = getattr(module, "config", None)
    return config.to_dict() if isinstance(config, PreTrainedConfig) else {}


def _first(settings: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((settings[key] for key in keys if settings.get(key) is not None), None)


def describe_model(model: nn.Module) -> dict[str, Any]:
    """What a model card can say about ``model`` without being told.

    Args:
        model: a ``PeftModel`` over a forecaster, or a forecaster (a ``PreTrainedModel``).

    Returns:
        ``kind``, ``model_class`` / ``model_module`` (of the backbone for an adapter),
        ``peft_type`` and ``base_model`` (adapters), ``num_nodes``, ``input_len``, ``horizon``
        (``None`` where the configs do not hold them; FactoST's per-series backbone reports its
        ``max_context_length`` and ``max_horizon``), ``trainable_params`` and ``total_params``.
    """
    kind = model_kind(model)
    if kind == "adapter":
        backbone = model.get_base_model()
        peft_config = model.peft_config[model.active_adapter]
        settings = {**_config_of(backbone), **peft_config.to_dict()}
        trainable, total = model.get_nb_trainable_parameters()
        extra = {
            "peft_type": getattr(peft_config.peft_type, "value", peft_config.peft_type),
            "base_model": peft_config.base_model_name_or_path,
        }
    else:
        backbone = model
        settings = _config_of(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        extra = {}
    return {
        "kind": kind,
        "model_class": type(backbone).__name__,
        "model_module": type(backbone).__module__.rsplit(".", 1)[0],
        "num_nodes": _first(settings, NUM_NODES_KEYS),
        "input_len": _first(settings, INPUT_LEN_KEYS),
        "horizon": _first(settings, HORIZON_KEYS),
        "trainable_params": int(trainable),
        "total_params": int(total),
        **extra,
    }


def _check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    if not metrics:
        raise ValueError("metrics is empty: a card reports the test metrics, e.g. {'mae': 3.1, 'rmse': 5.2}")
    checked = {}
    for name, value in metrics.items():
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"metric {name!r} is {number}; a card reports finite numbers only")
        checked[str(name)] = number
    return checked


def _metrics_table(metrics: Mapping[str, float]) -> str:
    rows = [f"| {name} | {value:.4f} |" for name, value in metrics.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def _check_repo_id(repo_id: str, what: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{what} must be a Hub repo id such as org/name, got {repo_id!r}: {error}"
        ) from error


def card_dataset(dataset: str | os.PathLike) -> str:
    """How a card names a data set: a built-in name or a Hub dataset id as given, a local file or folder
    by its file name only (a card never shows where a file lies on someone's disk)."""
    text = str(dataset)
    path = Path(text).expanduser()
    if path.exists() or path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        return path.name
    return text


def card_fields(
    model: nn.Module,
    repo_id: str,
    *,
    dataset: str,
    metrics: Mapping[str, float],
    num_nodes: int | None = None,
    input_len: int | None = None,
    horizon: int | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    tags: Sequence[str] = (),
    inputs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Everything a card template can use, including the YAML front matter ``card_data``.

    Values given here override what :func:`describe_model` reads from the model's configs.

    Args:
        model: the ``PeftModel`` or backbone to describe.
        repo_id: ``"org/name"`` the card is for.
        dataset: the data set the model was trained and tested on: a built-in name
            (``"sz-taxi"``), a Hub dataset id, or a local file or folder, which the card names by
            its file name only (see :func:`card_dataset`).
        metrics: test metrics by name, e.g. the output of ``STTrainer.evaluate_test``.
        num_nodes, input_len, horizon: the window the model was trained for.
        base_model: Hub id of the backbone an adapter belongs to (defaults to the adapter
            config's ``base_model_name_or_path``); required for adapters.
        license: the card's licence identifier.
        tags: extra tags, added to ``spatio-temporal``, ``time-series-forecasting``, ``st-peft``.
        inputs: what each of the model's ``C_in`` input channels holds, in order, where a user could not
            guess it (the observed masks ``st-peft train --missing-inputs mask-channel`` adds); None: nothing.

    Returns:
        A dict of strings and numbers for the template, with ``card_data`` the YAML text.

    Raises:
        ValueError: a required value is missing or a metric is not a finite number.
    """
    dataset = card_dataset(dataset)
    described = describe_model(model)
    kind = described["kind"]
    given = {"num_nodes": num_nodes, "input_len": input_len, "horizon": horizon, "base_model": base_model}
    fields = {**described, **{key: value for key, value in given.items() if value is not None}}
    needed = ["num_nodes", "horizon", "input_len"] + (["base_model"] if kind == "adapter" else [])
    missing = [key for key in needed if fields.get(key) is None]
    if missing:
        raise ValueError(
            f"the {kind} card for {repo_id!r} needs {', '.join(missing)}, which the model's configs do not hold: "
            f"pass {', '.join(f'{key}=...' for key in missing)}"
            + (
                " (base_model is the Hub id of the backbone, pushed with push_backbone)"
                if "base_model" in missing
                else ""
            )
        )
    if kind == "adapter":
        _check_repo_id(fields["base_model"], "base_model")
    checked_metrics = _check_metrics(metrics)
    model_name = repo_id.rsplit("/", 1)[-1]
    kind_tags = [fields["peft_type"].lower()] if kind == "adapter" else [fields["model_class"].lower()]
    card_data = ModelCardData(
        library_name="peft" if kind == "adapter" else "st-peft",
        base_model=fields.get("base_model") if kind == "adapter" else None,
        license=license,
        datasets=[dataset],
        pipeline_tag=TASK,
        tags=sorted({*BASE_TAGS, *kind_tags, *tags}),
        model_name=model_name,
        eval_results=[
            EvalResult(
                task_type=TASK,
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split="test",
                metric_type=name,
                metric_name=name,
                metric_value=value,
            )
            for name, value in checked_metrics.items()
        ],
        **({"peft_type": fields["peft_type"]} if kind == "adapter" else {}),
        model_class=fields["model_class"],
        num_nodes=int(fields["num_nodes"]),
        input_len=int(fields["input_len"]),
        horizon=int(fields["horizon"]),
    )
    fields.update(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=repo_id,
        dataset=dataset,
        metrics=checked_metrics,
        metrics_table=_metrics_table(checked_metrics),
        base_class=fields["model_class"],
        base_module=fields["model_module"],
        inputs=list(inputs) if inputs else None,
    )
    return fields


def load_card_template(kind: str, template_dir: str | os.PathLike | None = None) -> jinja2.Template:
    """Read and check the card template of ``kind`` (``"adapter"`` or ``"backbone"``).

    Args:
        kind: which template, ``hub_cards/<kind>.md``.
        template_dir: folder of the templates; defaults to the repository's ``hub_cards/``.

    Raises:
        ValueError: unknown kind, or the template does not use a required field (named).
        FileNotFoundError: the template file is missing.
    """
    if kind not in REQUIRED_TEMPLATE_FIELDS:
        raise ValueError(f"unknown card kind {kind!r}; expected one of {sorted(REQUIRED_TEMPLATE_FIELDS)}")
    path = Path(template_dir or CARD_TEMPLATE_DIR) / f"{kind}.md"
    if not path.is_file():
        raise FileNotFoundError(f"card template {path} does not exist")
    source = path.read_text(encoding="utf-8")
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    used = jinja2.meta.find_undeclared_variables(environment.parse(source))
    missing = [field for field in REQUIRED_TEMPLATE_FIELDS[kind] if field not in used]
    if missing:
        raise ValueError(
            f"card template {path} does not use the required field(s) {missing}; add {{{{ {missing[0]} }}}}"
        )
    return environment.from_string(source)


def render_model_card(
    kind: str, fields: Mapping[str, Any], template_dir: str | os.PathLike | None = None
) -> str:
    """Render the card of ``kind`` from ``fields`` (see :func:`card_fields`) and check its metadata.

    Returns:
        The card's text: YAML front matter, then markdown.

    Raises:
        ValueError: the template uses a field that ``fields`` lacks, or the rendered card's
            YAML misses a required key (both named).
    """
    template = load_card_template(kind, template_dir)
    try:
        text = template.render(**fields)
    except jinja2.UndefinedError as error:
        raise ValueError(
            f"the {kind} card template uses a field the card does not have: {error.message}"
        ) from error
    metadata = ModelCard(text, ignore_metadata_errors=False).data.to_dict()
    missing = [key for key in REQUIRED_METADATA[kind] if key not in metadata]
    if missing:
        raise ValueError(
            f"the rendered {kind} card lacks the metadata {missing}; its template must open with ---, {{{{ card_data }}}}, ---"
        )
    return text


def _non_hub_files(folder: Path) -> list[str]:
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and path.name != CARD_NAME and path.suffix not in HUB_FILE_SUFFIXES
    )


def _record_base_model(config_path: Path, base_model: str | None) -> None:
    """Name the backbone's Hub id in the saved adapter config, as peft does for transformers models."""
    if base_model is None:
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def save_for_hub(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    repo_id: str,
    template_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    **card_kwargs: Any,
) -> Path:
    """Write the folder a push uploads: weights as safetensors, configs as JSON, the model card.

    The card is rendered first and the files are written to a staging folder next to
    ``folder`` that is renamed into place only when complete, so an error (a bad template, a
    missing field, a save that fails) leaves no ``folder`` behind.

    Python files that ``save_pretrained`` copies for ``trust_remote_code`` are left out:
    ``import st_peft`` registers the model classes, so a pull never runs remote code.

    Args:
        model: a ``PeftModel`` (saves the adapter only) or a backbone.
        folder: where to write; must not exist or be empty unless ``overwrite``.
        repo_id: the Hub id the card is for.
        template_dir: folder of the card templates (defaults to ``hub_cards/``).
        overwrite: replace an existing non-empty ``folder``.
        card_kwargs: ``dataset``, ``metrics`` and the optional fields of :func:`card_fields`.

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        FileExistsError: ``folder`` holds files and ``overwrite`` is false.
        ValueError: the card cannot be rendered, or the folder would hold files other than JSON and safetensors.
    """
    target = Path(folder)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} already holds files; pass overwrite=True to replace them")
    kind = model_kind(model)
    card = render_model_card(kind, card_fields(model, repo_id, **card_kwargs), template_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        if kind == "adapter":
            model.save_pretrained(staging, safe_serialization=True)
            _record_base_model(staging / ADAPTER_CONFIG_NAME, card_kwargs.get("base_model"))
        else:
            model.save_pretrained(staging)
        for code_file in staging.rglob("*.py"):
            code_file.unlink()
        unexpected = _non_hub_files(staging)
        if unexpected:
            raise ValueError(
                f"the upload of {type(model).__name__} would hold {unexpected}; a push holds only JSON and safetensors"
            )
        (staging / CARD_NAME).write_text(card, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _push(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None,
    token: str | None,
    commit_message: str | None,
    timeout: float | None,
    **save_kwargs: Any,
) -> str:
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="st-peft-push-") as workdir:
        folder = save_for_hub(model, Path(workdir) / "upload", repo_id=repo_id, **save_kwargs)
        with hub_requests("create the repository", repo_id, timeout):
            api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
        with hub_requests("upload to the repository", repo_id, timeout):
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {model_kind(model)} with st-peft",
            )
    return str(commit)


def push_adapter(
    peft_model: PeftModel,
    repo_id: str,
    *,
    dataset: str,
    metrics: Mapping[str, float],
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    timeout: float | None = None,
    **card_kwargs: Any,
) -> str:
    """Push an adapter and its model card (``hub_cards/adapter.md``) to ``repo_id`` in one commit.

    Args:
        peft_model: the trained ``PeftModel`` (ST-LoRA, FactoST); only the adapter is uploaded.
        repo_id: ``"org/name"``; created if missing.
        dataset: data set it was trained and tested on.
        metrics: test metrics by name.
        private, token, commit_message: as in ``HfApi.upload_folder``.
        timeout: seconds without an answer from the server after which the push gives up
            (default ``ST_PEFT_HUB_TIMEOUT`` or 30).
        card_kwargs: ``base_model`` (the backbone's Hub id), ``num_nodes``, ``input_len``,
            ``horizon``, ``license``, ``tags``, ``template_dir``.

    Returns:
        The URL of the commit.

    Raises:
        TypeError: ``peft_model`` is not a ``PeftModel``.
        HubError: the push failed; the message names the cause: no token, the server cannot be
            reached or did not answer in time, its HTTP status, or offline mode. Nothing is left
            behind locally.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"push_adapter takes a PeftModel, got {type(peft_model).__name__}; use push_backbone for a backbone"
        )
    return _push(
        peft_model,
        repo_id,
        dataset=dataset,
        metrics=metrics,
        private=private,
        token=token,
        commit_message=commit_message,
        timeout=timeout,
        **card_kwargs,
    )


def push_backbone(
    model: nn.Module,
    repo_id: str,
    *,
    dataset: str,
    metrics: Mapping[str, float],
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    timeout: float | None = None,
    **card_kwargs: Any,
) -> str:
    """Push a backbone (a ``PreTrainedModel``: STID, GWNet, STGCN, FactoST, ST-LINK) and its card (``hub_cards/backbone.md``).

    Arguments and errors as in :func:`push_adapter`; ``model`` must not be a ``PeftModel``.
    """
    if isinstance(model, PeftModel):
        raise TypeError("push_backbone got a PeftModel; push the adapter with push_adapter")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{type(model).__name__} has no save_pretrained; backbones are transformers PreTrainedModels")
    return _push(
        model,
        repo_id,
        dataset=dataset,
        metrics=metrics,
        private=private,
        token=token,
        commit_message=commit_message,
        timeout=timeout,
        **card_kwargs,
    )


@contextmanager
def _cache_restored_on_failure(repo_id: str, cache_dir: str | os.PathLike | None) -> Iterator[None]:
    """Remove what a failed pull added to the cache for ``repo_id`` (only if the repository was not cached before)."""
    root = Path(cache_dir or constants.HF_HUB_CACHE)
    name = repo_folder_name(repo_id=repo_id, repo_type="model")
    added = [path for path in (root / name, root / ".locks" / name) if not path.exists()]
    try:
        yield
    except BaseException:
        for path in added:
            shutil.rmtree(path, ignore_errors=True)
        raise


def local_folder(name_or_path: str | os.PathLike) -> Path | None:
    """The local folder ``name_or_path`` names, or None when it is a Hub repo id.

    Absolute and relative folders (``/data/stid``, ``./runs/stid/upload``, ``stid``) count when
    they exist; a name written as a path (absolute, or starting with ``.`` or ``~``) that does
    not exist is an error rather than a Hub id.

    Raises:
        FileNotFoundError: a path-like name whose folder does not exist.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"no folder {text} (a local model folder, or a Hub repo id such as org/name)")
    return None


def _fetch(repo_id: str, filename: str, what: str, **download_kwargs: Any) -> Path:
    """Download one file of the Hub repository ``repo_id``; a missing one is a :class:`HubError` saying ``what``."""
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, **download_kwargs))
    except (RepositoryNotFoundError, RemoteEntryNotFoundError) as error:
        # Mirrors answer a missing file like a missing repository, so one message covers both.
        raise HubError(
            f"no {filename} in {repo_id!r} at {constants.ENDPOINT}: the repository does not exist, is private, "
            f"or does not hold this file; {what}"
        ) from error
    except RevisionNotFoundError as error:
        raise HubError(f"{repo_id!r} has no revision {download_kwargs.get('revision')!r}") from error


def _pull(
    repo_id: str,
    config_name: str,
    what: str,
    patterns: list[str],
    check: Callable[[dict[str, Any], Path], None],
    timeout: float | None,
    **download_kwargs: Any,
) -> Path:
    """The folder of ``repo_id`` (a local folder, or a Hub repository downloaded as ``patterns``).

    ``check(config, folder)`` sees ``config_name`` first (before anything else is downloaded)
    and then the folder; it raises to refuse the repository, which leaves the cache as it was.
    """
    folder = local_folder(repo_id)
    if folder is not None:
        config_path = folder / config_name
        if not config_path.is_file():
            raise HubError(f"{folder} has no {config_name}; {what}")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        check(config, None)
        check(config, folder)
        return folder
    with hub_requests("pull", repo_id, timeout), _cache_restored_on_failure(repo_id, download_kwargs["cache_dir"]):
        config = json.loads(_fetch(repo_id, config_name, what, **download_kwargs).read_text(encoding="utf-8"))
        check(config, None)
        folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns, **download_kwargs))
        check(config, folder)
        return folder


def load_adapter(
    backbone: nn.Module,
    repo_id: str | os.PathLike,
    *,
    peft_type: str | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    load_backbone_weights: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> PeftModel:
    """Pull an st-peft adapter from the Hub (or a local folder) onto ``backbone``.

    Same result as ``PeftModel.from_pretrained(backbone, repo_id)``, after checking that the
    repository holds an adapter of the expected type stored as safetensors; only
    ``adapter_config.json`` and ``adapter_model.safetensors`` are downloaded. On failure the
    cache is left as it was.

    Args:
        backbone: the forecaster the adapter was trained on, with its weights loaded.
        repo_id: ``"org/name"`` on the Hub, or a local folder (absolute or relative).
        peft_type: the expected type (``"STLORA"``, ``"FACTOST"``); by default any st-peft type.
        adapter_name, is_trainable: as in ``PeftModel.from_pretrained``.
        load_backbone_weights: let an adapter saved with ``train_backbone=True`` overwrite
            ``backbone``'s own weights with the ones it carries; without it such an adapter is
            refused (the repository's config alone cannot allow it; see
            :func:`st_peft.tuners.checkpoint_keys.loading_backbone_weights`).
        revision, cache_dir, token: as in ``hf_hub_download``.
        timeout: seconds without an answer from the server after which the pull gives up
            (default ``ST_PEFT_HUB_TIMEOUT`` or 30).

    Raises:
        HubError: the pull failed; the message names the cause: the repository, revision or
            file does not exist, the server cannot be reached or did not answer in time, its
            HTTP status, or offline mode without a cached copy. The cache is left as it was.
        FileNotFoundError: ``repo_id`` is written as a path and no such folder exists.
        ValueError: the repository holds another PEFT type.
    """
    expected = (peft_type.upper(),) if peft_type else ST_PEFT_TYPES

    def check(config: dict[str, Any], folder: Path | None) -> None:
        found = config.get("peft_type")
        if found not in expected:
            raise ValueError(
                f"{str(repo_id)!r} holds a {found} adapter, not {' or '.join(expected)}"
                + ("" if peft_type else "; load adapters of other PEFT types with peft.PeftModel.from_pretrained")
            )
        if folder is not None and not (folder / ADAPTER_WEIGHTS_NAME).is_file():
            raise HubError(
                f"{str(repo_id)!r} holds no {ADAPTER_WEIGHTS_NAME}; st-peft loads adapters from safetensors only"
            )

    folder = _pull(str(repo_id), ADAPTER_CONFIG_NAME,
                   "an adapter repository holds it (a backbone holds config.json: use load_backbone)",
                   [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME], check, timeout, revision=revision,
                   cache_dir=cache_dir, token=token)
    with loading_backbone_weights() if load_backbone_weights else nullcontext():
        return PeftModel.from_pretrained(backbone, str(folder), adapter_name=adapter_name,
                                         is_trainable=is_trainable)


def _check_backbone_config(model_class: type[nn.Module], config: Mapping[str, Any], repo_id: str) -> None:
    """Refuse a ``config.json`` written by another model class, naming what differs."""
    if not issubclass(model_class, PreTrainedModel):
        raise TypeError(f"{model_class.__name__} cannot load from the Hub: backbones are transformers PreTrainedModels")
    expected = model_class.config_class.model_type
    found = config.get("model_type")
    if found != expected:
        what = f"a {found!r} model" if found else "a model without a model_type (not a transformers model)"
        raise ValueError(f"{repo_id!r} holds {what}, not {expected!r} ({model_class.__name__})")


def load_backbone(
    model_class: type[nn.Module],
    repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    timeout: float | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Pull a backbone of ``model_class`` from the Hub (or a local folder).

    Same result as ``model_class.from_pretrained(repo_id)``, after checking that the
    repository's ``config.json`` was written by ``model_class``; only ``*.json`` and
    ``*.safetensors`` are downloaded. On failure the cache is left as it was.

    Args:
        model_class: ``STID``, ``GWNet``, ``STGCN``, ``FactoSTModel``, ``STLinkForForecasting``, ...
        repo_id: ``"org/name"`` on the Hub, or a local folder (absolute or relative).
        revision, cache_dir, token: as in ``hf_hub_download``.
        timeout: seconds without an answer from the server after which the pull gives up
            (default ``ST_PEFT_HUB_TIMEOUT`` or 30).
        model_kwargs: passed on to ``model_class.from_pretrained``.

    Raises:
        HubError: the pull failed; the message names the cause: the repository, revision or
            file does not exist, the server cannot be reached or did not answer in time, its
            HTTP status, or offline mode without a cached copy. The cache is left as it was.
        FileNotFoundError: ``repo_id`` is written as a path and no such folder exists.
        ValueError: the repository holds another model.
    """

    def check(config: dict[str, Any], folder: Path | None) -> None:
        _check_backbone_config(model_class, config, str(repo_id))
        if folder is not None and not any(folder.glob("*.safetensors")):
            raise HubError(
                f"{str(repo_id)!r} holds no safetensors weights; st-peft loads backbones from safetensors only"
            )

    folder = _pull(str(repo_id), BACKBONE_CONFIG_NAME,
                   "a backbone repository holds it (an adapter holds adapter_config.json: use load_adapter)",
                   ["*.json", "*.safetensors"], check, timeout, revision=revision, cache_dir=cache_dir, token=token)
    return model_class.from_pretrained(str(folder), **model_kwargs)
