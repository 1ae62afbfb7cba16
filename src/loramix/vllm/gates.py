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

For one linear layer, ``buffer`` (S slices, T tokens, R ranks; float32) holds ``x A^T`` of each token's adapter
slot. The gates reach it through :class:`GateTables`, tensors kept with the layer for its whole life and rewritten
in place when the adapters in its slots change (before a forward, as vLLM writes its LoRA indices), so that a
compiled model or a captured CUDA graph reads them as it reads vLLM's own. :meth:`GateTables.apply_` is tensor
operations only, on every token, per slice:

* the tokens of no adapter (slot -1) get factor 0, so that ``expand`` adds nothing to them whatever the engine's
  kernels do with index -1 (vLLM 0.32's PyTorch ops read it as the *last* slot);
* a slot with a token gate (MoR) gets, per token, the softmax of its router-logit columns as the factors of its
  expert columns, and 0 on the logit columns;
* a slot with a prompt gate (MiLoRA) gets, per token, its request's routing weight for the gate's column, from
  the per-token routing the router sites computed this step (:func:`token_routing`; computed in Python, so the
  plugin serves prompt-routed adapters in eager mode only);
* any other column, and any slot with no gate (a plain LoRA), gets factor 1.
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


class Gate:
    """A served adapter's gate of one adapted module (one slice of a vLLM linear layer): a :class:`TokenGate` or a
    :class:`PromptGate`."""


class TokenGate(Gate):
    """A per-token gate computed from the rank buffer itself: the router's rows ride along in the shrink, and the
    softmax of those buffer columns weighs the expert columns (MoR)."""

    @abstractmethod
    def columns(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(experts, logits)``: ``experts[c]`` is the expert whose probability multiplies buffer column ``c``
        (columns ``0 .. len(experts) - 1``), ``logits[i]`` the column holding expert ``i``'s router logit (set to 0
        after; its ``B`` column is zero anyway)."""


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
        elif block not in kept and layout.computed[i] < 0:
            raise RuntimeError(
                f"loramix: request {request!r} (LoRA id {adapter_id}) was added to vLLM's model runner before the "
                "plugin's hooks were installed, so its prompt length is unknown and it cannot be routed."
            )
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


def token_routing(step: Step, block: int, num_tokens: int, device) -> torch.Tensor:
    """The routing of each token's request at ``block`` (num_tokens, N), float32: ``step.routings[block][i]`` on
    every token of request i, 0 for the tokens of requests not routed there and for padding."""
    routings = step.routings.get(block)
    if routings is None or step.layout is None:
        raise RuntimeError(f"loramix: no routing for block {block} in this step (its router site did not run first).")
    width = max((w.shape[0] for w in routings.values()), default=1)
    per_request = torch.zeros(len(step.layout.counts), width)
    for i, w in routings.items():
        per_request[i, : w.shape[0]] = w.float().cpu()
    rows = per_request.repeat_interleave(torch.tensor(step.layout.counts), dim=0)
    if rows.shape[0] < num_tokens:
        rows = torch.cat([rows, rows.new_zeros(num_tokens - rows.shape[0], width)])
    return rows[:num_tokens].to(device)


class GateTables:
    """The gates of one linear LoRA layer, per slice and adapter slot, as tensors kept for the layer's life.

    For slice ``s`` and slot ``l``, column ``c`` of the rank buffer: ``kind[s, l, c]`` is :data:`PASS` (factor 1),
    :data:`EXPERT` (factor: the softmax over the slot's logit columns ``logits[s, l, :]`` where ``valid``, at
    expert ``expert[s, l, c]``), :data:`ZERO` (factor 0) or :data:`PROMPT` (factor: the token's request routing at
    ``column[s, l]``). :meth:`set_slots` rewrites them in place; :meth:`apply_` reads them.
    """

    PASS, EXPERT, ZERO, PROMPT = 0, 1, 2, 3

    def __init__(self, slices: int, slots: int, width: int, device) -> None:
        self.shape = (slices, slots, width)
        self.experts_max = max(1, width // 2)  # a token gate of N experts fills N·r + N <= width columns
        self.kind = torch.zeros(slices, slots, width, dtype=torch.long, device=device)
        self.expert = torch.zeros(slices, slots, width, dtype=torch.long, device=device)
        self.logits = torch.zeros(slices, slots, self.experts_max, dtype=torch.long, device=device)
        self.valid = torch.zeros(slices, slots, self.experts_max, dtype=torch.bool, device=device)
        self.column = torch.zeros(slices, slots, dtype=torch.long, device=device)
        self.prompt_blocks: frozenset[int] = frozenset()  # the blocks whose routing the prompt gates read

    def set_slots(self, gates: list[list[Gate | None]]) -> None:
        """``gates[s][l]``: the gate of slice ``s`` in slot ``l`` (None: none); written in place, all at once."""
        slices, slots, width = self.shape
        kind = torch.zeros(self.shape, dtype=torch.long)
        expert = torch.zeros(self.shape, dtype=torch.long)
        logits = torch.zeros(slices, slots, self.experts_max, dtype=torch.long)
        valid = torch.zeros(slices, slots, self.experts_max, dtype=torch.bool)
        column = torch.zeros(slices, slots, dtype=torch.long)
        blocks = set()
        for s, per_slot in enumerate(gates[:slices]):
            for slot, gate in enumerate(per_slot[:slots]):
                if isinstance(gate, TokenGate):
                    experts, logit_columns = gate.columns()
                    if len(experts) > width or len(logit_columns) > self.experts_max:
                        raise ValueError(f"a token gate of {len(experts)} columns does not fit a rank-{width} buffer")
                    kind[s, slot, : len(experts)] = self.EXPERT
                    expert[s, slot, : len(experts)] = torch.tensor(experts, dtype=torch.long)
                    kind[s, slot, list(logit_columns)] = self.ZERO
                    logits[s, slot, : len(logit_columns)] = torch.tensor(logit_columns, dtype=torch.long)
                    valid[s, slot, : len(logit_columns)] = True
                elif isinstance(gate, PromptGate):
                    kind[s, slot] = self.PROMPT
                    column[s, slot] = gate.column
                    blocks.add(gate.block)
        for table, value in zip(
            (self.kind, self.expert, self.logits, self.valid, self.column),
            (kind, expert, logits, valid, column),
            strict=True,
        ):
            table.copy_(value)
        self.prompt_blocks = frozenset(blocks)

    def apply_(self, buffers, slots: torch.Tensor, routing: torch.Tensor | None = None) -> None:
        """Gate ``buffers`` (a tensor (S, T, R) or S tensors (T, R)) in place; ``slots``: each token's adapter slot
        (at least T entries, -1 for none); ``routing`` (T, N): each token's request routing, for prompt gates (None:
        their rows get 0). Tensor operations only: no host synchronisation, no shape that depends on the data."""
        for s in range(len(buffers)):
            rows = buffers[s]
            # padding tokens (a CUDA-graph batch size) read whatever the persistent indices hold: kept in range
            index = slots[: rows.shape[0]].clamp(min=-1, max=self.shape[1] - 1)
            present = (index >= 0).unsqueeze(-1).to(rows.dtype)
            if s >= self.shape[0]:
                rows.mul_(present)
                continue
            index = index.clamp(min=0)
            kind = self.kind[s][index]  # (T, R)
            logits = rows.gather(1, self.logits[s][index]).masked_fill(~self.valid[s][index], float("-inf"))
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a slot without logits: all -inf, NaN, unused
            factor = torch.where(kind == self.EXPERT, probs.gather(1, self.expert[s][index]), 0.0)
            factor = torch.where(kind == self.PASS, 1.0, factor)
            if routing is not None:
                weight = routing.gather(1, self.column[s][index].unsqueeze(-1).clamp(max=routing.shape[1] - 1))
                factor = torch.where(kind == self.PROMPT, weight.to(rows.dtype), factor)
            rows.mul_(factor * present)
