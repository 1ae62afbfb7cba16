"""The gates between vLLM's LoRA ``shrink`` and ``expand``, and the routing of prompt-routed adapters.

Pure PyTorch: these classes know tensors, the converted adapters (:mod:`loramix.vllm.convert`) and the layout of
one engine step, not vLLM. The hooks in :mod:`loramix.vllm._hooks` feed them.

A served adapter keeps one :class:`Gate` per adapted module, of one of two kinds; each method's served form
(``loramix/<method>/served.py``) says which, and brings the maths:

* a :class:`TokenGate` is computed per token from the rank buffer itself: the router's rows ride along in the
  shrink, so the buffer holds each token's router logits next to its expert columns (MoR);
* a :class:`PromptGate` is computed once per request from its prompt: the adapter's router of a block (a
  :class:`PromptRouter`, run at the block's router site on the prompt's block input) gives the request's routing
  ``w`` (N,), and the gate multiplies every token of the request by one column of it (MiLoRA).

For one linear layer of one step, ``buffer`` (S slices, T tokens, R ranks; float32) holds ``x A^T`` of each
token's adapter slot. :meth:`LayerGates.apply_` then, per slice:

* zeroes the tokens of no adapter (slot -1), so that ``expand`` adds nothing to them whatever the engine's
  kernels do with index -1 (vLLM 0.32's PyTorch ops read it as the *last* slot);
* gates the rows of each loramix adapter's slot with what its gate gives for this step (:meth:`Gate.for_step`):
  a token gate gates the rows in place; a prompt gate multiplies each token's row by its request's routing
  weight for the gate's column (0 when the prompt did not select it).

A slot with no gate is a plain LoRA: its rows are left as they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loramix.method import method_of

if TYPE_CHECKING:
    from loramix.vllm.convert import ServedAdapter


@dataclass(frozen=True)
class StepLayout:
    """The requests of one engine step, in the order of their tokens in the flattened batch.

    ``computed[i]`` tokens of request i were computed before this step; this step holds its next
    ``counts[i]`` tokens; its prompt has ``prompt_lengths[i]`` tokens; ``adapters[i]`` is its LoRA id (0: none).
    """

    request_ids: tuple[str, ...]
    counts: tuple[int, ...]
    computed: tuple[int, ...]
    prompt_lengths: tuple[int, ...]
    adapters: tuple[int, ...]

    @property
    def starts(self) -> list[int]:
        starts, total = [], 0
        for count in self.counts:
            starts.append(total)
            total += count
        return starts


@dataclass
class Step:
    """One engine step as the gates see it: its requests (``None`` for a warm-up or profiling activation, which
    has none) and the routings its router sites have computed so far, ``{block: {request index: w (N,)}}``."""

    layout: StepLayout | None = None
    routings: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)


@dataclass
class Routes:
    """Prompt routings, ``{request id: {block: w (N,)}}``, kept until the request finishes.

    A request is routed when a step holds its whole prompt from its first token (its first prefill, or its
    recomputation after preemption, which routes it the same way again), and keeps that routing for every
    later step.
    """

    weights: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def finish(self, request_ids) -> None:
        for request_id in request_ids:
            self.weights.pop(request_id, None)


# ----------------------------------------------------------------------------------------------------------------------
# the two kinds of gate
# ----------------------------------------------------------------------------------------------------------------------


class SlotGate(ABC):
    """What gates one adapter slot's rows of one slice's buffer in one step."""

    @abstractmethod
    def apply_(self, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Gate in place the rows of ``rows`` (T, R) where ``mask`` (T,) is True (the tokens of the slot)."""


class Gate(ABC):
    """A served adapter's gate of one adapted module (one slice of a vLLM linear layer)."""

    @abstractmethod
    def for_step(self, step: Step, adapter_id: int, num_tokens: int) -> SlotGate:
        """What gates the adapter's rows in ``step`` (``num_tokens`` rows, padding included)."""


class TokenGate(Gate, SlotGate):
    """A per-token gate computed from the rank buffer itself (the router's rows ride along in the shrink)."""

    @abstractmethod
    def gate_(self, rows: torch.Tensor) -> None:
        """Gate the buffer rows (n, R) of the adapter's tokens in place."""

    def for_step(self, step: Step, adapter_id: int, num_tokens: int) -> SlotGate:
        return self  # nothing to compute before the layer runs: the buffer holds all the gate needs

    def apply_(self, rows: torch.Tensor, mask: torch.Tensor) -> None:
        selected = rows[mask]  # boolean indexing copies: gate the copy, then write it back
        self.gate_(selected)
        rows[mask] = selected


