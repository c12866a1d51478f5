"""Node batches in training and evaluation: ST-LoRA's per-node rows, resuming the draws, evaluation over
every node in chunks, refused graphs, the command line and two processes (real data: sz-taxi)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model

from st_peft import cli
from st_peft.backbones import STID, GWNet
from st_peft.data import build_splits, load
from st_peft.data.node_batching import NodeBatchCollator, NodeSampler
from st_peft.models.factost import FactoSTConfig, FactoSTModel
from st_peft.runs import RunFolder
from st_peft.training import STTrainer, st_training_args
from st_peft.training.node_batches import SAMPLER_STATE, forecasts_nodes_independently
from st_peft.tuners.factost import FactoSTAdapterConfig
from st_peft.tuners.st_lora import STLoraConfig

ROOT = Path(__file__).resolve().parent.parent
RANKS_SCRIPT = Path(__file__).parent / "scripts" / "cli_ranks.py"
CPU_2PROC = ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"
TINY_GWNET = {"residual_channels": 4, "dilation_channels": 4, "skip_channels": 8, "end_channels": 8}


@pytest.fixture(scope="module")
def splits():
    return build_splits(load("sz-taxi"), input_len=12, horizon=12)


def stid(splits, seed: int = 0) -> STID:
    torch.manual_seed(seed)
    return STID(**splits.model_kwargs(), steps_per_day=splits.steps_per_day)


def st_lora(backbone, splits, **settings):
    """ST-LoRA with random initial weights (its per-node rows get gradients at the first step), NALLs on fc1."""
    torch.manual_seed(1)
    return get_peft_model(backbone, STLoraConfig(**splits.size_kwargs(), target_modules=["fc1"], node_axis=1,
                                                 init_weights=False, **settings))


def arguments(folder, **overrides):
    settings = {"epochs": 1, "batch_size": 32, "disable_tqdm": True, "eval_strategy": "no", "save_strategy": "no",
                "load_best_model_at_end": False, "logging_strategy": "no", **overrides}
    return st_training_args(str(folder), **settings)


def per_node_rows(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.named_parameters()
            if value.requires_grad and name.endswith(("node_embedding", "stl_node_scale.default"))}


# ---- ST-LoRA indexed by node_index ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["stid", "gwnet"])
def test_st_lora_forward_on_every_node_in_any_order_equals_the_full_forward(splits, name):
    torch.manual_seed(0)
    backbone = stid(splits) if name == "stid" else GWNet(**splits.model_kwargs(), adjacency=splits.adjacency,
                                                         **TINY_GWNET)
    model = st_lora(backbone, splits).eval() if name == "stid" else get_peft_model(
        backbone, STLoraConfig(**splits.size_kwargs(), init_weights=False)).eval()
    starts = np.asarray(splits.test["start"])[:4]
    collator = NodeBatchCollator(splits.collator, NodeSampler(splits.num_nodes, splits.num_nodes))
    order = np.random.default_rng(0).permutation(splits.num_nodes)
    with torch.no_grad():
        full = model(**splits.collator.gather(starts)).prediction_outputs
        in_order = model(**collator.gather(starts, np.arange(splits.num_nodes))).prediction_outputs
        permuted = model(**collator.gather(starts, order)).prediction_outputs
        with model.disable_adapter():
            backbone_only = model(**splits.collator.gather(starts)).prediction_outputs
    assert not torch.equal(full, backbone_only)  # the adapter's per-node parameters take part
    torch.testing.assert_close(in_order, full, rtol=0, atol=0)
    torch.testing.assert_close(permuted, full[:, :, order])


def test_node_batched_training_updates_only_the_drawn_nodes_rows(splits, tmp_path):
    model = st_lora(stid(splits), splits)
    before = per_node_rows(model)
    assert set(before) == {"base_model.model.forecast_seam.stl_heads.default.node_embedding",
                           "base_model.model.encoder.0.fc1.stl_node_scale.default",
                           "base_model.model.encoder.1.fc1.stl_node_scale.default",
                           "base_model.model.encoder.2.fc1.stl_node_scale.default"}
    # no weight decay: AdamW would shrink every row, drawn or not
    args = arguments(tmp_path, max_steps=3, weight_decay=0.0)
    STTrainer(model, args, splits.train, data_collator=splits.collator,
              node_sampler=NodeSampler(splits.num_nodes, 10, seed=5)).train()
    replay = NodeSampler(splits.num_nodes, 10, seed=5)
    drawn = np.unique(np.concatenate([replay() for _ in range(3)]))
    untouched = np.setdiff1d(np.arange(splits.num_nodes), drawn)
    assert 10 < len(drawn) <= 30
    for name, after in per_node_rows(model).items():
        assert torch.equal(after[untouched], before[name][untouched]), name
        assert (after[drawn] != before[name][drawn]).any(dim=1).all(), name


# ---- the node-batched epoch ------------------------------------------------------------------------


@pytest.mark.parametrize(("nodes_per_batch", "passes"), [(40, 4), (52, 3), (156, 1)])
def test_a_node_batched_epoch_visits_every_window_once_per_pass(splits, tmp_path, nodes_per_batch, passes):
    """ceil(N / K) passes, each a permutation of the windows, so an epoch sees every (window, node) pair about once."""
    windows = splits.train.select(range(200))
    sampler = NodeSampler(splits.num_nodes, nodes_per_batch, seed=0)
    assert sampler.passes_per_epoch == passes
    trainer = STTrainer(stid(splits), arguments(tmp_path), windows, data_collator=splits.collator, node_sampler=sampler)
    order = np.asarray(list(trainer._get_train_sampler()))
    assert len(order) == passes * 200
    for visit in order.reshape(passes, 200):
        assert sorted(visit) == list(range(200))
    trainer.train()
    assert trainer.state.global_step == -(-passes * 200 // 32)
    assert trainer.state.epoch == 1


def test_whole_graph_training_keeps_one_pass_per_epoch(splits, tmp_path):
    trainer = STTrainer(stid(splits), arguments(tmp_path), splits.train.select(range(200)),
                        data_collator=splits.collator)
    assert len(list(trainer._get_train_sampler())) == 200
    assert len(trainer.get_train_dataloader()) == 7


# ---- resuming the draws -----------------------------------------------------------------------------


def test_resumed_node_batched_training_equals_the_uninterrupted_run(splits, tmp_path):
    """A checkpoint in the middle of an epoch (Accelerate's loader has already drawn the next batch's nodes)."""

    def trainer(folder):
        args = arguments(folder, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=None)
        return STTrainer(stid(splits), args, splits.train, data_collator=splits.collator,
                         node_sampler=NodeSampler(splits.num_nodes, 40, "bfs", splits.adjacency, seed=3))

    straight = trainer(tmp_path / "straight")
    straight.train()
    assert (tmp_path / "straight" / "checkpoint-2" / SAMPLER_STATE).is_file()
    resumed = trainer(tmp_path / "straight")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_a_checkpoint_without_draws_does_not_resume_node_batched_training(splits, tmp_path):
    STTrainer(stid(splits), arguments(tmp_path, max_steps=1, save_strategy="steps", save_steps=1), splits.train,
              data_collator=splits.collator).train()
    batched = STTrainer(stid(splits), arguments(tmp_path, max_steps=2), splits.train, data_collator=splits.collator,
                        node_sampler=NodeSampler(splits.num_nodes, 40, seed=0))
    with pytest.raises(ValueError, match=f"has no {SAMPLER_STATE}: it was not saved by node-batched training"):
        batched.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


# ---- evaluation over every node -----------------------------------------------------------------------


@pytest.mark.parametrize("adapter", [False, True], ids=["stid", "stid + st_lora"])
def test_chunked_evaluation_equals_whole_graph_evaluation(splits, tmp_path, adapter):
    model = stid(splits)
    if adapter:
        model = st_lora(model, splits)
    assert forecasts_nodes_independently(model)
    args = arguments(tmp_path, per_device_eval_batch_size=128)
    whole = STTrainer(model, args, data_collator=splits.collator).evaluate_test(splits.test)
    chunked_trainer = STTrainer(model, args, data_collator=splits.collator, eval_node_chunk=40)
    chunked = chunked_trainer.evaluate_test(splits.test)
    predictions = chunked_trainer.predict(splits.test.select(range(50))).predictions
    assert predictions.shape == (50, 12, 156, 1)
    assert chunked.keys() == whole.keys()
    for key, value in whole.items():
        assert chunked[key] == pytest.approx(value, rel=1e-6), key


def test_only_models_that_forecast_nodes_on_their_own_are_evaluated_in_chunks(splits):
    torch.manual_seed(0)
    gwnet = GWNet(**splits.model_kwargs(), adjacency=splits.adjacency, **TINY_GWNET)
    assert not forecasts_nodes_independently(gwnet)
    assert not forecasts_nodes_independently(get_peft_model(gwnet, STLoraConfig(**splits.size_kwargs())))
    factost = FactoSTModel(FactoSTConfig(patch_length=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_context_length=24, max_horizon=12))
    assert forecasts_nodes_independently(factost)
    sizes = {**splits.size_kwargs(), "steps_per_day": splits.steps_per_day}
    assert not forecasts_nodes_independently(get_peft_model(factost, FactoSTAdapterConfig(**sizes)))
    factost = FactoSTModel(factost.config)
    assert forecasts_nodes_independently(get_peft_model(factost, FactoSTAdapterConfig(**sizes, use_interaction=False)))


def test_a_graph_model_is_evaluated_on_the_whole_graph(splits, tmp_path):
    torch.manual_seed(0)
    model = GWNet(**splits.model_kwargs(), adjacency=splits.adjacency, **TINY_GWNET)
    test = splits.test.select(range(40))
    args = arguments(tmp_path, per_device_eval_batch_size=40)
    whole = STTrainer(model, args, data_collator=splits.collator).evaluate_test(test)
    asked = STTrainer(model, args, data_collator=splits.collator, eval_node_chunk=40).evaluate_test(test)
    assert asked == whole


# ---- another graph --------------------------------------------------------------------------------


def test_a_node_batched_model_on_data_of_another_node_count_is_refused(splits, tmp_path):
    model = stid(splits)
    smaller = build_splits(load("sz-taxi").select_nodes(np.arange(100)), input_len=12, horizon=12)
    with pytest.raises(ValueError, match="STID was built for 156 nodes but the node sampler's graph has 100 nodes"):
        STTrainer(model, arguments(tmp_path), smaller.train, data_collator=smaller.collator,
                  node_sampler=NodeSampler(100, 30))
    trainer = STTrainer(model, arguments(tmp_path), data_collator=smaller.collator, eval_node_chunk=30)
    with pytest.raises(ValueError, match="STID was built for 156 nodes but the evaluated data has 100 nodes"):
        trainer.evaluate_test(smaller.test)


# ---- the command line -------------------------------------------------------------------------------


def write_data(path: Path, nodes: int) -> Path:
    """The first ``nodes`` roads of sz-taxi as a PEMS-style ``.npz``, their graph beside it (``<name>.npy``)."""
    data = load("sz-taxi")
    np.savez(path, data=data.values[:1200, :nodes])
    np.save(path.with_suffix(".npy"), data.adjacency[:nodes, :nodes])
    return path


def test_cli_trains_node_batches_evaluates_every_node_and_refuses_a_changed_graph(tmp_path, capsys):
    data, run = write_data(tmp_path / "speeds.npz", 60), tmp_path / "run"
    flags = ["--dataset", str(data), "--steps-per-day", "96", "--max-steps", "4", "--batch-size", "16"]
    assert cli.main(["train", *flags, "--node-batch-size", "20", "--output-dir", str(run)]) == 0
    assert json.loads((run / "run.json").read_text())["options"]["node_batch_size"] == 20
    checkpoint = next((run / "checkpoints").glob("checkpoint-*"))
    assert (checkpoint / SAMPLER_STATE).is_file()
    assert cli.main(["evaluate", str(run), "--output", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["mae"] == pytest.approx(
        json.loads((run / "metrics.json").read_text())["mae"], rel=1e-6)

    write_data(data, 50)
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), "--allow-changed-data"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"the model in {run} was trained on data of 60 nodes, but its data now has 50 nodes")
    assert len(err.splitlines()) == 2  # the changed-data warning, then the refusal


@pytest.mark.parametrize(("flags", "message"), [
    (["--node-batch-size", "0"], "--node-batch-size (node_batch_size in YAML): must be at least 1, got 0"),
    (["--node-batch-size", "-2"], "--node-batch-size (node_batch_size in YAML): must be at least 1, got -2"),
    (["--node-sampler", "bfs"], "--node-sampler bfs draws the nodes of --node-batch-size: give that too"),
    (["--node-sampler", "random"], "argument --node-sampler: invalid choice: 'random'"),
])
def test_cli_refuses_bad_node_batches_in_one_line(tmp_path, capsys, flags, message):
    assert cli.main(["train", "--dataset", "sz-taxi", "--output-dir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_caps_a_node_batch_larger_than_the_graph_with_a_note(tmp_path, capsys):
    data = write_data(tmp_path / "speeds.npz", 12)
    assert cli.main(["train", "--dataset", str(data), "--steps-per-day", "96", "--max-steps", "1",
                     "--node-batch-size", "500", "--output-dir", str(tmp_path / "run")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "--node-batch-size" in line]
    assert notes == [f"st-peft: warning: --node-batch-size 500 is more than the 12 nodes of {data}: every batch "
                     "carries all 12"]


# ---- two processes ------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_node_batched_training_under_accelerate_launch_with_two_processes(tmp_path):
    data, run = write_data(tmp_path / "speeds.npz", 60), tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "--mixed_precision", "no",
        "--main_process_port", str(free_port()), str(RANKS_SCRIPT), str(tmp_path),
        "train", "--dataset", str(data), "--adjacency", str(data.with_suffix(".npy")), "--steps-per-day", "96",
        "--epochs", "1", "--batch-size", "64",
        "--node-batch-size", "20", "--node-sampler", "bfs", "--model-args", "{embed_dim: 16}", "--output-dir", str(run),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "finished", result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [report["world_size"] for report in reports] == [2, 2]
    assert reports[0]["initial_hash"] == reports[1]["initial_hash"] != reports[0]["final_hash"]
    assert reports[0]["final_hash"] == reports[1]["final_hash"]
    # each process drew its own nodes, and kept its draws in the checkpoint
    checkpoint = next((run / "checkpoints").glob("checkpoint-*"))
    states = [json.loads((checkpoint / f"node_sampler_{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] != states[1]
    # the run's model loads and forecasts every node, on the inputs the run's data options make
    _, splits, _ = cli.load_run(RunFolder(run))
    model = STID.from_pretrained(str(run))
    batch = splits.collator.gather(np.asarray(splits.test["start"])[:2])
    assert model(**batch).prediction_outputs.shape == (2, 12, 60, 1)
