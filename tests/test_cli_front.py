"""The ``st-peft`` console script answers ``--help`` and argument errors without importing torch (issue 21,
item 7), from a front whose static copies of the registries' names stay equal to the registries."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from st_peft import cli
from st_peft.backbones import BACKBONES
from st_peft.losses import LOSSES
from st_peft.models.factost import FACTOST_SIZES
from st_peft.models.factost.corpus import CorpusConfig
from st_peft.models.factost.pretraining import PretrainingOptions
from st_peft_cli import options as schema

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "numpy", "st_peft")


def imported_modules(arguments: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m st_peft_cli ARGUMENTS`` in a fresh process: its result and the top-level
    packages it imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "st_peft_cli", *arguments], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert lines, result.stderr
    return result, {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines}


@pytest.mark.parametrize("arguments", [["--help"], ["train", "--help"], ["pretrain", "--help"], ["--version"]])
def test_help_is_answered_without_importing_torch(arguments):
    result, modules = imported_modules(arguments)
    assert result.returncode == 0 and "st-peft" in result.stdout
    assert "st_peft_cli" in modules and not modules & set(HEAVY), sorted(modules & set(HEAVY))


@pytest.mark.parametrize(("arguments", "message"), [
    (["train", "--epohcs", "3"], "unrecognized arguments: --epohcs 3; did you mean '--epochs'?"),
    (["train", "--model", "stdi"], "did you mean 'stid'?"),
    (["train", "--epochs", "inf"], "--epochs (epochs in YAML): expected a finite number, got inf"),
    (["pretrain", "--size", "smal"], "did you mean 'small'?"),
])
def test_an_argument_error_is_one_line_without_importing_torch(arguments, message):
    result, modules = imported_modules(arguments)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], errors
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_the_fronts_choices_are_the_registries():
    assert list(schema.MODEL_NAMES) == sorted([*BACKBONES, *cli.MODELS])
    assert list(schema.ADAPTER_NAMES) == sorted(cli.ADAPTERS)
    assert list(schema.LOSS_NAMES) == sorted(LOSSES)
    assert list(schema.FACTOST_SIZE_NAMES) == sorted(FACTOST_SIZES)
    assert cli.registry_choices() == {"model": list(schema.MODEL_NAMES), "adapter": list(schema.ADAPTER_NAMES),
                                      "loss": list(schema.LOSS_NAMES)}


def test_every_command_the_front_parses_has_a_runner():
    assert list(schema.COMMANDS) == list(cli.RUNNERS)


def test_pretrain_defaults_are_the_loops():
    defaults = {item.name: item.default for item in dataclasses.fields(schema.PretrainOptions)}
    corpus = {item.name: item.default for item in dataclasses.fields(CorpusConfig)}
    loop = {item.name: item.default for item in dataclasses.fields(PretrainingOptions)}
    for name in ("tokens_per_batch", "max_batch_size", "long_context_probability", "synthetic_weight",
                 "real_weight", "mixup_weight"):
        assert defaults[name] == corpus[name], name
    for name in ("max_steps", "learning_rate", "warmup_steps", "seed"):
        assert defaults[name] == loop[name], name


@pytest.mark.parametrize(("argv", "message"), [
    (["pretrain", "--max-steps", "0"], "--max-steps (max_steps in YAML): must be at least 1, got 0"),
    (["pretrain", "--long-context-probability", "1.5"], "must be at most 1, got 1.5"),
    (["pretrain", "--learning-rate", "nan"], "--learning-rate (learning_rate in YAML): expected a finite number"),
    (["pretrain", "--output", ""], "--output (output in YAML): expected a non-empty path, got ''"),
    (["pretrain", "--size", "smal"], "invalid choice: 'smal'"),
    (["pretrain", "YAML", "max_minutes: -5"], "--max-minutes (max_minutes in YAML): must be above 0, got -5"),
    (["pretrain", "YAML", "cpu: 'no'"], "--cpu (cpu in YAML): expected true or false, got 'no'"),
    (["pretrain", "YAML", "sizes: small"], "unknown options ['sizes']; did you mean 'size'?"),
])
def test_pretrain_options_are_checked_by_the_schema(argv, message, tmp_path, capsys):
    if argv[1] == "YAML":
        config = tmp_path / "pretrain.yaml"
        config.write_text(f"{argv[2]}\n")
        argv = [argv[0], "--config", str(config)]
    assert cli.main([*argv, *([] if "--output" in argv else ["--output", str(tmp_path / "run")])]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
    assert not (tmp_path / "run").exists()


def test_pretrain_help_shows_the_defaults(capsys):
    assert cli.main(["pretrain", "--help"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "(default: 2000)" in printed and "(default: ['nyc-taxi', 'etth1', 'chickenpox'])" in printed
