"""``STTrainer``: a ``transformers.Trainer`` for spatio-temporal forecasters.

The batch is the project's dict of transformers' time-series names (see
``docs/ARCHITECTURE.md``). Every st-peft model returns its own masked ``loss`` in original
units when given ``future_values``, so plain ``transformers.Trainer`` trains them too;
``STTrainer`` adds what it lacks: per-horizon metrics, early stopping on validation MAE,
batch samplers (few-shot, memory replay), node batches (each training batch on ``K`` of the
graph's nodes, evaluation over every node), and a user's own module whose ``forward`` takes
only some of the batch's keys and returns a bare tensor. Anything ``Trainer`` can train (a
plain ``nn.Module``, a ``PeftModel``, a ``PreTrainedModel``) goes through the same code path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler
from transformers import EarlyStoppingCallback, EvalPrediction, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from st_peft.checks import check_future_values
from st_peft.data.node_batching import NodeBatchCollator, NodeSampler
from st_peft.forecasting import forecast_loss, inputs_for
from st_peft.losses import masked_mae
from st_peft.metrics import POINT_METRICS, horizon_metrics
from st_peft.outputs import TARGET_NAMES, prediction_of
from st_peft.training.node_batches import (
    check_same_graph,
    forecasts_nodes_independently,
    load_sampler_state,
    node_chunks,
    sampler_state_file,
    save_sampler_state,
)
from st_peft.training.samplers import MemoryReplaySampler

logger = logging.get_logger(__name__)

DEFAULT_HORIZONS = (3, 6, 12)


def st_training_args(
    output_dir: str,
    epochs: float = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    **overrides: Any,
) -> TrainingArguments:
    """``TrainingArguments`` suited to forecasting with :class:`STTrainer`.

    Evaluates and saves every epoch, keeps the checkpoint with the lowest validation MAE and
    reloads it at the end, runs on the CPU when no GPU is visible, reports to no tracker,
    clips gradients at 5 (as BasicTS does) and logs a non-finite loss as it is. Any
    ``TrainingArguments`` field can be overridden by keyword.
    """
    settings: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": epochs,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        "learning_rate": lr,
        "weight_decay": weight_decay,
        "max_grad_norm": 5.0,
        "seed": seed,
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "logging_strategy": "epoch",
        "save_total_limit": 2,
        "load_best_model_at_end": True,
        "metric_for_best_model": "mae",
        "greater_is_better": False,
        "remove_unused_columns": False,
        "label_names": list(TARGET_NAMES),
        "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        # Trainer would log a NaN loss as the mean of the earlier ones (0 at the first step)
        "logging_nan_inf_filter": False,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


def default_horizons(steps: int) -> tuple[int, ...]:
    """The usual report steps 3, 6 and 12 that fit in a forecast of ``steps`` steps, or ``(steps,)``."""
    return tuple(h for h in DEFAULT_HORIZONS if h <= steps) or (steps,)


class STTrainer(Trainer):
    """Trainer for forecasters called with the batch dict and forecasting ``(B, H, N, C_out)`` in original units.

    Args:
        model: a plain ``nn.Module``, a ``PeftModel`` or a ``PreTrainedModel`` called as
            ``model(past_values=..., past_time_features=..., future_values=..., ...)``. An
            st-peft model returns a ``ForecastOutput`` whose ``loss`` is used as it is. A user's
            module only needs ``forward(past_values, **kwargs)`` (or just ``forward(past_values)``:
            it receives the batch keys its signature names) and may return a bare tensor in
            original units; the trainer then computes the masked MAE itself.
        args: training arguments; :func:`st_training_args` gives sensible ones.
            ``remove_unused_columns`` is forced to False: the data set holds window starts
            that only the collator understands.
        train_dataset, eval_dataset: ``splits.train`` / ``splits.val``.
        data_collator: ``splits.collator``.
        train_sampler: a ``Sampler`` of row indices, or a batch sampler (a
            ``torch.utils.data.BatchSampler`` or :class:`MemoryReplaySampler`) yielding lists
            of them, used instead of the random sampler for training.
        horizons: 1-based steps reported by evaluation; by default 3, 6 and 12 where they fit.
        node_sampler: train on node batches: each training batch carries the ``K`` nodes this
            :class:`~st_peft.data.node_batching.NodeSampler` draws, with their ``node_index``
            (``data_collator`` is then the splits' whole-graph collator). A training epoch then
            visits each window ``ceil(N / K)`` times (``node_sampler.passes_per_epoch``, one
            random order of the windows per pass, a fresh draw of nodes per batch), so that it
            sees every (window, node) pair about once, as a whole-graph epoch does: the epoch
            budget, evaluation and save "epoch" strategies, early-stopping patience and the
            learning-rate schedule count the same node-visits with and without node batches.
            ``max_steps`` still counts optimizer steps; a ``train_sampler`` of your own decides
            the epoch itself. The draws are part of every checkpoint, so a resumed run draws
            what the uninterrupted one would have.
        eval_node_chunk: evaluate and predict in chunks of this many nodes where the model
            forecasts each node from its own series only (``forecasts_nodes_independently``);
            default: the node sampler's ``K``. Metrics are always over every node; a graph
            model is evaluated on the whole graph.
        early_stopping_patience: stop after this many evaluations without a better
            ``metric_for_best_model`` (needs evaluation and ``metric_for_best_model`` set).
        **kwargs: anything else ``transformers.Trainer`` takes (``callbacks``, ``optimizers``, ...).

    ``predict(dataset).predictions`` are forecasts in original units ``(S, H, N, C_out)``, and
    its ``label_ids`` are ``(future_values, future_observed_mask as float)``; evaluation metrics carry the ``eval_``
    prefix (``eval_mae@3``, ``eval_mae``), so ``metric_for_best_model="mae"`` selects the
    checkpoint with the lowest validation MAE.
    """

    # compute_loss returns a per-batch mean, so Trainer divides by the accumulation steps
    loss_is_scaled_for_ga = False
    bare_output_loss = staticmethod(masked_mae)
    """The loss of a module that returns a bare tensor (no ``loss`` of its own)."""

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Callable[[list[dict]], dict[str, torch.Tensor]] | None = None,
        train_sampler: Sampler | None = None,
        horizons: Sequence[int] | None = None,
        node_sampler: NodeSampler | None = None,
        eval_node_chunk: int | None = None,
        early_stopping_patience: int | None = None,
        compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None = None,
        **kwargs: Any,
    ) -> None:
        if args.remove_unused_columns:
            logger.info("STTrainer sets remove_unused_columns=False: the batch is built by the collator.")
            args.remove_unused_columns = False
        if early_stopping_patience is not None:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), EarlyStoppingCallback(early_stopping_patience)]
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            compute_metrics=compute_metrics or self._horizon_metrics,
            **kwargs,
        )
        self.train_sampler = train_sampler
        self.horizons = tuple(horizons) if horizons is not None else None
        self.node_collator = None
        if node_sampler is not None:
            if data_collator is None:
                raise ValueError("STTrainer: node batches are gathered by the splits' collator; pass data_collator")
            check_same_graph(model, node_sampler.num_nodes, "the node sampler's graph")
            self.node_collator = NodeBatchCollator(data_collator, node_sampler)
        if eval_node_chunk is not None and eval_node_chunk < 1:
            raise ValueError(f"STTrainer: eval_node_chunk must be at least 1, got {eval_node_chunk}")
        self.eval_node_chunk = eval_node_chunk or (node_sampler.nodes_per_batch if node_sampler else None)
        self._node_batches_trained = 0

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The model's masked loss in original units (with its ``aux_loss``).

        Returns the loss, and with ``return_outputs`` also the forecast in original units
        ``(B, H, N, C_out)``.
        """
        missing = [key for key in TARGET_NAMES if key not in inputs]
        if missing:
            raise KeyError(f"the batch has no {missing}; its keys are {sorted(inputs)}")
        outputs = model(**inputs_for(model, inputs))
        prediction = prediction_of(outputs)
        loss = None if isinstance(outputs, torch.Tensor) else outputs.get("loss")
        if loss is None:
            name = type(model).__name__
            if prediction.dim() != 4:
                raise ValueError(f"{name} returned a forecast of shape {tuple(prediction.shape)}; st-peft forecasts "
                                 "are (batch, horizon, nodes, out_channels)")
            check_future_values(inputs["future_values"], model=name, batch_size=prediction.shape[0],
                                horizon=prediction.shape[1], nodes=prediction.shape[2],
                                out_channels=prediction.shape[3])
            loss = forecast_loss(prediction, inputs["future_values"], inputs["future_observed_mask"],
                                 self.bare_output_loss, model=name, aux_loss=getattr(outputs, "aux_loss", None))
        return (loss, prediction) if return_outputs else loss

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One optimisation step's forward and backward; stops training on a non-finite loss.

        Raises:
            NonFiniteLossError: the loss is NaN or infinite, naming the step (before the
                optimizer applies anything from it).
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.node_collator is not None:
            self._node_batches_trained += 1
        if not torch.isfinite(loss).all():
            step = self.state.global_step + 1
            raise NonFiniteLossError(
                f"the training loss is {float(loss):g} at step {step} (epoch {self.state.epoch or 0:.2f}); training "
                "stopped. Check the data for extreme values, or lower the learning rate"
            )
        return loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """Loss, forecast in original units ``(B, H, N, C_out)`` and ``(future_values, mask as float)``.

        The mask travels as float because it is gathered across processes with the forecast.
        """
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            chunk = self._node_chunk(model, inputs)
            if chunk is None:
                loss, prediction = self.compute_loss(model, inputs, return_outputs=True)
            else:
                loss, prediction = self._loss_in_node_chunks(model, inputs, chunk)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        labels = (inputs["future_values"], inputs["future_observed_mask"].to(prediction.dtype))
        return loss, prediction.detach(), labels

    def _node_chunk(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> int | None:
        """Nodes per chunk for this whole-graph evaluation batch, or None for one pass over every node."""
        if self.eval_node_chunk is None or "node_index" in inputs:
            return None
        nodes = inputs["past_values"].shape[2]
        # the model would take a node_index into a graph of another size without a word
        check_same_graph(self.accelerator.unwrap_model(model), nodes, "the evaluated data")
        if self.eval_node_chunk >= nodes or not forecasts_nodes_independently(self.accelerator.unwrap_model(model)):
            return None
        return self.eval_node_chunk

    def _loss_in_node_chunks(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and forecast ``(B, H, N, C_out)`` of a whole-graph batch, computed ``chunk`` nodes at a time.

        The loss is each chunk's masked mean weighted by its observed targets, which is the
        whole graph's masked mean (plus the model's ``aux_loss``, the same in every chunk).
        """
        losses, weights, predictions = [], [], []
        for piece in node_chunks(inputs, chunk):
            loss, prediction = self.compute_loss(model, piece, return_outputs=True)
            losses.append(loss)
            weights.append(piece["future_observed_mask"].sum())
            predictions.append(prediction)
        losses, weights = torch.stack(losses), torch.stack(weights).to(losses[0].dtype)
        total = weights.sum()
        loss = (losses * weights).sum() / total if total > 0 else losses.mean()
        return loss, torch.cat(predictions, dim=2)

    def _horizon_metrics(self, eval_prediction: EvalPrediction) -> dict[str, float]:
        target, mask = eval_prediction.label_ids
        prediction = np.asarray(eval_prediction.predictions)
        horizons = self.horizons or default_horizons(prediction.shape[1])
        return horizon_metrics(prediction, target, np.asarray(mask) > 0.5, horizons=horizons)

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler | None:
        if self.train_sampler is not None:
            return self.train_sampler
        sampler = super()._get_train_sampler(train_dataset)
        if self.node_collator is None or type(sampler) is not RandomSampler or sampler.replacement:
            return sampler
        # an epoch visits each window ceil(N / K) times, one fresh permutation per pass, so that it
        # sees every (window, node) pair about once and epochs, patience and the learning-rate
        # schedule mean what they mean on the whole graph; Accelerate keeps num_samples when it
        # makes the sampler seedable, so resuming skips into the same order
        passes = self.node_collator.sampler.passes_per_epoch
        return RandomSampler(sampler.data_source, num_samples=passes * len(sampler.data_source),
                             generator=sampler.generator)

    @contextmanager
    def _training_collator(self) -> Iterator[None]:
        """The node-batch collator as ``data_collator`` while the training loader is built (evaluation
        keeps the whole-graph one)."""
        whole_graph = self.data_collator
        if self.node_collator is not None:
            self.data_collator = self.node_collator
        try:
            yield
        finally:
            self.data_collator = whole_graph

    def get_train_dataloader(self) -> DataLoader:
        """The training loader; a batch sampler given as ``train_sampler`` decides every batch, and a
        node sampler the nodes of every batch."""
        with self._training_collator():
            return self._train_dataloader()

    def _train_dataloader(self) -> DataLoader:
        if not isinstance(self.train_sampler, (BatchSampler, MemoryReplaySampler)):
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("STTrainer: training requires a train_dataset.")
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.train_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``; resuming node-batched training also resumes the node draws of the checkpoint."""
        self._node_batches_trained = 0
        if self.node_collator is not None and resume_from_checkpoint not in (None, False):
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            load_sampler_state(self.node_collator, self._sampler_state_file(resume_from_checkpoint))
        elif self.node_collator is not None:
            # draws are counted from here, like the batches trained: an earlier train() may have drawn ahead
            self.node_collator.load_state_dict(self.node_collator.state_dict())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _sampler_state_file(self, folder: str) -> Path:
        return sampler_state_file(folder, self.args.process_index, self.args.world_size)

    def _save_rng_state(self, output_dir: str) -> None:
        """Trainer's random states, and the node sampler's before the first batch not yet trained on."""
        super()._save_rng_state(output_dir)
        if self.node_collator is not None:
            os.makedirs(output_dir, exist_ok=True)
            save_sampler_state(self.node_collator, self._node_batches_trained, self._sampler_state_file(output_dir))

    def evaluate_test(self, test_dataset: Any, horizons: Sequence[int] | None = None) -> dict[str, float]:
        """Metrics of the current model on ``test_dataset`` (e.g. ``splits.test``).

        Returns the :func:`~st_peft.metrics.horizon_metrics` keys without prefix
        (``"mae@3"``, ..., ``"mae"``, ``"rmse"``, ``"mape"``, ``"wape"``) and the test ``"loss"``.
        """
        saved, self.horizons = self.horizons, tuple(horizons) if horizons is not None else self.horizons
        try:
            # predict, not evaluate: test metrics must not reach early stopping or the best-model logic
            metrics = self.predict(test_dataset, metric_key_prefix="test").metrics
        finally:
            self.horizons = saved
        stripped = {key.removeprefix("test_"): value for key, value in metrics.items()}
        return {
            key: value
            for key, value in stripped.items()
            if key == "loss" or key.split("@")[0] in POINT_METRICS
        }
