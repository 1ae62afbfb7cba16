"""The transformers fence: every use of transformers' internals and every patch of it, in one module.

What it touches (verified with transformers 4.56.1 — the oldest supported — and 5.24.0), and why no public
API serves:

1. **Strict adapter loading** (:func:`install_strict_transformers_loading`): wraps
   ``transformers.integrations.peft.PeftAdapterMixin.load_adapter``. transformers loads an adapter with its own
   ``_load_pretrained_model`` and only logs missing tensors; it calls no PEFT tuner hook where loramix could
   refuse. The wrapper checks a local loramix adapter directory as ``PeftModel.from_pretrained`` does before
   the load (config keys, format version, weights hash), raises on missing or unexpected tensors after it, and
   puts the model back as it was (:class:`loramix._tuner.undo.ModelState`) when the load fails. Installed by
   ``import loramix`` (:func:`loramix._compat.peft.register`), idempotent.
2. **Output fields** (:func:`with_output_fields`): transformers' outputs are dataclasses registered as pytree
   nodes; DistributedDataParallel and ``torch.compile`` flatten them and rebuild them with
   ``type(outputs)(**fields)``. A key added with ``outputs["aux_loss"] = ...`` to a class without that field
   (``CausalLMOutputWithPast``) makes the rebuild fail (``__init__() got an unexpected keyword argument
   'aux_loss'``). The outputs are returned as a subclass of their own class (``isinstance`` still holds) made at
   run time, with the missing fields.
3. **Trainer predictions** (:func:`ignore_router_outputs_at_inference`): ``transformers.Trainer`` turns every
   output but ``loss`` into ``predictions`` except the keys of ``model.config.keys_to_ignore_at_inference``; the
   router outputs are added to that attribute of the model's config while an adapter is injected (and removed
   by ``unload``), so ``compute_metrics`` gets the logits array as with any PEFT adapter; a plain forward still
   returns them, and ``trainer.predict(ds, ignore_keys=[])`` hands them over too.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import weakref
from typing import Any

from peft.utils import CONFIG_NAME, WEIGHTS_NAME
from transformers.utils import ModelOutput

from loramix._tuner.saving import resolve_weights
from loramix._tuner.undo import ModelState
from loramix.method import holds_loramix, method_of, weight_markers

_SUBCLASSES: dict[tuple[type, tuple[str, ...]], type] = {}

# What loramix adds to a model's outputs: the balance loss, MiLoRA's per-block router logits, and the
# language-model loss without the balance term (set when the balance term is added to ``loss``).
ROUTER_OUTPUT_KEYS = ("aux_loss", "router_logits", "lm_loss")
_IGNORE = "keys_to_ignore_at_inference"
# Trainer.prediction_step's own default when the config has none (transformers/trainer.py).
_TRAINER_DEFAULT = ("cache",)
_MISSING = object()
# id(model config) -> (weak reference to it, its own keys_to_ignore_at_inference before loramix or _MISSING,
# the keys loramix added); configs are unhashable dataclasses, and the entry goes when the config does.
_ADDED: dict[int, tuple[weakref.ref, Any, list[str]]] = {}


def _record(config: Any) -> tuple[weakref.ref, Any, list[str]] | None:
    entry = _ADDED.get(id(config))
    return entry if entry is not None and entry[0]() is config else None


def ignore_router_outputs_at_inference(config: Any) -> None:
    """Add :data:`ROUTER_OUTPUT_KEYS` to ``config.keys_to_ignore_at_inference`` (idempotent)."""
    if config is None or not hasattr(config, "__dict__"):
        return
    current = getattr(config, _IGNORE, None)
    keys = list(current) if current is not None else list(_TRAINER_DEFAULT)
    missing = [key for key in ROUTER_OUTPUT_KEYS if key not in keys]
    if not missing:
        return
    entry = _record(config)
    if entry is None:
        entry = (weakref.ref(config), config.__dict__.get(_IGNORE, _MISSING), [])
        weakref.finalize(config, _ADDED.pop, id(config), None)
    _ADDED[id(config)] = (*entry[:2], entry[2] + [key for key in missing if key not in entry[2]])
    setattr(config, _IGNORE, keys + missing)


def restore_keys_to_ignore_at_inference(config: Any) -> None:
    """Undo :func:`ignore_router_outputs_at_inference` (``unload``): the config's own list, or none."""
    if config is None or _record(config) is None:
        return
    _, own, added = _ADDED.pop(id(config))
    current = config.__dict__.get(_IGNORE, _MISSING)
    if current is _MISSING:
        return
    config.__dict__.pop(_IGNORE)
    kept = [key for key in current if key not in added]
    default = getattr(config, _IGNORE, None)  # the class's list, if any, now that the instance's is gone
    if own is not _MISSING or kept != list(default if default is not None else _TRAINER_DEFAULT):
        setattr(config, _IGNORE, kept)


