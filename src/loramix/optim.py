"""Optimizer parameter groups for loramix adapters: routers and MoR's Ω apart from the LoRA weights.

A mixture adapter has three kinds of trainable parameters with different roles:

* ``adapter``: the LoRA matrices (MoR's shared ``A``/``B``, MiLoRA's experts) and any other trainable
  matrix (e.g. PEFT ``modules_to_save``);
* ``vectors``: the other trainable vectors (DoRA magnitudes, trained biases), at the adapter's rate;
* ``router``: the routers (MoR's ``W_r``; MiLoRA's router, attention-pool query and rational-activation
  coefficients);
* ``omega``: multiplicative scaling vectors initialised near 1 (MoR's ``Ω_A``/``Ω_B``).

:func:`parameter_groups` returns them as torch optimizer groups with their own learning rate. Weight decay
applies to the ``adapter`` group only: decaying ``Ω`` or a DoRA magnitude pulls it towards 0, not towards
its starting value, and decaying a router pulls it towards uniform routing. Parameters are classified by
the layer container that holds them, as each method declares (``Method.router_params`` and ``scale_params``,
:mod:`loramix.method`), not by their names: a method's new router parameter lands in the right group when its
declaration lists it. With
``transformers.Trainer``::

    from loramix.optim import parameter_groups

    optimizer = torch.optim.AdamW(parameter_groups(model, lr=2e-4, router_lr=1e-3, weight_decay=0.01))
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))

(``None``: the Trainer builds its learning-rate schedule around the groups, scaling each one's rate.)
"""

from __future__ import annotations

import math

from torch import nn

from .method import registered_methods

__all__ = ["GROUPS", "parameter_groups"]

GROUPS = ("adapter", "vectors", "router", "omega")


def _containers(model: nn.Module, names: tuple[str, ...]) -> set[int]:
    """The ids of the parameters held in ``ParameterDict`` attributes called ``names`` by any module."""
    found: set[int] = set()
    for module in model.modules():
        for name in names:
            container = getattr(module, name, None)
            if isinstance(container, nn.ParameterDict):
                found |= {id(p) for p in container.values()}
    return found


def parameter_groups(
    model: nn.Module,
    lr: float,
    *,
    router_lr: float | None = None,
    omega_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """The trainable parameters of ``model`` as optimizer groups ``{"params", "lr", "weight_decay", "name"}``.

    Args:
        model: any model; its parameters with ``requires_grad`` are grouped (each exactly once).
        lr: learning rate of the ``adapter`` and ``vectors`` groups, and of the others unless given.
        router_lr: learning rate of the ``router`` group (default ``lr``).
        omega_lr: learning rate of the ``omega`` group (default ``lr``).
        weight_decay: weight decay of the ``adapter`` group; the ``router`` and ``omega`` groups get none.

    Returns:
        The non-empty groups, in the order ``adapter``, ``vectors``, ``router``, ``omega``.
    """
    for label, value in (("lr", lr), ("router_lr", router_lr), ("omega_lr", omega_lr), ("weight_decay", weight_decay)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
        ):
            raise ValueError(f"`{label}` must be a finite number >= 0, got {value!r}.")
    rates = {
        "adapter": lr,
        "vectors": lr,
        "router": lr if router_lr is None else router_lr,
        "omega": lr if omega_lr is None else omega_lr,
    }
    methods = list(registered_methods())
    router = _containers(model, tuple(name for m in methods for name in m.router_params))
    omega = _containers(model, tuple(name for m in methods for name in m.scale_params))
    members: dict[str, list] = {group: [] for group in GROUPS}
    for param in model.parameters():
        if param.requires_grad:
            group = "router" if id(param) in router else "omega" if id(param) in omega else None
            members[group or ("vectors" if param.dim() < 2 else "adapter")].append(param)
    if not any(members.values()):
        raise ValueError(f"{type(model).__name__} has no trainable parameters to group.")
    return [
        {"params": members[g], "lr": rates[g], "weight_decay": weight_decay if g == "adapter" else 0.0, "name": g}
        for g in GROUPS
        if members[g]
    ]
