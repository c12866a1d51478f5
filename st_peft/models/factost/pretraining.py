"""Pretraining of the FactoST backbone on a corpus of univariate series.

The corpus is a ``datasets.Dataset`` with one series per row (column ``target``, a list of
floats, NaN where missing), built from the built-in data sets (every node and channel
becomes a series) or given by the user. Each step draws windows of
``max_context_length + max_horizon`` steps uniformly over all (series, start) pairs and

- draws one context length per batch, log-uniform in ``[patch_length, max_context_length]``,
  and masks a random leading part of some contexts as missing (random context lengths);
- draws one horizon per batch, uniform in ``[1, max_horizon]``;
- optionally replaces some windows by a low- or high-pass view through the FFT
  (FactoST v1's multi-frequency augmentation);
- prepends matched domain prompts to half of the batches, so the codebook is trained;
- minimises the pinball loss of all quantiles over the observed target steps, in units of
  each window's own spread so that every data set weighs the same.

The loop is a plain Accelerate loop: ``accelerate launch -m st_peft.cli pretrain ...`` runs
it on several processes; every process draws different windows.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs

from st_peft.metrics import pinball_loss
from st_peft.models.factost.configuration_factost import FACTOST_SIZES, FactoSTConfig
from st_peft.models.factost.modeling_factost import FactoSTModel, masked_instance_norm


def corpus_from_builtin(names: Sequence[str]) -> datasets.Dataset:
    """Every (node, channel) series of the named data sets, one row each.

    Args:
        names: data set names or paths accepted by ``st_peft.data.load``.

    Returns:
        ``datasets.Dataset`` with columns ``target`` (list of float, NaN where missing) and ``source``.
    """
    from st_peft.data import load

    targets, sources = [], []
    for name in names:
        data = load(name)
        values = np.where(data.mask, data.values, np.nan).astype(np.float32)
        for node in range(values.shape[1]):
            for channel in range(values.shape[2]):
                targets.append(values[:, node, channel].tolist())
                sources.append(str(name))
    return datasets.Dataset.from_dict({"target": targets, "source": sources})


class WindowSampler:
    """Draws random windows from a corpus held as one flat numpy array.

    Args:
        corpus: ``datasets.Dataset`` with a column of univariate series (NaN = missing).
        window: steps per window (context + horizon).
        column: name of the series column.
        seed: seed of the draws.
    """

    def __init__(self, corpus: datasets.Dataset, window: int, column: str = "target", seed: int = 0):
        if column not in corpus.column_names:
            raise ValueError(f"the pretraining corpus has no column {column!r}; its columns are {corpus.column_names}.")
        series = [np.asarray(row, dtype=np.float32) for row in corpus[column]]
        usable = [s for s in series if len(s) >= window]
        if not usable:
            longest = max((len(s) for s in series), default=0)
            raise ValueError(f"no series of the corpus has {window} steps (the longest has {longest}).")
        self.window = window
        self.values = np.concatenate(usable)
        lengths = np.array([len(s) for s in usable])
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        # Every valid start of every series, as a position in the flat array.
        counts = lengths - window + 1
        self.starts = np.repeat(offsets, counts) + np.concatenate([np.arange(c) for c in counts])
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``values (batch_size, window)`` with NaN replaced by 0 and the bool observed mask."""
        starts = self.rng.choice(self.starts, size=batch_size)
        windows = self.values[starts[:, None] + np.arange(self.window)[None, :]]
        mask = np.isfinite(windows)
        return np.where(mask, windows, 0.0).astype(np.float32), mask


