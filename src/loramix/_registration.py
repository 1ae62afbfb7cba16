"""The one module that touches PEFT internals: registering loramix's methods.

PEFT keeps its methods in a closed ``PeftType`` enum, and ``register_peft_method`` refuses any
name that is not already a member. Plain string keys would satisfy PEFT itself, but transformers'
``model.load_adapter`` calls ``peft_config.peft_type.value.lower()`` and needs a real member.
So we add real members to the enum (the same thing ``aenum.extend_enum`` does for stdlib enums),
then call PEFT's public ``register_peft_method``.

Every function here is idempotent: importing (or reloading) loramix twice registers once.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType, register_peft_method


def extend_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it to the enum as a real member if it is missing.

    The new member behaves like the built-in ones: ``PeftType(name)``, ``PeftType[name]``,
    ``PeftType.<name>``, ``.value``, ``.name``, equality with the plain string, hashing,
    iteration and ``in list(PeftType)``.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # type.__setattr__ bypasses EnumType.__setattr__, which forbids touching members.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


def register(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register a loramix method with PEFT under ``name`` (lower case, e.g. ``"mor"``).

    Afterwards ``get_peft_model``, ``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained``,
    ``AutoPeftModel*`` and transformers' ``load_adapter`` all know the method.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = extend_peft_type(name.upper())
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is None:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    else:
        # Already registered (e.g. importlib.reload(loramix)): point PEFT at the current classes.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
    return peft_type
