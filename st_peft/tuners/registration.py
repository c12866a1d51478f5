"""The one place where st-peft's methods join PEFT's registry.

PEFT keeps its method names in the closed ``PeftType`` enum and
``peft.utils.register_peft_method`` accepts only names already in it, so the enum is
extended here first. Both steps are idempotent: importing ``st_peft`` twice, or
reloading a tuner module, registers nothing twice.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method


def extend_peft_type(name: str) -> PeftType:
    """Add ``name`` (upper case) to ``peft.utils.PeftType`` and return the member.

    Args:
        name: the method's name, e.g. ``"STLORA"``.

    Returns:
        The ``PeftType`` member, which compares equal to the plain string ``name``.
    """
    if name in PeftType.__members__:
        return PeftType[name]
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
