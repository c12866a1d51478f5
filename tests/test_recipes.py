"""Recipes: every Accelerate config loads with Accelerate's own loader, every experiment recipe
is read by ``st-peft``, and the two-process CPU config really trains a recipe on both ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command, launch_command_parser
from accelerate.utils import DistributedType
from hub_server import free_port

import st_peft.data as std
from st_peft import cli
from st_peft.data.builtin import BUILTIN_DATASETS
from st_peft.outputs import TARGET_NAMES, prediction_of

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
ACCELERATE = RECIPES / "accelerate"
CPU_2PROC = ACCELERATE / "cpu_2proc.yaml"
RANKS_SCRIPT = Path(__file__).parent / "scripts" / "cli_ranks.py"
DDP_RECIPE = RECIPES / "stid" / "sz-taxi.yaml"

# name: (distributed type, processes, machines, on the CPU)
ACCELERATE_CONFIGS = {
    "cpu_2proc": (DistributedType.MULTI_GPU, 2, 1, True),
    "gpu_1": (DistributedType.NO, 1, 1, False),
    "multi_gpu": (DistributedType.MULTI_GPU, 4, 1, False),
    "multi_node": (DistributedType.MULTI_GPU, 16, 2, False),
    "fsdp": (DistributedType.FSDP, 4, 1, False),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, 4, 1, False),
}
EXPERIMENTS = sorted(path for path in RECIPES.glob("*/*.yaml") if path.parent != ACCELERATE)


def test_the_documented_accelerate_configs_are_there():
    assert sorted(path.stem for path in ACCELERATE.glob("*.yaml")) == sorted(ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_loads_with_accelerates_loader(name):
    config = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    distributed_type, processes, machines, on_cpu = ACCELERATE_CONFIGS[name]
    assert config.distributed_type == distributed_type
    assert (config.num_processes, config.num_machines, config.use_cpu) == (processes, machines, on_cpu)
    assert config.mixed_precision == "bf16"


def test_multi_node_config_has_the_fields_a_user_fills_in():
    text = (ACCELERATE / "multi_node.yaml").read_text()
    config = load_config_from_file(str(ACCELERATE / "multi_node.yaml"))
    assert (config.machine_rank, config.main_process_ip, config.main_process_port) == (0, "10.0.0.1", 29500)
    for field in ("machine_rank", "main_process_ip", "main_process_port"):
        assert any(line.startswith(field) and "FILL IN" in line for line in text.splitlines()), field


def test_sharded_configs_name_their_strategy():
    fsdp = load_config_from_file(str(ACCELERATE / "fsdp.yaml")).fsdp_config
    assert (fsdp["fsdp_version"], fsdp["fsdp_auto_wrap_policy"]) == (2, "SIZE_BASED_WRAP")
    zero = load_config_from_file(str(ACCELERATE / "deepspeed_zero2.yaml")).deepspeed_config
    # ZeRO-2 must clip like st_training_args (5.0): the DeepSpeed integration refuses a mismatch
    assert (zero["zero_stage"], zero["gradient_clipping"]) == (2, 5.0)


def test_unknown_accelerate_key_is_refused_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CPU_2PROC.read_text() + "learning_rate: 0.001\n")
    output = tmp_path / "run"
    args = launch_command_parser().parse_args(
        [
            "--config_file",
            str(bad),
            "-m",
            "st_peft.cli",
            "train",
            "--config",
            str(DDP_RECIPE),
            "--output-dir",
            str(output),
        ]
    )
    with pytest.raises(ValueError, match=r"bad.yaml had unknown keys \(\['learning_rate'\]\)"):
        launch_command(args)
    assert not output.exists()


@pytest.mark.parametrize("recipe", EXPERIMENTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_experiment_recipe_is_read_by_st_peft(recipe):
    command = "pretrain" if recipe.stem.startswith("pretrain") else "train"
    options = cli.parse_args([command, "--config", str(recipe)])
    if command == "train":
        assert options.dataset == recipe.stem, "a recipe is named after its data set"
        assert options.dataset in BUILTIN_DATASETS
        assert recipe.parent.name in {options.model, options.adapter}, "a recipe lives in its method's folder"
        # the recipe's model builds on its data and forecasts the right shape
        splits = std.build_splits(
            std.load(options.dataset), input_len=options.input_len, horizon=options.horizon
        )
        model = cli.build_model(options, splits).eval()
        batch = next(iter(splits.iter_batches("test", 2)))
        with torch.no_grad():
            output = prediction_of(model(**{key: value for key, value in batch.items() if key not in TARGET_NAMES}))
        assert output.shape == batch["future_values"].shape


def test_cpu_2proc_config_trains_a_recipe_on_both_ranks(tmp_path):
    """``accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml`` + ``st-peft train --config <recipe>``.

    One epoch on a tenth of the training windows: both ranks see world size 2, run bf16
    autocast, take half of the batches each and end with identical, trained weights.
    """
    few_shot, run_dir = 0.1, tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
        "--main_process_port", str(free_port()), str(RANKS_SCRIPT), str(tmp_path),
        "train", "--config", str(DDP_RECIPE), "--epochs", "1", "--few-shot", str(few_shot), "--output-dir", str(run_dir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [report["world_size"] for report in reports] == [2, 2]
    assert [report["trainer_world_size"] for report in reports] == [2, 2]
    assert [report["mixed_precision"] for report in reports] == ["bf16", "bf16"]
    assert reports[0]["initial_hash"] == reports[1]["initial_hash"] != reports[0]["final_hash"]
    assert reports[0]["final_hash"] == reports[1]["final_hash"]

    options = cli.parse_args(["train", "--config", str(DDP_RECIPE)])
    windows = len(
        std.build_splits(
            std.load(options.dataset), input_len=options.input_len, horizon=options.horizon, few_shot=few_shot
        ).train
    )
    assert [report["global_step"] for report in reports] == [
        math.ceil(math.ceil(windows / options.batch_size) / 2)
    ] * 2
    assert {"model.safetensors", "metrics.json", "run.json"} <= {path.name for path in run_dir.iterdir()}
