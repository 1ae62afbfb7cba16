"""The one module that touches PEFT and transformers internals; ``loramix/__init__.py`` runs it at import.

Nothing else in loramix changes PEFT's or transformers' state: a config only looks its ``PeftType``
member up, and constructing, saving or loading adapters changes no registry. What ``import loramix`` does,
once per process (every function here is idempotent: importing or reloading loramix twice registers once):

1. **Registration.** PEFT keeps its methods in a closed ``PeftType`` enum, and ``register_peft_method``
   refuses any name that is not already a member. Plain string keys would satisfy PEFT itself, but
   transformers' ``model.load_adapter`` calls ``peft_config.peft_type.value.lower()`` and needs a real
   member. So :func:`register` adds real members to the enum (what ``aenum.extend_enum`` does for stdlib
   enums), then calls PEFT's public ``register_peft_method``.

2. **Crash-safe weight writing** (:func:`install_atomic_weight_writer`). PEFT's tuner hooks cannot replace this
   patch (nor those of 4.). ``PeftModel.save_pretrained`` (peft 0.21.2, ``peft/peft_model.py``) gets the
   adapter's tensors from ``get_peft_model_state_dict``, whose only method-specific step is the tuner hook
   ``BaseTuner._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)``
   (``peft/tuners/tuners_utils.py`` l. 1510, called from ``peft/utils/save_and_load.py`` l. 239): it
   returns a dict and is given neither the directory nor the file name, and it also runs outside of saves.
   PEFT then writes the file itself with the module-level name ``safe_save_file``
   (``peft/peft_model.py`` l. 37 ``from safetensors.torch import save_file as safe_save_file``, called at
   l. 356-360 ``safe_save_file(output_state_dict, os.path.join(output_dir, SAFETENSORS_WEIGHTS_NAME), ...)``),
   replacing the previous weights: safetensors < 0.8 truncates the file in place, 0.8 renames a temporary
   file over it (safetensors PR #764; the open PR #793 would write in place again where rename fails). Either way
   the old bytes are gone unless something keeps them before that call, and no tuner or config code runs
   between the hook and the write. Keeping the previous weights until the new config is in place (the
   journal of ``loramix/_saving.py``) therefore needs our code at that call. The patch rebinds only that name in
   ``peft.peft_model`` (not ``safetensors``), and hands every call that is not a loramix adapter's
   ``adapter_model.safetensors`` (other PEFT methods, PEFT's disk-offload files at l. 1385) to the original
   unchanged. ``save_pretrained(safe_serialization=False)`` writes with ``torch.save`` (l. 373), which is not
   patched: see ``loramix/_saving.py`` for what that means for an interrupted ``.bin`` save.

3. **Strict loading in transformers** (:func:`install_strict_transformers_loading`). ``PeftModel`` loading
   is made strict by the tuner hook ``_remap_adapter_state_dict_for_load`` (``loramix/_tuner.py``), which
   PEFT's ``set_peft_model_state_dict`` calls (``peft/utils/save_and_load.py`` l. 625). transformers'
   ``PeftAdapterMixin.load_adapter`` (``transformers/integrations/peft.py``) calls no tuner hook: it injects
   the layers, loads the file with its own ``_load_pretrained_model`` and only logs missing tensors. The
   wrapper checks the adapter directory like ``PeftModel.from_pretrained`` does before the load (config
   keys, format version, weights hash) and raises on missing or unexpected tensors after it.

4. **A failed load leaves nothing behind** (:func:`install_undoing_peft_loading`, and the wrapper of 3).
   PEFT creates the adapter's layers before it reads the weights: ``PeftModel.from_pretrained``
   (``peft/peft_model.py`` l. 418) wraps the base model in place (``cls(model, config, adapter_name)``) and
   then calls ``load_adapter``, which (l. 1417) adds the adapter, reads the file (``load_peft_weights``) and
   loads it (``set_peft_model_state_dict``, where the tuner hook refuses a checkpoint that does not fit).
   A refusal there, or an unreadable file, would leave the base model wrapped, or a model in use with a
   half-created adapter. Only the entry point knows whether the adapter is new (``load_adapter`` also
   reloads the weights of an existing adapter, and ``from_pretrained`` creates the adapter before calling
   it), so the entry points themselves are wrapped: each captures the model's state
   (:class:`loramix._undo.ModelState`) and restores it if the call raises and the model holds loramix
   layers. ``AutoPeftModel*.from_pretrained`` goes through ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import functools
import inspect
import json
import os

import peft.peft_model
import torch
from peft.tuners.tuners_utils import (  # PEFT private helpers the tuners use, imported here only
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
    _maybe_include_all_linear_layers,
)
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.peft_types import PeftType, register_peft_method

from ._saving import write_adapter_safetensors
from ._undo import ModelState

# ".<prefix>" of every registered loramix method: a state dict with such keys is a loramix adapter.
_WEIGHT_MARKERS: set[str] = set()
# The tuner layer classes of the registered methods: a model holding one holds a loramix adapter.
_LAYER_CLASSES: set[type] = set()


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

    if config_cls.PEFT_TYPE_NAME != name.upper():
        raise ValueError(
            f"{config_cls.__name__}.PEFT_TYPE_NAME is {config_cls.PEFT_TYPE_NAME!r}, not {name.upper()!r}."
        )
    peft_type = extend_peft_type(name.upper())
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is None:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    else:
        # Already registered (e.g. importlib.reload(loramix)): point PEFT at the current classes.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
    _WEIGHT_MARKERS.add("." + model_cls.prefix)
    _LAYER_CLASSES.add(model_cls.tuner_layer_cls)
    install_atomic_weight_writer()
    install_strict_transformers_loading()
    install_undoing_peft_loading()
    return peft_type


def _holds_loramix(model) -> bool:
    classes = tuple(_LAYER_CLASSES)
    return isinstance(model, torch.nn.Module) and any(isinstance(m, classes) for m in model.modules())


def _is_loramix_state_dict(tensors) -> bool:
    return any(marker in key for key in tensors for marker in _WEIGHT_MARKERS)


def _safe_save_file(tensors, filename, metadata=None):
    """``peft.peft_model.safe_save_file``: a loramix adapter's weights go through the crash-safe writer."""
    if os.path.basename(filename) == SAFETENSORS_WEIGHTS_NAME and _is_loramix_state_dict(tensors):
        return write_adapter_safetensors(tensors, filename, metadata=metadata)
    return _original_safe_save_file(tensors, filename, metadata=metadata)


