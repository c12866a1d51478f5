"""The one place where st-peft's methods join PEFT's registry.

PEFT keeps its method names in the closed ``PeftType`` enum and
``peft.utils.register_peft_method`` accepts only names already in it (checked for peft 0.21, the
oldest release st-peft supports; ``tests/test_packaging.py`` pins that refusal, so a release that
adds a plugin API fails that test at once). So the enum is extended here, and only here, when
``import st_peft`` runs: nothing happens in an interpreter that never imports st-peft. Both steps
are idempotent: importing ``st_peft`` twice, or reloading a tuner module, registers nothing twice.
"""

from __future__ import annotations

import enum

import peft
from peft.utils import PeftType, register_peft_method

ST_PEFT_TYPES = ("STLORA", "FACTOST")
"""The ``PeftType`` names st-peft adds."""

_ENUM_TABLES = ("_member_map_", "_value2member_map_", "_member_names_")


def _check_peft_type_layout() -> None:
    """Refuse to extend a ``PeftType`` that is no longer the plain ``str`` enum of peft 0.21.

    Raises:
        RuntimeError: names the installed peft version, so the extension is revisited for it.
    """
    if not (issubclass(PeftType, str) and issubclass(PeftType, enum.Enum)
            and all(hasattr(PeftType, table) for table in _ENUM_TABLES)):
        raise RuntimeError(
            f"peft {peft.__version__}'s PeftType is not the str enum st-peft extends (as in peft 0.21); "
            "st-peft's registration (st_peft/tuners/registration.py) must be updated for this peft release"
        )


def extend_peft_type(name: str) -> PeftType:
    """Add ``name`` (upper case) to ``peft.utils.PeftType`` and return the member.

    Args:
        name: the method's name, one of :data:`ST_PEFT_TYPES`.

    Returns:
        The ``PeftType`` member, which compares equal to the plain string ``name``.
    """
    if name not in ST_PEFT_TYPES:
        raise ValueError(f"st-peft adds only the PEFT types {ST_PEFT_TYPES}, not {name!r}")
    if name in PeftType.__members__:
        return PeftType[name]
    _check_peft_type_layout()
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register_st_peft_method(name: str, config_cls: type, model_cls: type, prefix: str) -> PeftType:
    """Register an st-peft tuner with PEFT so ``get_peft_model`` and ``PeftModel.from_pretrained`` know it.

    Args:
        name: lower-case method name (``"stlora"``); the ``PeftType`` member is its upper case.
        config_cls: the method's ``PeftConfig`` subclass.
        model_cls: the method's ``BaseTuner`` subclass.
        prefix: the parameter-name prefix that marks the method's trainable parameters.

    Returns:
        The ``PeftType`` member of the method.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = extend_peft_type(name.upper())
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type
