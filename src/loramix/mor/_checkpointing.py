"""The router balance loss under *reentrant* activation checkpointing.

MoR layers record their router probabilities during the forward pass and :class:`~loramix.mor.MoRModel`
turns them into the Switch balance loss afterwards. With ``use_reentrant=True``,
``torch.utils.checkpoint`` runs the first forward of every checkpointed block under ``no_grad``, so the
recorded probabilities carry no graph and the balance loss's gradient would be lost silently
(transformers' MoE models avoid this by returning their router logits from the block; MoR lives
inside the block and cannot). The block is run again, with grad, when the backward pass reaches it.
So, for each layer whose probabilities came without a graph:

1. ``MoRModel`` builds the loss from the graph-less values and passes it through :class:`GradProbe`,
   which records ``d(total loss)/d(aux loss)`` when the backward pass reaches it. It is the last node
   the forward pass created, so the autograd engine runs it before it recomputes any block.
2. The layer keeps a :class:`PendingAux`. When it is recomputed it builds its term of the loss again,
   now with a graph, and ties it to its output with :class:`AuxGradInjector`, whose backward hands the
   term the gradient ``probe gradient x d(aux loss)/d(term)``: what plain backpropagation gives it.

The gradients then equal those without checkpointing (tested in ``tests/integration``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class AuxGradState:
    """Holds the gradient that reached the aux loss in the latest backward pass."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None


@dataclass
class PendingAux:
    """A layer's balance-loss term whose gradient is injected when reentrant checkpointing re-runs the layer."""

    state: AuxGradState
    scale: float  # d(aux loss of the adapter) / d(this layer's term): 1 / number of layers
    term_fn: Callable[[torch.Tensor], torch.Tensor]  # router probabilities -> this layer's term
    shape: torch.Size  # shape of the recorded probabilities, to recognise the recompute


class GradProbe(torch.autograd.Function):
    """Identity on ``value`` that stores the gradient reaching it in ``state``.

    ``anchor`` is a fresh scalar that requires grad, so that the output is part of the graph even when
    ``value`` has no graph (every layer was checkpointed); it receives no gradient.
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
