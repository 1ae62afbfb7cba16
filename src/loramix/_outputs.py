"""Model outputs that carry loramix's extra values (``aux_loss``, ``router_logits``) as real fields.

transformers' outputs are dataclasses registered as pytree nodes; DistributedDataParallel (and
``torch.compile``) flatten them and rebuild them with ``type(outputs)(**fields)``. A key added with
``outputs["aux_loss"] = ...`` to a class without that field (``CausalLMOutputWithPast``) makes the
rebuild fail (``__init__() got an unexpected keyword argument 'aux_loss'``).
:func:`with_output_fields` returns the outputs as a subclass of their own class that has the missing
fields (so ``isinstance`` checks still pass), with the values set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.utils import ModelOutput

_SUBCLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


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
