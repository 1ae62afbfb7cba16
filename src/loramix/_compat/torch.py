"""The torch fence: the uses of torch internals, in one module.

Verified with torch 2.4 (the oldest supported) to 2.13.0. What it touches, and why no public API serves:

1. **Forward hooks without their handles** (:func:`has_forward_hook`, :func:`remove_forward_hooks`): the routing
   hooks are put on the adapted ``transformers`` model by every injection path, transformers' ``load_adapter``
   included, which keeps no tuner object that could hold the ``RemovableHandle``\\ s. Whether a hook is already
   there (injection is idempotent) and removing it at ``unload`` therefore read ``nn.Module``'s hook
   dictionaries (``_forward_pre_hooks``, ``_forward_hooks``, and the ``*_with_kwargs`` / ``_always_called``
   sets of the same keys).
2. **A callback at the end of the backward pass** (:func:`queue_backward_callback`): the routing session is made
   current again while activation checkpointing re-runs blocks during ``backward``, and must be reset when the
   pass ends, in the thread that ran it. ``torch.autograd.Variable._execution_engine.queue_callback`` is what
   torch's own checkpointing and DDP use for that; no public function exposes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["has_forward_hook", "queue_backward_callback", "remove_forward_hooks"]


def has_forward_hook(module: nn.Module, hook: Callable) -> bool:
    """Whether ``hook`` is registered on ``module`` as a forward pre-hook or forward hook."""
    return hook in module._forward_pre_hooks.values() or hook in module._forward_hooks.values()


def remove_forward_hooks(module: nn.Module, hooks: Iterable[Callable]) -> None:
    """Remove every registration of ``hooks`` from ``module``'s forward pre-hooks and forward hooks."""
    hooks = tuple(hooks)
    for registry in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in registry.items() if fn in hooks]:
            del registry[key]
            for extra in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs):
                extra.pop(key, None)
            getattr(module, "_forward_hooks_always_called", {}).pop(key, None)


def queue_backward_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the backward pass now running ends (point 2)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)
