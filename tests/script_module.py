"""Import a script that is not part of the package (a benchmark, a test's training script) as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path) -> ModuleType:
    """The script at ``path`` imported as the module named by its stem.

    It is entered in ``sys.modules`` before it runs, because dataclasses defined in it look their
    module up while being built.
    """
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
