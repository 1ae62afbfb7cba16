"""Model outputs that carry loramix's extra values (``aux_loss``, ``router_logits``) as real fields.

transformers' outputs are dataclasses registered as pytree nodes; DistributedDataParallel (and
``torch.compile``) flatten them and rebuild them with ``type(outputs)(**fields)``. A key added with
``outputs["aux_loss"] = ...`` to a class without that field (``CausalLMOutputWithPast``) makes the
rebuild fail (``__init__() got an unexpected keyword argument 'aux_loss'``).
:func:`with_output_fields` returns the outputs as a subclass of their own class that has the missing
fields (so ``isinstance`` checks still pass), with the values set.

``transformers.Trainer`` turns every output but ``loss`` into ``predictions`` (a tuple when there are
several), except the keys listed in ``model.config.keys_to_ignore_at_inference``.
:func:`ignore_router_outputs_at_inference` adds loramix's outputs to that list while an adapter is
injected, so ``compute_metrics`` gets the logits array, as with any PEFT adapter; a plain forward still
returns them, and ``trainer.predict(ds, ignore_keys=[])`` hands them over too.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from transformers.utils import ModelOutput

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


def with_aux_loss(outputs: Any, aux_loss: torch.Tensor) -> Any:
    """``outputs`` with ``outputs.aux_loss = aux_loss`` as a real field: :func:`with_output_fields`."""
    return with_output_fields(outputs, aux_loss=aux_loss)