_original_safe_save_file = getattr(
    peft.peft_model.safe_save_file, "__wrapped_original__", peft.peft_model.safe_save_file
)
_safe_save_file.__wrapped_original__ = _original_safe_save_file


def install_atomic_weight_writer() -> None:
    """Route ``PeftModel.save_pretrained``'s safetensors writes through :func:`_safe_save_file`."""
    peft.peft_model.safe_save_file = _safe_save_file


def _check_local_loramix_adapter(arguments: dict) -> str | None:
    """What ``PeftModel.from_pretrained`` checks before loading (``LoramixConfig.from_pretrained``), for
    transformers' ``load_adapter`` of a local loramix adapter directory. Returns the weights file that will be
    loaded; None for anything else, which is left to transformers."""
    from ._config_base import LoramixConfig
    from ._saving import resolve_weights

    model_id = arguments.get("peft_model_id")
    if model_id is None or arguments.get("peft_config") is not None or arguments.get("adapter_state_dict") is not None:
        return None
    subfolder = (arguments.get("adapter_kwargs") or {}).get("subfolder")
    directory = os.path.join(os.fspath(model_id), subfolder or "")
    try:
        with open(os.path.join(directory, CONFIG_NAME)) as handle:
            peft_type = json.load(handle).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None  # not a local adapter, or a config that transformers reports itself
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType.__members__.get(str(peft_type)))
    if not (isinstance(config_cls, type) and issubclass(config_cls, LoramixConfig)):
        return None
    config = config_cls.from_pretrained(os.fspath(model_id), subfolder=subfolder)
    return resolve_weights(directory, config.weights_sha256)


