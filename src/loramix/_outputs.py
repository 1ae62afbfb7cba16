"""Model outputs that carry ``aux_loss`` as a real field.

transformers' outputs are dataclasses registered as pytree nodes; DistributedDataParallel (and
``torch.compile``) flatten them and rebuild them with ``type(outputs)(**fields)``. A key added with
``outputs["aux_loss"] = ...`` to a class without that field (``CausalLMOutputWithPast``) makes the
rebuild fail (``__init__() got an unexpected keyword argument 'aux_loss'``). :func:`with_aux_loss`
returns the outputs as a subclass of their own class with an ``aux_loss`` field (so ``isinstance``
checks still pass), or sets the field where the class already has one (MoE outputs, TRL's fused head).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.utils import ModelOutput

_WITH_AUX: dict[type, type] = {}


def _class_with_aux_loss(cls: type) -> type:
    new = _WITH_AUX.get(cls)
    if new is None:
        new = dataclasses.make_dataclass(
            cls.__name__,
            [("aux_loss", torch.Tensor | None, dataclasses.field(default=None))],
            bases=(cls,),
            namespace={"__doc__": f"{cls.__doc__ or cls.__name__}\n\n    aux_loss: the router balance loss."},
        )
        new.__module__ = __name__
        new.__qualname__ = f"WithAuxLoss[{cls.__qualname__}]"
        _WITH_AUX[cls] = new
    return new


def with_aux_loss(outputs: Any, aux_loss: torch.Tensor) -> Any:
    """``outputs`` with ``outputs.aux_loss = aux_loss``; see the module docstring."""
    if isinstance(outputs, ModelOutput) and dataclasses.is_dataclass(outputs):
        if "aux_loss" not in {f.name for f in dataclasses.fields(outputs)}:
            values = {f.name: getattr(outputs, f.name) for f in dataclasses.fields(outputs)}
            outputs = _class_with_aux_loss(type(outputs))(**values)
        outputs["aux_loss"] = aux_loss
        return outputs
    if isinstance(outputs, dict):
        outputs["aux_loss"] = aux_loss
    return outputs
