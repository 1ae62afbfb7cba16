"""The PEFT fence: every use of PEFT's internals and every patch of PEFT, in one module.

Verified with peft 0.21.0 (the oldest supported) and 0.21.2; line numbers below are 0.21.2's. PEFT has a public
way to add a method (``register_peft_method``) and public tuner hooks, used wherever they serve; what follows is
what they do not cover. ``import loramix`` runs :func:`register` once per method (idempotent: importing or
reloading loramix twice registers once); nothing else in loramix changes PEFT's state.

1. **Registration** (:func:`register`, :func:`extend_peft_type`). PEFT keeps its methods in a closed
   ``PeftType`` enum, and ``register_peft_method`` refuses any name that is not already a member. Plain string
   keys would satisfy PEFT itself, but transformers' ``model.load_adapter`` calls
   ``peft_config.peft_type.value.lower()`` and needs a real member. So real members are added to the enum (what
   ``aenum.extend_enum`` does for stdlib enums: ``_member_map_``, ``_member_names_``, ``_value2member_map_``),
   then PEFT's public ``register_peft_method`` is called; on a reload, PEFT's three mappings are pointed at the
   current classes.

2. **Crash-safe weight writing** (:func:`install_atomic_weight_writer`): rebinds ``peft.peft_model.safe_save_file``.
   ``PeftModel.save_pretrained`` gets the adapter's tensors from ``get_peft_model_state_dict``, whose only
   method-specific step is the tuner hook ``BaseTuner._get_adapter_state_dict`` (``peft/tuners/tuners_utils.py``
   l. 1510): it returns a dict and is given neither the directory nor the file name, and it also runs outside of
   saves. PEFT then writes the file itself with the module-level name ``safe_save_file`` (``peft/peft_model.py``
   l. 37, called at l. 356-360), replacing the previous weights: safetensors < 0.8 truncates the file in place,
   0.8 renames a temporary file over it (safetensors PR #764; the open PR #793 would write in place again where
   rename fails). Either way the old bytes are gone unless something keeps them before that call, and no tuner or
   config code runs between the hook and the write. Keeping the previous weights until the new config is in
   place (the journal of :mod:`loramix._tuner.saving`) therefore needs our code at that call. Only that name in
   ``peft.peft_model`` is rebound (not ``safetensors``), and every call that is not a loramix adapter's
   ``adapter_model.safetensors`` (other PEFT methods, PEFT's disk-offload files at l. 1385) goes to the original
   unchanged. ``save_pretrained(safe_serialization=False)`` writes with ``torch.save`` (l. 373), not patched: see
   :mod:`loramix._tuner.saving` for what that means for an interrupted ``.bin`` save.

3. **A failed load leaves nothing behind** (:func:`install_undoing_peft_loading`): wraps
   ``PeftModel.from_pretrained`` and ``PeftModel.load_adapter``. PEFT creates the adapter's layers before it reads
   the weights: ``PeftModel.from_pretrained`` (l. 418) wraps the base model in place and then calls
   ``load_adapter``, which (l. 1417) adds the adapter, reads the file and loads it (``set_peft_model_state_dict``,
   where the tuner hook ``_remap_adapter_state_dict_for_load`` refuses a checkpoint that does not fit). A refusal
   there, or an unreadable file, would leave the base model wrapped, or a model in use with a half-created
   adapter. Only the entry point knows whether the adapter is new, so the entry points themselves are wrapped:
   each captures the model's state (:class:`loramix._tuner.undo.ModelState`) and restores it if the call raises
   and the model holds loramix layers. ``AutoPeftModel*.from_pretrained`` goes through
   ``PeftModel.from_pretrained``. (transformers' ``load_adapter`` is wrapped by :mod:`loramix._compat.transformers`.)

4. **Mixed-adapter batches through PEFT's trainable-module wrappers** (:func:`auxiliary_modules_per_row`):
   forward pre-hooks on ``peft.utils.AuxiliaryTrainingWrapper`` modules (``modules_to_save``, trainable tokens)
   give them the batch's row adapters as ``adapter_names``; their private ``_adapters`` set is read to send rows of
   adapters they do not hold to ``"__base__"`` (their ``_mixed_batch_forward`` raises ``KeyError`` for those,
   while a forward with that adapter alone passes through to the original module).

5. **Private helpers used by the tuners**, each behind a function of this module: ``_maybe_include_all_linear_layers``
   (:func:`resolve_all_linear`), ``_get_tuner_state_dict_key_prefixes`` and ``_filter_state_dict_by_key_prefixes``
   (:func:`adapter_tensors`), all in ``peft/tuners/tuners_utils.py``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import peft.peft_model
import torch
from peft.tuners.tuners_utils import (  # private helpers: point 5
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
    _maybe_include_all_linear_layers,
)
from peft.utils import SAFETENSORS_WEIGHTS_NAME, AuxiliaryTrainingWrapper
from peft.utils.peft_types import PeftType, register_peft_method
from torch import nn

from loramix._compat.transformers import install_strict_transformers_loading
from loramix._tuner.saving import write_adapter_safetensors
from loramix._tuner.undo import ModelState
from loramix.method import Method, holds_loramix, is_loramix_state_dict, register_method


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


def register(method: Method) -> PeftType:
    """Register a loramix method with PEFT (and in :mod:`loramix.method`, for the shared code).

    Afterwards ``get_peft_model``, ``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained``,
    ``AutoPeftModel*`` and transformers' ``load_adapter`` all know the method.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    register_method(method)  # checks that the config's PEFT_TYPE_NAME matches
    config_cls, model_cls = method.config_cls, method.model_cls
    peft_type = extend_peft_type(method.peft_type)
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is None:
        register_peft_method(name=method.name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    else:
        # Already registered (e.g. importlib.reload(loramix)): point PEFT at the current classes.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
    install_atomic_weight_writer()
    install_strict_transformers_loading()
    install_undoing_peft_loading()
    return peft_type


def _safe_save_file(tensors, filename, metadata=None):
    """``peft.peft_model.safe_save_file``: a loramix adapter's weights go through the crash-safe writer."""
    if os.path.basename(filename) == SAFETENSORS_WEIGHTS_NAME and is_loramix_state_dict(tensors):
        return write_adapter_safetensors(tensors, filename, metadata=metadata)
    return _original_safe_save_file(tensors, filename, metadata=metadata)


_original_safe_save_file = getattr(
    peft.peft_model.safe_save_file, "__wrapped_original__", peft.peft_model.safe_save_file
)
_safe_save_file.__wrapped_original__ = _original_safe_save_file


def install_atomic_weight_writer() -> None:
    """Route ``PeftModel.save_pretrained``'s safetensors writes through :func:`_safe_save_file`."""
    peft.peft_model.safe_save_file = _safe_save_file


def _undoing_from_pretrained(original):
    """``PeftModel.from_pretrained`` (a classmethod's function) that restores ``model`` if the load fails."""

    @functools.wraps(original)
    def from_pretrained(cls, model, *args, **kwargs):
        state = ModelState(model) if isinstance(model, torch.nn.Module) else None
        try:
            return original(cls, model, *args, **kwargs)
        except BaseException:
            if state is not None and holds_loramix(model):
                state.restore()
            raise

    from_pretrained.__loramix_original__ = original
    return from_pretrained


def _undoing_load_adapter(original):
    """``PeftModel.load_adapter`` that restores the model (its other adapters included) if the load fails."""

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        state = ModelState(self)
        try:
            return original(self, *args, **kwargs)
        except BaseException:
            if holds_loramix(self):
                state.restore()
            raise

    load_adapter.__loramix_original__ = original
    return load_adapter


def install_undoing_peft_loading() -> None:
    """Make ``PeftModel.from_pretrained`` and ``PeftModel.load_adapter`` leave nothing behind when a loramix
    adapter fails to load (point 4 of the module docstring)."""
    from peft import PeftModel

    function = PeftModel.__dict__["from_pretrained"].__func__
    original = getattr(function, "__loramix_original__", function)
    PeftModel.from_pretrained = classmethod(_undoing_from_pretrained(original))
    current = PeftModel.load_adapter
    PeftModel.load_adapter = _undoing_load_adapter(getattr(current, "__loramix_original__", current))


def _row_adapters(module: nn.Module, names: Sequence[str]) -> list[str]:
    """The ``adapter_names`` for one of PEFT's ``AuxiliaryTrainingWrapper`` modules in a mixed batch (point 4)."""
    held = getattr(module, "_adapters", None)
    if held is None:  # a PEFT version without the set: leave the names to PEFT
        return list(names)
    return [name if name in held else "__base__" for name in names]


@contextmanager
def auxiliary_modules_per_row(
    model: nn.Module, row_names: Callable[[nn.Module], Sequence[str] | None]
) -> Iterator[None]:
    """Within this context, PEFT's ``modules_to_save`` / trainable-token wrappers of ``model`` compute each row with
    its own adapter (point 4). ``row_names(module)`` gives the current forward's adapter per row (``None``: leave the
    call as it is); it may raise where the rows cannot be known."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
        names = row_names(module)
        if names is not None:
            kwargs["adapter_names"] = _row_adapters(module, names)
        return args, kwargs

    handles = [
        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, AuxiliaryTrainingWrapper)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def resolve_all_linear(config, model: nn.Module) -> None:
    """Turn ``target_modules="all-linear"`` into module names now (PEFT does it later, during injection)."""
    _maybe_include_all_linear_layers(config, model)


def adapter_tensors(model: nn.Module, adapter_name: str, state_dict: dict) -> dict:
    """The entries of ``state_dict`` that belong to ``adapter_name``'s tuner layers in ``model`` (PEFT's own rule)."""
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    return _filter_state_dict_by_key_prefixes(state_dict, prefixes)


__all__ = [
    "adapter_tensors",
    "auxiliary_modules_per_row",
    "extend_peft_type",
    "install_atomic_weight_writer",
    "install_undoing_peft_loading",
    "register",
    "resolve_all_linear",
]
