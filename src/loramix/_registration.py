"""The one module that touches PEFT internals: registering loramix's methods.

PEFT keeps its methods in a closed ``PeftType`` enum, and ``register_peft_method`` refuses any
name that is not already a member. Plain string keys would satisfy PEFT itself, but transformers'
``model.load_adapter`` calls ``peft_config.peft_type.value.lower()`` and needs a real member.
So we add real members to the enum (the same thing ``aenum.extend_enum`` does for stdlib enums),
then call PEFT's public ``register_peft_method``.

It also makes PEFT's adapter-weight writer crash-safe for loramix adapters (see
``install_atomic_weight_writer``), and transformers' ``model.load_adapter`` strict for them (see
``install_strict_transformers_loading``).

Every function here is idempotent: importing (or reloading) loramix twice registers once.
"""

from __future__ import annotations

import functools
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
    install_strict_transformers_loading()
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


def _strict_load_adapter(original):
    """Wrap transformers' ``PeftAdapterMixin.load_adapter``: for a loramix adapter, missing or unexpected
    tensors are an error (and the half-loaded adapter is removed) instead of a printed load report."""

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        from ._config_base import LoramixConfig

        before = set(getattr(self, "peft_config", {}) or {})

        def added() -> list[str]:
            return [name for name in getattr(self, "peft_config", {}) or {} if name not in before]

        try:
            info = original(self, *args, **kwargs)
        except Exception:
            new = [n for n in added() if isinstance(self.peft_config[n], LoramixConfig)]
            if new:  # e.g. a shape mismatch: do not leave the injected, unloaded adapter behind
                self.delete_adapter(new)
            raise
        added = added()
        if info is None or not added or not isinstance(self.peft_config[added[0]], LoramixConfig):
            return info
        missing = sorted(getattr(info, "missing_keys", ()) or ())
        unexpected = sorted(
            k for k in getattr(info, "unexpected_keys", ()) or () if any(m in f".{k}" for m in LORAMIX_PREFIXES)
        )
        if missing or unexpected:
            self.delete_adapter(added)
            raise ValueError(
                f"The adapter checkpoint does not fit this model; adapter {added[0]!r} was not loaded. "
                f"Missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                f"unexpected tensors: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. It was probably saved "
                "for another base model, another config, or another method."
            )
        return info

    load_adapter.__loramix_original__ = original
    return load_adapter


def install_strict_transformers_loading() -> None:
    """Make transformers' own ``model.load_adapter(path)`` refuse incomplete loramix adapters."""
    from transformers.integrations.peft import PeftAdapterMixin

    current = PeftAdapterMixin.load_adapter
    original = getattr(current, "__loramix_original__", current)
    PeftAdapterMixin.load_adapter = _strict_load_adapter(original)
