"""The router balance loss of both methods, and its gradient under reentrant activation checkpointing.

The Switch-Transformer loss (:func:`switch_balance_loss`) is computed per router from the records of
a :class:`~loramix.routing.session.RoutingSession` (MoR: per token, MoR paper §3.3; MiLoRA: per prompt,
MiLoRA paper Eq. 4-5) and averaged over the routers of each adapter (:func:`balance_losses`).

With ``use_reentrant=True``, ``torch.utils.checkpoint`` runs the first forward of a checkpointed block
under ``no_grad``: the recorded probabilities carry no graph and the loss's gradient would be lost
silently (transformers' MoE models return router logits from the block; loramix's routers live inside
it and cannot). The block runs again, with grad, when the backward pass reaches it. So for each router
whose probabilities came without a graph:

1. the adapter's loss goes through :class:`GradProbe`, which records ``d(total loss)/d(aux loss)`` when
   the backward pass reaches it (it is the last node the forward created, so it runs before any block
   is recomputed);
2. the session keeps a :class:`PendingAux` for ``(router, adapter)``; when the router is recomputed it
   rebuilds its term with a graph and ties it to its output with :class:`AuxGradInjector`
   (:func:`attach_pending`), whose backward hands the term ``probe gradient x d(aux loss)/d(term)``.

The gradients then equal those without checkpointing (``tests/integration/test_checkpointing.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def switch_balance_loss(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``N · Σ_i f_i · p̂_i`` over the rows of one router.

    ``probs`` holds router probabilities ``(..., N)``: one row per token (MoR) or per prompt (MiLoRA).
    ``f_i`` is the fraction of rows whose largest router weight is expert ``i`` and ``p̂_i`` the mean
    router weight of expert ``i`` (Fedus et al. 2022, Eq. 4-6; MiLoRA paper Eq. 4-5); rows where
    ``mask`` is 0 (padding) are left out. It is 1 for a perfectly balanced router and N when every row
    goes to one expert. Only ``p̂`` carries a gradient (``f`` comes from an argmax).
    """
    num_experts = probs.shape[-1]
    probs = probs.reshape(-1, num_experts).float()
    if mask is not None and mask.numel() == probs.shape[0]:
        keep = mask.reshape(-1).to(device=probs.device, dtype=torch.bool)
        probs = probs[keep]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = torch.nn.functional.one_hot(probs.argmax(dim=-1), num_experts).to(probs.dtype)
    return num_experts * (counts.mean(0) * probs.mean(0)).sum()


class AuxGradState:
    """Holds the gradient that reached an adapter's aux loss in the latest backward pass."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None


@dataclass
class PendingAux:
    """A router's balance-loss term whose gradient is injected when reentrant checkpointing re-runs it."""

    state: AuxGradState
    scale: float  # d(aux loss of the adapter) / d(this router's term): 1 / number of routers
    term_fn: Callable[[torch.Tensor], torch.Tensor]  # router probabilities -> this router's term
    shape: torch.Size  # shape of the recorded probabilities, to recognise the recompute


class GradProbe(torch.autograd.Function):
    """Identity on ``value`` that stores the gradient reaching it in ``state``.

    ``anchor`` is a fresh scalar that requires grad, so that the output is part of the graph even when
    ``value`` has no graph (every router was checkpointed); it receives no gradient.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, anchor: torch.Tensor, state: AuxGradState) -> torch.Tensor:
        ctx.state = state
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.state.grad = grad.detach()
        return grad, None, None


class AuxGradInjector(torch.autograd.Function):
    """Identity on ``output``; in backward, gives ``term`` the gradient recorded by the :class:`GradProbe`."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, term: torch.Tensor, pending: PendingAux) -> torch.Tensor:
        ctx.pending = pending
        ctx.term_dtype = term.dtype
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = ctx.pending.state.grad
        term_grad = None if grad is None else (grad * ctx.pending.scale).to(ctx.term_dtype)
        return grad_output, term_grad, None


def balance_losses(session: Any, adapters: dict[str, float]) -> dict[str, torch.Tensor]:
    """Per adapter in ``adapters``: the mean Switch loss over its routers recorded in ``session``.

    Records whose probabilities have no graph while grad is on (the no-grad first pass of reentrant
    checkpointing) leave a :class:`PendingAux` in ``session.pending`` for the recompute.
    """
    losses = {}
    for name in adapters:
        records = [r for r in session.records if r.adapter == name]
        if not records:
            continue
        loss = torch.stack([switch_balance_loss(r.probs, r.mask) for r in records]).mean()
        deferred = [r for r in records if torch.is_grad_enabled() and not r.probs.requires_grad and _trainable(r)]
        if deferred:
            state = AuxGradState()
            loss = GradProbe.apply(loss, loss.new_zeros((), requires_grad=True), state)
            for r in deferred:
                term = _term_fn(r.mask)
                session.pending[(r.layer, name)] = PendingAux(state, 1.0 / len(records), term, r.probs.shape)
        losses[name] = loss
    return losses


def _trainable(record: Any) -> bool:
    return any(p.requires_grad for n, p in record.layer.named_parameters() if n.endswith(f".{record.adapter}"))


def _term_fn(mask: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda probs: switch_balance_loss(probs, mask)


def attach_pending(session: Any, layer: torch.nn.Module, adapter: str, probs: torch.Tensor, output: torch.Tensor):
    """When reentrant checkpointing re-runs ``layer``, tie its balance-loss term (rebuilt from ``probs``,
    now with a graph) to ``output`` so that the term receives its gradient; otherwise ``output``."""
    pending = None if session is None else session.pending.get((layer, adapter))
    if pending is None or not probs.requires_grad or probs.shape != pending.shape:
        return output
    del session.pending[(layer, adapter)]
    return AuxGradInjector.apply(output, pending.term_fn(probs), pending)