def frequency_view(values: torch.Tensor, low_pass: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """Low- or high-pass view of each window through the real FFT.

    Args:
        values: ``(S, T)`` windows.
        low_pass: bool ``(S,)``; True keeps frequencies below ``cutoff``, False keeps the mean
            and the frequencies from ``cutoff`` up.
        cutoff: ``(S,)`` index of the first frequency bin that a low-pass view drops.

    Returns:
        ``(S, T)`` filtered windows.
    """
    spectrum = torch.fft.rfft(values, dim=-1)
    bins = torch.arange(spectrum.shape[-1], device=values.device)[None, :]
    keep = torch.where(low_pass[:, None], bins < cutoff[:, None], (bins >= cutoff[:, None]) | (bins == 0))
    return torch.fft.irfft(spectrum * keep, n=values.shape[-1], dim=-1)


@dataclass
class PretrainingObjective:
    """Random context lengths, random horizons, masking and augmentation around the pinball loss.

    Attributes:
        mask_probability: share of contexts whose random leading part is masked as missing.
        scatter_probability: share of contexts with scattered missing steps (up to 30%).
        augment_probability: share of windows replaced by a low- or high-pass view (0 turns it off).
        prompt_probability: share of batches that prepend matched domain prompts.
    """

    mask_probability: float = 0.3
    scatter_probability: float = 0.2
    augment_probability: float = 0.2
    prompt_probability: float = 0.5

    def __call__(
        self,
        model: torch.nn.Module,
        config: FactoSTConfig,
        values: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Pinball loss of one batch of windows.

        Args:
            model: the backbone, possibly wrapped for distributed training.
            config: the backbone's configuration.
            values: ``(S, max_context_length + max_horizon)`` windows, 0 where missing.
            mask: bool, same shape, True where observed.
            generator: CPU generator for the random choices.
        """
        size, total = values.shape
        device = values.device

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator).to(device)

        if self.augment_probability > 0:
            augmented = uniform(size) < self.augment_probability
            cutoff = 1 + (uniform(size) * (total // 2 - 1)).long()
            filtered = frequency_view(values, uniform(size) < 0.5, cutoff)
            values = torch.where(augmented[:, None] & mask.all(dim=1, keepdim=True), filtered, values)

        log_low, log_high = math.log(config.patch_length), math.log(config.max_context_length)
        context = int(round(math.exp(log_low + (log_high - log_low) * float(uniform(1)))))
        horizon = min(1 + int(float(uniform(1)) * config.max_horizon), config.max_horizon)
        start = config.max_context_length - context
        history = values[:, start : config.max_context_length]
        history_mask = mask[:, start : config.max_context_length].clone()
        target = values[:, config.max_context_length : config.max_context_length + horizon]
        target_mask = mask[:, config.max_context_length : config.max_context_length + horizon]

        steps = torch.arange(context, device=device)[None, :]
        cut = (uniform(size) * max(context - config.patch_length, 0)).long()
        lead = (uniform(size) < self.mask_probability)[:, None] & (steps < cut[:, None])
        scattered = (uniform(size) < self.scatter_probability)[:, None] & (uniform(size, context) < 0.3 * uniform(size, 1))
        history_mask &= ~(lead | scattered)

        normalised, loc, scale = masked_instance_norm(history, history_mask, config.norm_eps)
        output = model(
            past_values=normalised[:, :, None, None],
            past_observed_mask=history_mask[:, :, None, None],
            horizon=horizon,
            use_domain_prompts=bool(uniform(1) < self.prompt_probability),
        )
        forecast = output.quantile_outputs[:, :, 0, 0] * scale[:, :, None] + loc[:, :, None]
        # The loss is measured in units of the whole window's spread, not the context's: a short,
        # nearly flat context would otherwise blow a small absolute error up into a huge loss.
        _, window_loc, window_scale = masked_instance_norm(
            torch.cat((history, target), dim=1), torch.cat((history_mask, target_mask), dim=1), config.norm_eps
        )
        return pinball_loss(
            (forecast - window_loc[:, :, None]) / window_scale[:, :, None],
            (target - window_loc) / window_scale,
            config.quantiles,
            mask=target_mask,
        )


def pretrain(
    config: FactoSTConfig,
    corpus: datasets.Dataset,
    output_dir: str | Path,
    max_steps: int = 2000,
    max_minutes: float | None = None,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    warmup_steps: int = 100,
    weight_decay: float = 0.01,
    objective: PretrainingObjective | None = None,
    seed: int = 0,
    log_every: int = 50,
    column: str = "target",
    cpu: bool = False,
) -> dict:
    """Pretrain a FactoST backbone and save it with ``save_pretrained`` under ``output_dir``.

    Args:
        config: the backbone's configuration.
        corpus: univariate series, column ``target`` (see ``corpus_from_builtin``).
        output_dir: where the model, its config and ``pretraining_log.json`` go.
        max_steps: optimiser steps (the cosine schedule spans them).
        max_minutes: stop earlier once this much wall-clock time has passed.
        batch_size: windows per step and process.
        learning_rate: peak AdamW learning rate.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        objective: masking, augmentation and prompt probabilities.
        seed: seed of the weights and of the window draws (offset by the process index).
        log_every: steps between logged losses.
        column: series column of ``corpus``.
        cpu: force the CPU even when an accelerator is present.

    Returns:
        The log: arguments, steps done, minutes, and the mean loss of every logging interval.
    """
    # Half of the batches leave the codebook unused, which DDP must be told about.
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(seed)
    model = FactoSTModel(config)
    objective = objective or PretrainingObjective()
    sampler = WindowSampler(
        corpus, config.max_context_length + config.max_horizon, column=column, seed=seed + accelerator.process_index
    )
    generator = torch.Generator().manual_seed(seed + 1000 * (1 + accelerator.process_index))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    log = {"losses": [], "steps": 0}
    started = time.perf_counter()
    running = []
    for step in range(max_steps):
        values, mask = sampler.sample(batch_size)
        values = torch.from_numpy(values).to(accelerator.device)
        mask = torch.from_numpy(mask).to(accelerator.device)
        loss = objective(model, config, values, mask, generator)
        optimizer.zero_grad()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        log["steps"] = step + 1
        if (step + 1) % log_every == 0:
            log["losses"].append({"step": step + 1, "loss": float(np.mean(running))})
            accelerator.print(f"step {step + 1}: pinball {np.mean(running):.4f}")
            running = []
        if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
            break
    log["minutes"] = (time.perf_counter() - started) / 60
    log["processes"] = accelerator.num_processes
    log["objective"] = asdict(objective)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        accelerator.unwrap_model(model).save_pretrained(output_dir)
        (output_dir / "pretraining_log.json").write_text(json.dumps(log, indent=2))
    return log


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``st-peft pretrain`` to ``parser`` and return it."""
    parser.add_argument("--size", default="cpu", choices=sorted(FACTOST_SIZES), help="named model size")
    parser.add_argument(
        "--data",
        nargs="+",
        default=["nyc-taxi", "etth1", "chickenpox"],
        help="built-in data set names or paths whose series form the corpus",
    )
    parser.add_argument(
        "--hf-dataset",
        default=None,
        help="a datasets.Dataset saved with save_to_disk (one series per row) used instead of --data",
    )
    parser.add_argument("--column", default="target", help="series column of --hf-dataset")
    parser.add_argument("--output", help="folder for the pretrained backbone (required)")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this much wall-clock time")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--augment-probability", type=float, default=0.2, help="0 turns the FFT views off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with an accelerator")
    return parser


def run_pretrain(args: argparse.Namespace) -> dict:
    """Run ``st-peft pretrain`` with parsed ``args``; returns the pretraining log."""
    if args.output is None:
        raise SystemExit("st-peft pretrain: missing --output (flag or --config key)")
    if args.hf_dataset is not None:
        corpus = datasets.load_from_disk(args.hf_dataset)
    else:
        corpus = corpus_from_builtin(args.data)
    return pretrain(
        FactoSTConfig.from_size(args.size),
        corpus,
        args.output,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        objective=PretrainingObjective(augment_probability=args.augment_probability),
        seed=args.seed,
        column=args.column,
        cpu=args.cpu,
    )


if __name__ == "__main__":
    run_pretrain(add_pretrain_arguments(argparse.ArgumentParser(description=__doc__)).parse_args())