class PromptRouter(ABC):
    """The router of one block of a prompt-routed adapter, run at the block's router site."""

    @abstractmethod
    def route(self, hidden: torch.Tensor) -> torch.Tensor:
        """The routing ``w`` (N,), float32, of one prompt from its block input ``hidden`` (T, d)."""


@dataclass(frozen=True)
class PromptGate(Gate):
    """A per-request gate: column ``column`` of the routing that the router of block ``block`` computed from the
    request's prompt (:class:`PromptRouter`), the same factor for every token of the request."""

    block: int
    column: int

    def for_step(self, step: Step, adapter_id: int, num_tokens: int) -> SlotGate:
        routings = step.routings.get(self.block)
        if routings is None or step.layout is None:
            raise RuntimeError(
                f"loramix: no routing for block {self.block} in this step (its router site did not run first)."
            )
        per_request = {
            i: float(routings[i][self.column]) for i, a in enumerate(step.layout.adapters) if a == adapter_id
        }
        return RequestFactors(request_weights(step.layout, per_request, num_tokens))


@dataclass
class RequestFactors(SlotGate):
    """Per-token factors (T,), float32: each row of the slot times its factor."""

    factors: torch.Tensor

    def apply_(self, rows: torch.Tensor, mask: torch.Tensor) -> None:
        rows.mul_(torch.where(mask, self.factors.to(rows.device), 1.0).unsqueeze(-1))


def request_weights(layout: StepLayout, weights: dict[int, float], num_tokens: int) -> torch.Tensor:
    """Per-token factors (num_tokens,) from per-request ones: ``weights[i]`` for every token of request i, 0 for
    the tokens of requests not in ``weights`` and past the last request (padding)."""
    per_request = torch.zeros(len(layout.counts))
    for i, w in weights.items():
        per_request[i] = w
    counts = torch.tensor(layout.counts)
    factors = per_request.repeat_interleave(counts)
    if factors.shape[0] < num_tokens:
        factors = torch.cat([factors, factors.new_zeros(num_tokens - factors.shape[0])])
    return factors[:num_tokens]


# ----------------------------------------------------------------------------------------------------------------------
# routing at a block's router site, and a layer's gates
# ----------------------------------------------------------------------------------------------------------------------


def route_block(
    step: Step, routes: Routes, adapters: Mapping[int, ServedAdapter], block: int, hidden: torch.Tensor
) -> None:
    """Route (or take the kept routing of) every request of an adapter with a router in ``block``.

    ``hidden`` (T, d) is the block input of the step's tokens. A request whose whole prompt is in this step from
    its first token is routed on ``hidden[start : start + prompt_length]``; any other takes the routing kept for
    it (``routes``), and without one its prompt was split across steps: refused. Sets ``step.routings[block]``.
    """
    layout = step.layout
    weights: dict[int, torch.Tensor] = {}
    starts = None
    for i, adapter_id in enumerate(() if layout is None else layout.adapters):
        adapter = adapters.get(adapter_id)
        if adapter is None or block not in adapter.routers:
            continue
        request = layout.request_ids[i]
        kept = routes.weights.get(request, {})
        if layout.computed[i] == 0 and layout.counts[i] >= layout.prompt_lengths[i]:
            starts = layout.starts if starts is None else starts
            kept[block] = adapter.routers[block].route(hidden[starts[i] : starts[i] + layout.prompt_lengths[i]])
            routes.weights[request] = kept
        elif block not in kept:
            method = method_of(adapter.method).display_name
            raise RuntimeError(
                f"loramix: {method} request {request!r} (LoRA id {adapter_id}) arrives with {layout.computed[i]} of "
                f"its {layout.prompt_lengths[i]} prompt tokens already computed and no routing kept for it: its prompt "
                "was split across steps (chunked prefill) or partly served from the prefix cache. Serve "
                f"{method} adapters with --no-enable-chunked-prefill --no-enable-prefix-caching."
            )
        weights[i] = kept[block]
    step.routings[block] = weights


@dataclass
class LayerGates:
    """The gates of one layer in one step: ``slices[s]`` maps an adapter slot to what gates its rows in slice s.

    A slot not listed is a plain LoRA: its buffer rows are left as they are.
    """

    slots: torch.Tensor  # (T,) long, the adapter slot of each token, -1 for none
    slices: list[dict[int, SlotGate]]

    def apply_(self, buffers) -> None:
        """Gate ``buffers`` in place: a tensor (S, T, R) or a sequence of S tensors (T, R)."""
        slots = self.slots
        none = slots < 0
        for s, buffer in enumerate(buffers):
            rows = buffer[: slots.shape[0]]
            if bool(none.any()):
                rows[none] = 0
            for slot, gate in (self.slices[s] if s < len(self.slices) else {}).items():
                gate.apply_(rows, slots == slot)
