"""How missing inputs reach the model (issue 21, item 3): the mean, carried forward, or the observed mask as
one more input channel, the command line's default because it scored best (``benchmarks/missing_inputs.py``).

The library's treatments are checked on sz-taxi, whose missing speeds are a quarter of the file, and on
chickenpox, which misses nothing; the command line on the first three weeks of eight NYC bike stations as a
user's ``.npz``, where a 0 counts as missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from st_peft import cli
from st_peft.data import build_splits, load
from st_peft.data.builtin import BUILTIN_ROOT
from st_peft.data.missing_inputs import MISSING_INPUTS
from st_peft_cli.options import MISSING_INPUTS as FRONT_MISSING_INPUTS

torch.set_num_threads(1)

TINY = ["--model-args", "{embed_dim: 8, node_dim: 4, tod_dim: 2, dow_dim: 2, num_layers: 1}"]
FAST = ["--input-len", "6", "--horizon", "3", "--max-steps", "2", "--batch-size", "64", "--steps-per-day", "24",
        *TINY]


@pytest.fixture(scope="module")
def taxi():
    return load("sz-taxi")


@pytest.fixture(scope="module")
def bike(tmp_path_factory) -> Path:
    """``bike.npz``: 504 hours of eight stations' inflow and outflow; about two thirds are 0 (missing in an .npz)."""
    path = tmp_path_factory.mktemp("bike") / "bike.npz"
    with np.load(BUILTIN_ROOT / "nyc-bike" / "NYCBike1.npz") as archive:
        np.savez(path, data=archive["data"][: 21 * 24, :8, :2])
    return path


def test_the_fronts_names_are_the_librarys():
    assert FRONT_MISSING_INPUTS == MISSING_INPUTS


def test_the_mask_channel_is_the_observed_mask_scaled_on_the_training_span(taxi):
    plain = build_splits(taxi, input_len=12, horizon=12)
    flagged = build_splits(taxi, input_len=12, horizon=12, missing_inputs="mask-channel")
    assert (plain.in_channels, flagged.in_channels, flagged.mask_channels) == (1, 2, [0])
    starts = np.asarray(plain.test["start"][:64])
    before, after = plain.collator.gather(starts), flagged.collator.gather(starts)
    assert torch.equal(after["past_values"][..., :1], before["past_values"])
    assert torch.equal(after["past_values"][..., 1], before["past_observed_mask"][..., 0].float())
    assert after["past_observed_mask"][..., 1].all() and not before["past_observed_mask"].all()
    for key in ("future_values", "future_observed_mask"):  # what is scored does not change
        assert torch.equal(after[key], before[key])
    scaling, plain_scaling = flagged.model_kwargs()["scaling"], plain.model_kwargs()["scaling"]
    assert [row[0] for row in scaling["past_loc"]] == [row[0] for row in plain_scaling["past_loc"]]
    train_span = slice(0, int(plain.train["start"][-1]) + 24)
    assert scaling["past_loc"][0][1] == pytest.approx(taxi.mask[train_span].mean(), abs=1e-6)
    assert scaling["future_loc"] == plain_scaling["future_loc"]


def test_carry_forward_repeats_the_last_observed_value(taxi):
    carried = build_splits(taxi, input_len=12, horizon=12, missing_inputs="carry-forward")
    values, observed = carried.collator.inputs[..., 0], carried.collator.input_mask[..., 0]
    step, node = next((t, n) for t, n in zip(*np.nonzero(~taxi.mask[..., 0]), strict=True) if t > 0
                      and taxi.mask[t - 1, n, 0])
    assert observed[step, node] and values[step, node] == taxi.values[step - 1, node, 0] != 0
    assert carried.in_channels == 1 and np.array_equal(carried.collator.targets, taxi.values)


def test_a_history_without_missing_inputs_gets_no_mask_channel():
    chickenpox = load("chickenpox")
    plain = build_splits(chickenpox, input_len=8, horizon=4)
    flagged = build_splits(chickenpox, input_len=8, horizon=4, missing_inputs="mask-channel")
    assert flagged.mask_channels == [] and flagged.model_kwargs() == plain.model_kwargs()
    assert np.array_equal(flagged.collator.inputs, plain.collator.inputs)


