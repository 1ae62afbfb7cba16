"""Put a model back exactly as it was when adding or loading an adapter fails part-way.

PEFT creates an adapter's layers before it reads the adapter's weights, and transformers' ``load_adapter``
does the same; an error after that point (a checkpoint that does not fit, a missing tensor, an unreadable
file) leaves the model wrapped, with a half-created adapter. loramix takes a :class:`ModelState` before
each such operation (``LoramixTunerMixin.inject_adapter``, and the loading entry points wrapped in
``loramix/_compat/peft.py`` and ``loramix/_compat/transformers.py``) and restores it when the operation raises.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

_CONTAINERS = (dict, OrderedDict, list, set)


class ModelState:
    """What an adapter operation can change in ``roots`` (modules), captured now; :meth:`restore` puts it back.

    For every module below the roots, and the transformers ``config`` object a module holds: its attributes
    (``__dict__``), one level deep. Dicts, lists and sets among them (child modules, parameters, buffers,
    hooks, a tuner layer's per-adapter dicts and active adapters, ``peft_config``) are restored in place, so
    whoever holds them sees the old contents; attributes added since are removed. Also whether each
    parameter requires grad. Tensor values are not copied: the operations this guards create new tensors
    and load weights only after every check passed.
    """

    def __init__(self, *roots: nn.Module) -> None:
        self._saved: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []
        self._ids: set[int] = set()
        self._grads = []
        for root in roots:
            for module in root.modules():
                self._capture(module)
                config = module.__dict__.get("config")
                if config is not None and not isinstance(config, nn.Module) and hasattr(config, "__dict__"):
                    self._capture(config)
            self._grads += [(p, p.requires_grad) for p in root.parameters()]

    def _capture(self, obj: Any) -> None:
        if id(obj) in self._ids:
            return
        self._ids.add(id(obj))
        attributes = dict(obj.__dict__)
        contents = {k: v.copy() for k, v in attributes.items() if type(v) in _CONTAINERS}
        self._saved.append((obj, attributes, contents))

    def restore(self) -> None:
        for obj, attributes, contents in self._saved:
            current = obj.__dict__
            for key in [k for k in current if k not in attributes]:
                del current[key]
            current.update(attributes)
            for key, saved in contents.items():
                container = attributes[key]
                if isinstance(container, list):
                    container[:] = saved
                else:
                    container.clear()
                    container.update(saved)
        for parameter, requires_grad in self._grads:
            parameter.requires_grad_(requires_grad)