def _strict_load_adapter(original):
    """Wrap transformers' ``PeftAdapterMixin.load_adapter`` for loramix adapters: a local adapter is checked
    like ``PeftModel.from_pretrained`` checks it, and missing or unexpected tensors are an error (the
    model is restored as it was) instead of a printed load report; any other failure restores it too."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        from ._config_base import LoramixConfig

        try:
            arguments = signature.bind_partial(self, *args, **kwargs).arguments
        except TypeError:
            arguments = {}  # let transformers raise its own error for a bad call
        weights = _check_local_loramix_adapter(arguments)
        load_config = arguments.get("load_config")
        if (
            weights is not None
            and os.path.basename(weights) == WEIGHTS_NAME
            and "use_safetensors" not in kwargs
            and getattr(load_config, "use_safetensors", None) is None
            and _accepts(original, "use_safetensors")  # transformers >= 5; 4.x falls back to the .bin itself
        ):
            # transformers 5.24 looks for a local adapter_model.safetensors by explicit name and fails on a
            # directory holding only adapter_model.bin instead of falling back to it (transformers/integrations/
            # peft.py, the adapter_filenames loop, and modeling_utils._get_resolved_checkpoint_files).
            kwargs["use_safetensors"] = False
        before = set(getattr(self, "peft_config", {}) or {})
        state = ModelState(self)
        try:
            info = original(self, *args, **kwargs)
        except BaseException:
            if _holds_loramix(self):  # e.g. a shape mismatch: no injected, unloaded adapter stays behind
                state.restore()
            raise
        added = [name for name in getattr(self, "peft_config", {}) or {} if name not in before]
        if info is None or not added or not isinstance(self.peft_config[added[0]], LoramixConfig):
            return info
        missing = sorted(getattr(info, "missing_keys", ()) or ())
        unexpected = sorted(
            k for k in getattr(info, "unexpected_keys", ()) or () if any(m in f".{k}" for m in _WEIGHT_MARKERS)
        )
        if missing or unexpected:
            state.restore()
            raise ValueError(
                f"The adapter checkpoint does not fit this model; adapter {added[0]!r} was not loaded. "
                f"Missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                f"unexpected tensors: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. It was probably saved "
                "for another base model, another config, or another method."
            )
        return info

    load_adapter.__loramix_original__ = original
    return load_adapter


def _accepts(function, name: str) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def install_strict_transformers_loading() -> None:
    """Make transformers' own ``model.load_adapter(path)`` check and refuse bad loramix adapters."""
    from transformers.integrations.peft import PeftAdapterMixin

    current = PeftAdapterMixin.load_adapter
    original = getattr(current, "__loramix_original__", current)
    PeftAdapterMixin.load_adapter = _strict_load_adapter(original)


def _undoing_from_pretrained(original):
    """``PeftModel.from_pretrained`` (a classmethod's function) that restores ``model`` if the load fails."""

    @functools.wraps(original)
    def from_pretrained(cls, model, *args, **kwargs):
        state = ModelState(model) if isinstance(model, torch.nn.Module) else None
        try:
            return original(cls, model, *args, **kwargs)
        except BaseException:
            if state is not None and _holds_loramix(model):
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
            if _holds_loramix(self):
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


__all__ = [
    "_filter_state_dict_by_key_prefixes",
    "_get_tuner_state_dict_key_prefixes",
    "_maybe_include_all_linear_layers",
    "register",
]


def auxiliary_row_adapters(module, names) -> list[str]:
    """The ``adapter_names`` to give one of PEFT's ``modules_to_save`` / trainable-token wrappers
    (``AuxiliaryTrainingWrapper``, ``peft/utils/other.py``) in a mixed-adapter batch.

    Its ``_mixed_batch_forward`` raises ``KeyError`` for an adapter it does not hold, while a forward with
    that adapter set alone passes through to the original module (``forward`` checks the private
    ``_adapters`` set). Naming those rows ``"__base__"`` gives them what they get alone.
    """
    held = getattr(module, "_adapters", None)
    if held is None:  # a PEFT version without the set: leave the names to PEFT
        return list(names)
    return [name if name in held else "__base__" for name in names]
