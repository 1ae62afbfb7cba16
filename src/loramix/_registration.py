"""The one module that touches PEFT internals: registering loramix's methods.

PEFT keeps its methods in a closed ``PeftType`` enum, and ``register_peft_method`` refuses any
name that is not already a member. Plain string keys would satisfy PEFT itself, but transformers'
``model.load_adapter`` calls ``peft_config.peft_type.value.lower()`` and needs a real member.
So we add real members to the enum (the same thing ``aenum.extend_enum`` does for stdlib enums),
then call PEFT's public ``register_peft_method``.

It also makes PEFT's adapter-weight writer crash-safe for loramix adapters (see
``install_atomic_weight_writer``).

Every function here is idempotent: importing (or reloading) loramix twice registers once.
"""

from __future__ import annotations

import os
import shutil

import peft.peft_model
from peft.utils.peft_types import PeftType, register_peft_method
from safetensors.torch import save as safetensors_bytes

from ._config_base import PREVIOUS_WEIGHTS_NAME, atomic_write_bytes

# Parameter prefixes of loramix methods: a state dict holding such keys is a loramix adapter.
LORAMIX_PREFIXES = (".mor_", ".milora_")


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
    install_atomic_weight_writer()
    return peft_type


def _atomic_safe_save_file(tensors, filename, metadata=None):
    """PEFT's ``safe_save_file``, made crash-safe for loramix adapters.

    The new weights go to a temporary file renamed over the old one, and the old weights are kept as
    ``PREVIOUS_WEIGHTS_NAME`` until the matching ``adapter_config.json`` is in place (the config's
    ``save_pretrained`` then removes it). A process killed at any point leaves either the old or the
    new adapter: ``LoramixConfig.from_pretrained`` rolls back to the old pair when it finds new weights
    next to an old config. Other PEFT methods' saves are passed through unchanged.
    """
    if not any(marker in key for key in tensors for marker in LORAMIX_PREFIXES):
        return _original_safe_save_file(tensors, filename, metadata=metadata)
    previous = os.path.join(os.path.dirname(os.path.abspath(filename)), PREVIOUS_WEIGHTS_NAME)
    if os.path.isfile(filename):
        tmp = previous + ".tmp"
        shutil.copy2(filename, tmp)
        os.replace(tmp, previous)
    atomic_write_bytes(filename, safetensors_bytes(tensors, metadata=metadata))


_original_safe_save_file = getattr(
    peft.peft_model.safe_save_file, "__wrapped_original__", peft.peft_model.safe_save_file
)
_atomic_safe_save_file.__wrapped_original__ = _original_safe_save_file


def install_atomic_weight_writer() -> None:
    """Route ``PeftModel.save_pretrained``'s safetensors writes through :func:`_atomic_safe_save_file`."""
    peft.peft_model.safe_save_file = _atomic_safe_save_file