def _subclass_with_fields(cls: type, names: tuple[str, ...]) -> type:
    key = (cls, names)
    new = _SUBCLASSES.get(key)
    if new is None:
        new = dataclasses.make_dataclass(
            cls.__name__,
            [(name, Any, dataclasses.field(default=None)) for name in names],
            bases=(cls,),
            namespace={"__doc__": f"{cls.__doc__ or cls.__name__}\n\n    Also: {', '.join(names)} (loramix)."},
        )
        new.__module__ = __name__
        new.__qualname__ = f"{cls.__qualname__}With{''.join(n.title().replace('_', '') for n in names)}"
        _SUBCLASSES[key] = new
    return new


def with_output_fields(outputs: Any, **values: Any) -> Any:
    """``outputs`` with ``values`` set as dataclass fields (see the module docstring).

    A transformers ``ModelOutput`` missing some of the fields is rebuilt as a cached subclass of its
    class with those fields; a plain ``dict`` gets the keys; anything else (a tuple from
    ``return_dict=False``) is returned unchanged.
    """
    if isinstance(outputs, ModelOutput) and dataclasses.is_dataclass(outputs):
        fields = [f.name for f in dataclasses.fields(outputs)]
        missing = tuple(name for name in values if name not in fields)
        if missing:
            current = {name: getattr(outputs, name) for name in fields}
            outputs = _subclass_with_fields(type(outputs), missing)(**current)
        for name, value in values.items():
            outputs[name] = value
        return outputs
    if isinstance(outputs, dict):
        outputs.update(values)
    return outputs


def _check_local_loramix_adapter(arguments: dict) -> str | None:
    """What ``PeftModel.from_pretrained`` checks before loading (``LoramixConfig.from_pretrained``), for
    transformers' ``load_adapter`` of a local loramix adapter directory. Returns the weights file that will be
    loaded; None for anything else, which is left to transformers."""
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
    method = method_of(str(peft_type))
    if method is None:
        return None
    config = method.config_cls.from_pretrained(os.fspath(model_id), subfolder=subfolder)
    return resolve_weights(directory, config.weights_sha256)


def _strict_load_adapter(original):
    """Wrap transformers' ``PeftAdapterMixin.load_adapter`` for loramix adapters: a local adapter is checked
    like ``PeftModel.from_pretrained`` checks it, and missing or unexpected tensors are an error (the
    model is restored as it was) instead of a printed load report; any other failure restores it too."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
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
            if holds_loramix(self):  # e.g. a shape mismatch: no injected, unloaded adapter stays behind
                state.restore()
            raise
        added = [name for name in getattr(self, "peft_config", {}) or {} if name not in before]
        if info is None or not added or method_of(self.peft_config[added[0]]) is None:
            return info
        missing = sorted(getattr(info, "missing_keys", ()) or ())
        unexpected = sorted(
            k for k in getattr(info, "unexpected_keys", ()) or () if any(m in f".{k}" for m in weight_markers())
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
    """Make transformers' own ``model.load_adapter(path)`` check and refuse bad loramix adapters (point 1)."""
    from transformers.integrations.peft import PeftAdapterMixin

    current = PeftAdapterMixin.load_adapter
    original = getattr(current, "__loramix_original__", current)
    PeftAdapterMixin.load_adapter = _strict_load_adapter(original)
