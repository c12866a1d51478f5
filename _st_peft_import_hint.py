"""Start-up hook: when PEFT meets an st-peft adapter type before ``import st_peft``, its error says so.

``import st_peft`` registers the PEFT types ``STLORA`` and ``FACTOST``. Without that import PEFT
looks a saved adapter's type up in ``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING`` and fails with a
bare ``KeyError: 'STLORA'``. PEFT has no hook for unknown types, so ``_st_peft_import_hint.pth``
(installed into site-packages with st-peft) calls ``install()`` at interpreter start-up. That adds
an import hook and nothing else: no module is imported. When ``peft.mapping`` is first imported,
the hook gives the module a ``PeftTypeMapping`` with the same entries, whose missing-key error for
an st-peft type says to ``import st_peft``; every other lookup behaves as before.

Only the standard library is used, because this runs in every interpreter of the environment.
"""

from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType

ST_PEFT_TYPES = frozenset({"STLORA", "FACTOST"})
PEFT_MAPPING_MODULE = "peft.mapping"
MAPPING_NAME = "PEFT_TYPE_TO_CONFIG_MAPPING"


class PeftTypeMapping(dict):
    """PEFT's type-to-config mapping; looking up an unregistered st-peft type says to import st_peft."""

    def __missing__(self, key: object) -> object:
        name = getattr(key, "value", key)
        if name in ST_PEFT_TYPES:
            raise KeyError(
                f"PEFT type {name!r} is an st-peft method and is not registered: run `import st_peft` "
                "before loading this adapter (the import registers STLORA and FACTOST with PEFT)."
            )
        raise KeyError(key)


class _HintingLoader(importlib.abc.Loader):
    """Runs PEFT's own loader for ``peft.mapping``, then swaps the mapping for a ``PeftTypeMapping``."""

    def __init__(self, loader: importlib.abc.Loader, finder: _PeftMappingFinder) -> None:
        self.loader = loader
        self.finder = finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.finder.uninstall()
        self.loader.exec_module(module)
        mapping = getattr(module, MAPPING_NAME, None)
        if type(mapping) is dict:
            setattr(module, MAPPING_NAME, PeftTypeMapping(mapping))

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class _PeftMappingFinder(importlib.abc.MetaPathFinder):
    """Finds ``peft.mapping`` with the other finders and wraps its loader; ignores every other module."""

    def find_spec(self, fullname: str, path, target=None):
        if fullname != PEFT_MAPPING_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HintingLoader(spec.loader, self)
                return spec
        return None

    def uninstall(self) -> None:
        """Remove this finder from ``sys.meta_path``; it is needed once."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Add the import hook, unless ``peft.mapping`` is already imported or the hook is already there."""
    if PEFT_MAPPING_MODULE in sys.modules or any(isinstance(f, _PeftMappingFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PeftMappingFinder())
