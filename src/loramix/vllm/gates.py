"""The per-token gates between vLLM's LoRA ``shrink`` and ``expand``, and MiLoRA's per-request routing.

Pure PyTorch: these functions know tensors, the converted adapters (:mod:`loramix.vllm.convert`) and the
layout of one engine step, not vLLM. The hooks in :mod:`loramix.vllm._hooks` feed them.

For one linear layer of one step, ``buffer`` (S slices, T tokens, R ranks; float32) holds ``x A^T`` of each
token's adapter slot. :func:`gate_buffer` then, per slice:

* zeroes the tokens of no adapter (slot -1), so that ``expand`` adds nothing to them whatever the engine's
  kernels do with index -1 (vLLM 0.32's PyTorch ops read it as the *last* slot);
* MoR slots: ``G = softmax(buffer[:, N·r:N·r+N])`` per token; expert block i of the buffer times ``G_i``; the
  logit columns set to 0 (their ``B`` columns are zero anyway);
* MiLoRA slots: each token's buffer times its request's router weight for the slice's expert (0 when the
  prompt did not select it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..milora import functional as F_milora
from .convert import BlockRouter, ExpertGate, MoRGate


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
class Routes:
    """MiLoRA routings, ``{request id: {block: router weights (N,)}}``, kept until the request finishes.

    A request is routed when a step holds its whole prompt from its first token (its first prefill, or its
    recomputation after preemption, which routes it the same way again), and keeps that routing for every
    later step.
    """

    weights: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def finish(self, request_ids) -> None:
        for request_id in request_ids:
            self.weights.pop(request_id, None)


def route(router: BlockRouter, hidden: torch.Tensor) -> torch.Tensor:
    """MiLoRA's router weights ``w`` (N,) for one prompt's block input ``hidden`` (T, d), in float32.

    The maths of ``loramix.milora.layer.MiLoRARouter.route`` for a batch of one (its pooling, activation,
    softmax and Top-k functions), so a served request routes as ``PeftModel.generate`` routes it.
    """
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        h = hidden.float().unsqueeze(0)
        device = h.device
        query = None if router.query is None else router.query.to(device)
        pooled = F_milora.pool(h, None, router.pooler, query)
        if router.activation == "rational":
            pooled = F_milora.rational(pooled, router.numerator.to(device), router.denominator.to(device))
        else:
            pooled = F_milora.activate(pooled, router.activation)
        probs = torch.softmax(torch.nn.functional.linear(pooled, router.weight.to(device)), dim=-1)
        gates, _ = F_milora.top_k_gates(probs, router.top_k, router.normalize_gates)
    return gates.squeeze(0)


def mor_gate_(rows: torch.Tensor, gate: MoRGate) -> None:
    """Gate a MoR slot's buffer rows (n, R) in place: experts times ``softmax(router logits)``, logits to 0."""
    width = gate.num_experts * gate.rank
    logits = rows[:, width : width + gate.num_experts]
    probs = torch.softmax(logits, dim=-1)
    rows[:, :width] *= probs.repeat_interleave(gate.rank, dim=-1)
    logits.zero_()


def request_weights(layout: StepLayout, weights: dict[int, torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Per-token factors (num_tokens,) from per-request ones: ``weights[i]`` for every token of request i, 0 for
    tokens past the last request (padding)."""
    per_request = torch.zeros(len(layout.counts))
    for i, w in weights.items():
        per_request[i] = w
    counts = torch.tensor(layout.counts)
    factors = per_request.repeat_interleave(counts)
    if factors.shape[0] < num_tokens:
        factors = torch.cat([factors, factors.new_zeros(num_tokens - factors.shape[0])])
    return factors[:num_tokens]


@dataclass
class LayerGates:
    """The gates of one layer in one step: per slice, what each adapter slot present needs.

    ``slices[s]`` maps a slot index to a :class:`MoRGate` or to per-token factors (MiLoRA; float32, (T,)).
    A slot not listed is a plain LoRA: its buffer rows are left as they are.
    """

    slots: torch.Tensor  # (T,) long, the adapter slot of each token, -1 for none
    slices: list[dict[int, MoRGate | torch.Tensor]]

    def apply_(self, buffers) -> None:
        """Gate ``buffers`` in place: a tensor (S, T, R) or a sequence of S tensors (T, R)."""
        slots = self.slots
        none = slots < 0
        for s, buffer in enumerate(buffers):
            rows = buffer[: slots.shape[0]]
            if bool(none.any()):
                rows[none] = 0
            for slot, gate in (self.slices[s] if s < len(self.slices) else {}).items():
                mask = slots == slot
                if isinstance(gate, MoRGate):
                    selected = rows[mask]
                    mor_gate_(selected, gate)
                    rows[mask] = selected
                else:
                    rows.mul_(torch.where(mask, gate.to(rows.device), 1.0).unsqueeze(-1))


def expert_factors(
    layout: StepLayout, block_weights: dict[int, torch.Tensor], adapter_id: int, gate: ExpertGate, num_tokens: int
) -> torch.Tensor:
    """Per-token factors of one MiLoRA expert: its column of each request's routing (requests of ``adapter_id``)."""
    per_request = {i: float(block_weights[i][gate.expert]) for i, a in enumerate(layout.adapters) if a == adapter_id}
    return request_weights(layout, per_request, num_tokens)
