"""Pretraining of the FactoST backbone on the streamed corpus of ``corpus.py``, resumable bit for bit.

Each step takes one batch of the corpus (one context length and one horizon, drawn per batch),
prepends matched domain prompts to a share of the batches so the codebook is trained, and
minimises the pinball loss of all quantiles over the observed target steps, in units of each
window's own spread so that every series weighs the same.

A run lives in one folder:

- ``options.json``: the backbone's configuration, the corpus's and the optimiser's settings and
  the real data named. A resumed run whose options differ is refused, naming the options.
- ``checkpoint/`` (and the one before it, ``checkpoint.previous/``): the model and the AdamW state
  in safetensors, and ``state.json`` (step, CPU seconds, log). A checkpoint is written to a
  temporary folder and renamed, so a stop leaves the last complete one; a checkpoint that cannot
  be read is passed over for the previous one, with a warning.
- when ``max_steps`` are done: ``config.json`` and ``model.safetensors`` (``save_pretrained``) and
  ``pretraining_log.json``.

Nothing random is carried between steps: the batch of step ``s`` on process ``r`` of ``R`` is the
corpus's batch ``s * R + r``, the prompt coin and dropout are seeded from ``(seed, s, r)``, and the
learning rate is a function of ``s``. So a run stopped at any step and resumed from its checkpoint
computes the same weights as one never stopped (on the same machine and thread count).

The loop is a plain Accelerate loop: ``accelerate launch -m st_peft.cli pretrain ...`` runs it on
several processes, every process on its own batches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from safetensors.torch import load_file, save_file

from st_peft.metrics import pinball_loss
from st_peft.models.factost.configuration_factost import FactoSTConfig
from st_peft.models.factost.corpus import (
    CorpusBatch,
    CorpusConfig,
    PretrainingCorpus,
    PretrainingOptionError,
    RealSeries,
    SyntheticSeriesConfig,
    check_nonnegative_numbers,
    check_probability,
    check_whole_numbers,
    read_real_series,
)
from st_peft.models.factost.modeling_factost import FactoSTModel, masked_instance_norm
from st_peft.optimizer_state import load_optimizer_tensors, optimizer_tensors

CHECKPOINT = "checkpoint"
PREVIOUS_CHECKPOINT = "checkpoint.previous"
OPTIONS_FILE = "options.json"


@dataclass(frozen=True)
class PretrainingOptions:
    """The optimiser's settings and the length of the run.

    Attributes:
        max_steps: optimiser steps; the learning-rate schedule spans them.
        learning_rate: peak AdamW learning rate.
        final_learning_rate_ratio: the cosine decay ends at this share of the peak.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradients are clipped to this norm.
        prompt_probability: share of batches that prepend matched domain prompts.
        seed: seed of the weights, of dropout and of the prompt coin (the corpus has its own).
    """

    max_steps: int = 2000
    learning_rate: float = 1e-3
    final_learning_rate_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    prompt_probability: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        check_whole_numbers(self, ("max_steps",), 1)
        check_whole_numbers(self, ("warmup_steps", "seed"), 0)
        check_nonnegative_numbers(self, ("learning_rate", "weight_decay", "max_grad_norm"))
        for name in ("final_learning_rate_ratio", "prompt_probability"):
            check_probability(self, name)

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``final_learning_rate_ratio`` of the peak at ``max_steps``."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps), 1.0)
        floor = self.final_learning_rate_ratio
        return self.learning_rate * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _step_seed(seed: int, step: int, process: int) -> int:
    return int(np.random.SeedSequence([seed, step, process]).generate_state(1)[0])


def pretraining_loss(model: torch.nn.Module, config: FactoSTConfig, batch: CorpusBatch, use_domain_prompts: bool,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Pinball loss of one corpus batch, in units of each window's spread.

    Args:
        model: the backbone, possibly wrapped for distributed training.
        config: the backbone's configuration.
        batch: windows of ``batch.context_length + batch.horizon`` steps.
        use_domain_prompts: prepend the matched codebook entries.
        device: where the model is.

    Returns:
        The scalar loss, averaged over observed target steps and quantiles.
    """
    values = torch.from_numpy(batch.values).to(device)
    observed = torch.from_numpy(batch.observed).to(device)
    context = batch.context_length
    history, history_mask = values[:, :context], observed[:, :context]
    target, target_mask = values[:, context:], observed[:, context:]
    output = model(
        past_values=history[:, :, None, None],
        past_observed_mask=history_mask[:, :, None, None],
        horizon=batch.horizon,
        use_domain_prompts=use_domain_prompts,
    )
    forecast = output.quantile_outputs[:, :, 0, 0]
    # The loss is measured in units of the whole window's spread, not the context's: a short,
    # nearly flat context would otherwise blow a small absolute error up into a huge loss.
    _, window_loc, window_scale = masked_instance_norm(values, observed, config.norm_eps)
    return pinball_loss(
        (forecast - window_loc[:, :, None]) / window_scale[:, :, None],
        (target - window_loc) / window_scale,
        config.quantiles,
        mask=target_mask,
    )