def train(out: Path, bike: Path, *args: str) -> int:
    return cli.main(["train", "--dataset", str(bike), *FAST, *args, "--output-dir", str(out)])


def test_the_default_reads_the_mask_says_so_records_it_and_evaluate_reproduces_it(bike, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, bike) == 0
    printed = capsys.readouterr().out
    assert ("missing inputs (--missing-inputs): mask-channel: the observed mask of c0, c1 is read as 2 more input "
            "channels; missing values enter as the training mean") in printed
    assert json.loads((out / "run.json").read_text())["options"]["missing_inputs"] == "mask-channel"
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["missing_inputs"] == "mask-channel" and summary["mask_channels"] == ["c0", "c1"]
    assert load_file(out / "model.safetensors")["scaler.past_loc"].shape == (8, 4)
    assert cli.main(["evaluate", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "metrics-test.json").read_text())["mae"] == metrics["mae"]
    # the model card says which inputs the pushed model expects
    assert cli.main(["push", str(out), "--repo-id", "org/bike", "--save-dir", str(tmp_path / "card")]) == 0
    card = " ".join((tmp_path / "card" / "README.md").read_text().split())
    assert "Its 4 input channels are, in order: c0; c1; the observed mask of c0; the observed mask of c1." in card


@pytest.mark.parametrize(("how", "channels", "line"), [
    ("mean", 2, "mean: a missing input enters as its channel's training mean"),
    ("carry-forward", 2, "carry-forward: a missing input repeats its node's last observed value"),
])
def test_another_treatment_is_a_flag_or_a_yaml_key(how, channels, line, bike, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"missing_inputs: {how}\n")
    out = tmp_path / "run"
    assert train(out, bike, "--config", str(config)) == 0
    assert line in capsys.readouterr().out
    assert load_file(out / "model.safetensors")["scaler.past_loc"].shape == (8, channels)
    assert json.loads((out / "run.json").read_text())["options"]["missing_inputs"] == how
    assert cli.main(["evaluate", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "metrics-test.json").read_text())["mae"] == metrics["mae"]


def test_a_run_recorded_before_the_option_existed_reads_missing_inputs_as_the_mean(bike, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, bike, "--missing-inputs", "mean") == 0
    run = json.loads((out / "run.json").read_text())
    del run["options"]["missing_inputs"]
    (out / "run.json").write_text(json.dumps(run))
    assert cli.main(["evaluate", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "metrics-test.json").read_text())["mae"] == metrics["mae"]


def test_a_run_begun_before_the_option_existed_resumes_with_the_mean(bike, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, bike, "--missing-inputs", "mean") == 0
    run = json.loads((out / "run.json").read_text())
    del run["options"]["missing_inputs"]
    run["status"] = "failed"
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert train(out, bike, "--resume") == 2
    assert "began before --missing-inputs existed and reads missing inputs as the mean: resume it with " \
        "--missing-inputs mean" in one_line_error(capsys)
    assert train(out, bike, "--resume", "--missing-inputs", "mean") == 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def one_line_error(capsys) -> str:
    printed = capsys.readouterr().err.strip()
    lines = [line for line in printed.splitlines() if not line.startswith("st-peft: warning: ")]
    assert len(lines) == 1 and "Traceback" not in printed, printed
    return lines[0]


def test_a_treatment_that_cannot_apply_is_one_line(bike, tmp_path, capsys):
    assert train(tmp_path / "a", bike, "--missing-inputs", "mask") == 2
    assert "invalid choice: 'mask'" in one_line_error(capsys) and not (tmp_path / "a").exists()
    assert train(tmp_path / "b", bike, "--adapter", "factost", "--missing-inputs", "mask-channel") == 2
    assert "--adapter factost's backbone reads the observed mask itself" in one_line_error(capsys)
    backbone = tmp_path / "backbone"
    assert train(backbone, bike, "--missing-inputs", "mean") == 0
    capsys.readouterr()
    assert train(tmp_path / "c", bike, "--adapter", "st_lora", "--backbone-from", str(backbone)) == 2
    assert "read missing inputs as mean and this run as mask-channel: pass --missing-inputs mean" in \
        one_line_error(capsys)
