"""Two CPU processes launched by ``accelerate launch`` really train one model with DDP."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_module import load_script

import st_peft.data as std
from st_peft.metrics import masked_mae

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_training(tmp_path):
    # `--cpu --num_processes 2` silently runs one process; `--multi_gpu` with use_cpu=True runs two
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(SCRIPT), str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["trainer_world_size"] for r in reports] == [2, 2]
    assert reports[0]["final_hash"] == reports[1]["final_hash"]
    assert reports[0]["initial_hash"] == reports[1]["initial_hash"] != reports[0]["final_hash"]
    assert reports[0]["metrics"] == reports[1]["metrics"]
    # each rank trained on half of the memory-replay batches
    assert [r["global_step"] for r in reports] == [math.ceil(reports[0]["sampler_batches"] / 2)] * 2

    # the gathered test MAE covers every test window exactly once (no padding duplicates)
    script = load_script(SCRIPT)
    splits = std.build_splits(std.load("sz-taxi").select_nodes(list(range(16))), input_len=12, horizon=12)
    model = script.NodeLinear(12, 12)
    model.load_state_dict(load_file(tmp_path / "final.safetensors"))
    batch = splits.collator(list(splits.test.select(range(script.TEST_ROWS))))
    with torch.no_grad():
        forecast = model(**batch)
    expected = float(masked_mae(forecast, batch["future_values"], batch["future_observed_mask"]))
    assert reports[0]["metrics"]["mae"] == pytest.approx(expected, rel=1e-5)