@torch.no_grad()
def validation_loss(model: torch.nn.Module, config: FactoSTConfig, corpus: PretrainingCorpus, num_batches: int,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean pinball loss on the first ``num_batches`` validation batches, overall and per source kind.

    Returns:
        ``{"all": ..., "synthetic": ..., "real": ..., "mixup": ...}`` (a kind absent from the
        batches is left out); every window weighs the same.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for index in range(num_batches):
        batch = corpus.batch(index, "validation")
        kinds = np.where(np.isin(batch.sources, ["synthetic", "mixup"]), batch.sources, "real")
        for kind in np.unique(kinds):
            rows = np.flatnonzero(kinds == kind)
            part = CorpusBatch(batch.values[rows], batch.observed[rows], batch.context_length, batch.horizon,
                               batch.sources[rows], batch.index)
            if not part.observed[:, batch.context_length:].any():
                continue
            loss = float(pretraining_loss(model, config, part, use_domain_prompts=False, device=device))
            for key in (str(kind), "all"):
                sums[key] = sums.get(key, 0.0) + loss * len(rows)
                counts[key] = counts.get(key, 0) + len(rows)
    model.train(was_training)
    return {key: sums[key] / counts[key] for key in sums}


def _flatten(prefix: str, value: Any, into: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, into)
    else:
        into[prefix] = value
    return into


class ResumeRefused(ValueError):
    """A pretraining folder was started with other options than those given now."""


def check_resumable(saved: dict, current: dict) -> None:
    """Refuse to resume a run whose options changed, naming every option that did.

    Raises:
        ResumeRefused: the options differ.
    """
    before, after = _flatten("", saved, {}), _flatten("", current, {})
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key, "<absent>") != after.get(key, "<absent>"))
    if changed:
        details = "; ".join(f"{key}: {before.get(key, '<absent>')!r} -> {after.get(key, '<absent>')!r}" for key in changed[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise ResumeRefused(
            f"this pretraining folder was started with other options, so it cannot be resumed: {details}{more}. "
            "Use a new output folder, or the options it was started with."
        )


def save_checkpoint(folder: Path, model: FactoSTModel, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write the model, the AdamW state and ``state`` as ``folder/checkpoint``, keeping the one before.

    The checkpoint is complete before it replaces anything: it is written to a temporary folder,
    flushed, and renamed.
    """
    staging = folder / f"{CHECKPOINT}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()},
              str(staging / "model.safetensors"))
    save_file(optimizer_tensors(optimizer), str(staging / "optimizer.safetensors"))
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    current, previous = folder / CHECKPOINT, folder / PREVIOUS_CHECKPOINT
    if current.exists():
        shutil.rmtree(previous, ignore_errors=True)
        current.rename(previous)
    staging.rename(current)


def load_checkpoint(folder: Path, model: FactoSTModel, optimizer: torch.optim.Optimizer) -> dict | None:
    """Load the newest readable checkpoint of ``folder`` into ``model`` and ``optimizer``.

    Returns:
        The checkpoint's ``state`` (step, CPU seconds, log), or ``None`` when there is none. An
        unreadable newest checkpoint is passed over for the previous one, with a warning.
    """
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = folder / name
        if not path.exists():
            continue
        try:
            state = json.loads((path / "state.json").read_text())
            weights = load_file(str(path / "model.safetensors"))
            moments = load_file(str(path / "optimizer.safetensors"))
            expected = set(model.state_dict())
            if set(weights) != expected:
                raise ValueError(f"its weights have keys {sorted(set(weights) ^ expected)[:4]} that the model does not")
            load_optimizer_tensors(optimizer, moments)
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
            warnings.warn(f"pretraining checkpoint {path} cannot be read ({error}); trying the one before it.",
                          stacklevel=2)
            continue
        model.load_state_dict(weights)
        return state
    return None


def pretrain(
    config: FactoSTConfig,
    corpus: PretrainingCorpus,
    output_dir: str | Path,
    options: PretrainingOptions | None = None,
    *,
    data: list[str] | None = None,
    max_minutes: float | None = None,
    checkpoint_every_minutes: float = 10.0,
    validation_batches: int = 16,
    validate_every: int = 500,
    log_every: int = 50,
    cpu: bool = False,
) -> dict:
    """Pretrain a FactoST backbone, resuming from ``output_dir`` when it holds a checkpoint.

    Args:
        config: the backbone's configuration; the corpus's lengths must fit it.
        corpus: the stream of batches (see ``corpus.py``).
        output_dir: the run folder (see the module docstring).
        options: optimiser settings and ``max_steps``.
        data: names of the real data in the corpus, recorded in ``options.json``.
        max_minutes: stop (with a checkpoint) after this much wall-clock time; run again to resume.
        checkpoint_every_minutes: wall-clock minutes between checkpoints.
        validation_batches: validation batches of the corpus scored every ``validate_every`` steps
            and at the end.
        validate_every: steps between validation scores.
        log_every: steps between logged training losses.
        cpu: force the CPU even when an accelerator is present.

    Returns:
        The log: steps done, whether the run is finished, CPU hours, windows per CPU second, peak
        resident memory, the training losses and the validation scores.
    """
    options = options or PretrainingOptions()
    if corpus.config.max_context_length > config.max_context_length or corpus.config.max_horizon > config.max_horizon:
        raise PretrainingOptionError(
            f"the corpus draws contexts up to {corpus.config.max_context_length} and horizons up to "
            f"{corpus.config.max_horizon} steps, more than the backbone takes ({config.max_context_length}, "
            f"{config.max_horizon})."
        )
    if corpus.config.min_context_length < config.patch_length:
        raise PretrainingOptionError(
            f"the corpus's min_context_length ({corpus.config.min_context_length}) is shorter than the backbone's "
            f"patch_length ({config.patch_length})."
        )
    # Half of the batches leave the codebook unused, which DDP must be told about.
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    folder = Path(output_dir)
    recorded = {
        "backbone": config.to_dict(),
        **corpus.describe(),
        "options": asdict(options),
        "data": list(data or []),
        "processes": accelerator.num_processes,
    }
    recorded["backbone"].pop("transformers_version", None)
    recorded = json.loads(json.dumps(recorded))  # as options.json reads back: tuples become lists
    options_path = folder / OPTIONS_FILE
    if options_path.exists():
        check_resumable(json.loads(options_path.read_text()), recorded)
    elif accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        options_path.write_text(json.dumps(recorded, indent=1))
    accelerator.wait_for_everyone()

    torch.manual_seed(options.seed)
    model = FactoSTModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    state = load_checkpoint(folder, model, optimizer) or {
        "step": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0, "windows": 0, "losses": [], "validation": [],
    }
    resumed_at = state["step"]
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    model.train()
    started = time.perf_counter()
    last_checkpoint = started
    cpu_mark, wall_mark = time.process_time(), time.perf_counter()
    running: list[float] = []
    rank, world = accelerator.process_index, accelerator.num_processes

    def account() -> None:
        nonlocal cpu_mark, wall_mark
        now_cpu, now_wall = time.process_time(), time.perf_counter()
        state["cpu_seconds"] += now_cpu - cpu_mark
        state["wall_seconds"] += now_wall - wall_mark
        cpu_mark, wall_mark = now_cpu, now_wall
        # the largest resident memory of any session of the run (Linux reports ru_maxrss in KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        state["peak_rss_mib"] = max(state.get("peak_rss_mib", 0.0), peak)

    def checkpoint() -> None:
        account()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(folder, unwrapped, optimizer, state)

    def validate() -> None:
        scores = validation_loss(unwrapped, config, corpus, validation_batches, device=accelerator.device)
        state["validation"].append({"step": state["step"], **scores})
        accelerator.print(f"step {state['step']}: validation pinball {scores.get('all', float('nan')):.4f}")

    while state["step"] < options.max_steps:
        step = state["step"]
        batch = corpus.batch(step * world + rank)
        torch.manual_seed(_step_seed(options.seed, step, rank))
        use_prompts = bool(np.random.default_rng([options.seed, step, rank]).random() < options.prompt_probability)
        for group in optimizer.param_groups:
            group["lr"] = options.learning_rate_at(step)
        loss = pretraining_loss(model, config, batch, use_prompts, device=accelerator.device)
        optimizer.zero_grad()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), options.max_grad_norm)
        optimizer.step()
        running.append(loss.item())
        state["step"] = step + 1
        state["windows"] += len(batch.values) * world
        if state["step"] % log_every == 0:
            state["losses"].append({"step": state["step"], "loss": float(np.mean(running))})
            accelerator.print(f"step {state['step']}/{options.max_steps}: pinball {np.mean(running):.4f}")
            running = []
        if validate_every and state["step"] % validate_every == 0 and state["step"] < options.max_steps:
            validate()
        now = time.perf_counter()
        if now - last_checkpoint > 60 * checkpoint_every_minutes:
            checkpoint()
            last_checkpoint = now
        if max_minutes is not None and now - started > 60 * max_minutes:
            break
    finished = state["step"] >= options.max_steps
    unvalidated = finished and (not state["validation"] or state["validation"][-1]["step"] != state["step"])
    if unvalidated:
        validate()
    # a finished run called again writes nothing: its checkpoints and log stay as they were
    changed = state["step"] > resumed_at or unvalidated
    if changed:
        checkpoint()
    log = {
        "steps": state["step"],
        "max_steps": options.max_steps,
        "finished": finished,
        "processes": world,
        "cpu_hours": state["cpu_seconds"] / 3600,
        "wall_hours": state["wall_seconds"] / 3600,
        "windows": state["windows"],
        "windows_per_cpu_second": state["windows"] / max(state["cpu_seconds"], 1e-9),
        "peak_rss_mib": state.get("peak_rss_mib"),
        "losses": state["losses"],
        "validation": state["validation"],
    }
    if finished and accelerator.is_main_process and (changed or not (folder / "pretraining_log.json").exists()):
        unwrapped.save_pretrained(folder)
        (folder / "pretraining_log.json").write_text(json.dumps(log, indent=1))
    return log


def build_corpus(config: FactoSTConfig, real_series: list[RealSeries], **settings: Any) -> PretrainingCorpus:
    """A corpus whose lengths fit ``config``: contexts up to its ``max_context_length``, horizons up to its ``max_horizon``.

    Args:
        config: the backbone's configuration.
        real_series: the real series.
        **settings: other ``CorpusConfig`` fields.
    """
    corpus_config = CorpusConfig(
        max_context_length=config.max_context_length,
        max_horizon=config.max_horizon,
        min_context_length=config.patch_length,
        patch_length=config.patch_length,
        **settings,
    )
    return PretrainingCorpus(corpus_config, real_series, SyntheticSeriesConfig())


def run_pretrain(args: argparse.Namespace) -> dict:
    """Run ``st-peft pretrain`` with ``args`` parsed by the command line (``st_peft_cli.options.PretrainOptions``);
    returns the pretraining log."""
    if args.output is None:
        raise SystemExit("st-peft pretrain: missing --output (flag or --config key)")
    if args.hf_dataset is not None:
        import datasets

        table = datasets.load_from_disk(args.hf_dataset)
        if args.column not in table.column_names:
            raise SystemExit(f"st-peft pretrain: {args.hf_dataset} has no column {args.column!r}; it has {table.column_names}")
        real = [RealSeries(Path(args.hf_dataset).name, np.asarray(row, dtype=np.float32)) for row in table[args.column]]
        data = [str(args.hf_dataset)]
    else:
        real, data = read_real_series(args.data), [str(name) for name in args.data]
    config = FactoSTConfig.from_size(args.size)
    try:
        corpus = build_corpus(
            config, real, tokens_per_batch=args.tokens_per_batch, max_batch_size=args.max_batch_size,
            long_context_probability=args.long_context_probability, synthetic_weight=args.synthetic_weight,
            real_weight=args.real_weight, mixup_weight=args.mixup_weight, seed=args.seed,
        )
        options = PretrainingOptions(max_steps=args.max_steps, learning_rate=args.learning_rate,
                                     warmup_steps=min(args.warmup_steps, args.max_steps), seed=args.seed)
        return pretrain(config, corpus, args.output, options, data=data, max_minutes=args.max_minutes,
                        validate_every=args.validate_every, log_every=args.log_every, cpu=args.cpu)
    except (ResumeRefused, PretrainingOptionError) as error:
        raise SystemExit(f"st-peft pretrain: error: {error}") from None
