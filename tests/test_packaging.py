"""Installing st-peft changes nothing outside it: no start-up hook, peft untouched until ``import st_peft``;
and the one change st-peft makes to peft (extending ``PeftType``) is still needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, register_peft_method

from st_peft.tuners.registration import ST_PEFT_TYPES, extend_peft_type
from st_peft.tuners.st_lora import STLoraConfig
from st_peft.tuners.st_lora.seamed import SeamedForecaster

REPO = Path(__file__).resolve().parents[1]
# what a fresh `pip install` builds from: the package and its declarative build files
BUILD_INPUTS = ("pyproject.toml", "setup.cfg", "README.md", "st_peft", "st_peft_cli")

PEFT_ALONE = """
import sys
import peft.mapping
from peft import PeftModel
from peft.utils import PeftType

mappings = [peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING, peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING,
            peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING]
print("plain dicts:", all(type(mapping) is dict for mapping in mappings))
print("st-peft types:", sorted({"STLORA", "FACTOST"} & set(PeftType.__members__)))
try:
    PeftModel.from_pretrained(__import__("torch").nn.Linear(2, 2), sys.argv[1])
except KeyError as error:
    print("KeyError:", error.args)
print("st_peft imported:", any(name.split(".")[0] == "st_peft" for name in sys.modules))
"""


def test_installed_package_leaves_peft_untouched_until_imported(tmp_path):
    """Install st-peft from this working tree into a fresh environment, as `make install` does for CI,
    then start an interpreter that imports peft but not st_peft: peft is exactly as it ships; and the
    installed `st-peft` script answers `train --help` without importing st_peft.

    The environment sees this interpreter's packages (peft, torch, ...) through a path entry, so
    no ``.pth`` of theirs runs; only what installing st-peft itself adds can act at start-up.
    """
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site_packages = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip())
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = {path.name for path in site_packages.iterdir()}
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", str(source)],
        check=True, capture_output=True, timeout=300,
    )
    added = {path.name for path in site_packages.iterdir()} - before - {"__pycache__"}
    assert added == {"st_peft", "st_peft_cli", "st_peft-0.1.0.dist-info"}, added

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "STLORA"}')
    clean_env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([python, "-c", PEFT_ALONE, str(adapter)], cwd=tmp_path, env=clean_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "plain dicts: True",
        "st-peft types: []",
        "KeyError: ('STLORA',)",
        "st_peft imported: False",
    ]

    # the installed console script answers --help from its front, without importing st_peft (or torch)
    script = env_dir / "bin" / "st-peft"
    result = subprocess.run([python, "-X", "importtime", str(script), "train", "--help"], cwd=tmp_path, env=clean_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "(default: stid)" in " ".join(result.stdout.split()), result.stderr
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "st_peft_cli" in imported and not imported & {"st_peft", "torch", "transformers", "peft"}


def test_peft_still_refuses_a_method_outside_its_enum():
    """peft 0.21 has no plugin API: ``register_peft_method`` refuses a name not in ``PeftType``.

    If this fails, peft accepts new methods on its own: register through that API and drop
    ``extend_peft_type`` (``st_peft/tuners/registration.py``).
    """
    with pytest.raises(ValueError, match="Unknown PEFT type NOT_A_METHOD"):
        register_peft_method(name="not_a_method", config_cls=object, model_cls=object)
    assert "NOT_A_METHOD" not in PeftType.__members__


def test_extension_adds_only_st_peft_types_once():
    for name in ST_PEFT_TYPES:
        assert extend_peft_type(name) is PeftType[name] is PeftType(name)
        assert PeftType[name] == name
    assert list(PeftType).count(PeftType.STLORA) == 1
    with pytest.raises(ValueError, match="st-peft adds only the PEFT types"):
        extend_peft_type("SOMETHING_ELSE")


def test_st_peft_configs_build_without_arguments_as_peft_builds_every_config():
    """peft's own test_from_peft_type builds every registered type's config with no arguments: with
    st-peft imported that includes STLORA and FACTOST, whose sizes are checked at injection instead."""
    import st_peft  # noqa: F401  (registers STLORA and FACTOST)

    for name in ST_PEFT_TYPES:
        config = PeftConfig.from_peft_type(peft_type=PeftType[name])
        assert type(config) is PEFT_TYPE_TO_CONFIG_MAPPING[name] and config.num_nodes is None
    with pytest.raises(ValueError, match="STLoraConfig needs num_nodes"):
        get_peft_model(SeamedForecaster(torch.nn.Linear(2, 2)), STLoraConfig())
