"""Log-likelihood scoring of continuations, with MiLoRA routed on the context.

Evaluation tools (lm-evaluation-harness and its peers) score a multiple-choice item by putting the
context and a candidate continuation in **one** forward and summing the continuation's token
log-probabilities. For MoR (a router per token, causal) that is exactly what generation computes. For
MiLoRA it is not: the routers pool over every token of the input, so they would see the candidate answer,
while in generation (and in training, where the pool is the prompt) they see the prompt only. Scored
that way, MiLoRA's choice of experts differs from candidate to candidate of the same question.

:func:`loglikelihood` scores with the routing of generation: each row's MiLoRA routers pool over its
context tokens only (the forward's ``prompt_mask``), and that routing is applied to the whole row, as a
``generate`` call that prefilled the context would. Its contract is that of lm-evaluation-harness's
``LM.loglikelihood`` on token ids: a list of ``(context, continuation)`` pairs in, a list of
``(log-probability, is_greedy)`` out, so a harness's own model class can return it from its
``loglikelihood``. ``route_on="all"`` gives the one-forward behaviour for comparison.

Rows are left-padded with explicit ``position_ids`` (so padding changes no position), in batches of
similar length; only the logits of the continuation positions are computed when the model's forward
takes ``logits_to_keep`` (transformers' decoder models do), and no KV cache is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from loramix.routing.session import has_routing

__all__ = ["left_padded", "loglikelihood"]


def _accepts(model: nn.Module, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _check(requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
    for index, request in enumerate(requests):
        if not (isinstance(request, (tuple, list)) and len(request) == 2):
            raise TypeError(f"request {index} must be a (context_ids, continuation_ids) pair, got {request!r}.")
        context, continuation = request
        if len(context) == 0:
            raise ValueError(f"request {index} has an empty context: the first continuation token needs one.")
        if len(continuation) == 0:
            raise ValueError(f"request {index} has an empty continuation: there is nothing to score.")


def left_padded(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids, context_mask)`` of ``(context, continuation)`` rows,
    each row ``context + continuation`` padded on the left, so that every continuation ends at the last
    column; ``position_ids`` count attended tokens from 0 (padding changes no position) and
    ``context_mask`` marks the context tokens (MiLoRA's ``prompt_mask``). All ``(rows, width)``."""
    width = max(len(c) + len(k) for c, k in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    context = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (ctx, cont) in enumerate(rows):
        tokens = [*ctx, *cont]
        ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
        attention[row, width - len(tokens) :] = 1
        context[row, width - len(tokens) : width - len(cont)] = True
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    return ids, attention, positions, context


@torch.no_grad()
def loglikelihood(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    route_on: Literal["context", "all"] = "context",
    batch_size: int = 32,
    pad_token_id: int = 0,
) -> list[tuple[float, bool]]:
    """Score each continuation given its context: ``[(sum of log p(continuation tokens), is_greedy)]``.

    Args:
        model: a causal LM (``PeftModel`` or plain ``transformers`` model) whose forward takes
            ``input_ids`` and ``attention_mask``; batches of several requests also need ``position_ids``
            (without it each request is scored alone). It is used as it is (call ``eval()`` first;
            dropout would make scores random).
        requests: ``(context_ids, continuation_ids)`` pairs of token ids, both non-empty.
        route_on: ``"context"``: MiLoRA routers pool over the context only (what ``generate`` and training
            do); ``"all"``: over context and continuation (one plain forward, what a harness that knows
            nothing of routing gets). No effect on models without a loramix adapter, nor on MoR.
        batch_size: rows per forward.
        pad_token_id: the id put on padding positions (they are masked out).

    Returns:
        One ``(log_prob, is_greedy)`` per request, in order: ``log_prob`` = Σ_t log p(c_t | context, c_<t)
        in float64 from the model's logits; ``is_greedy`` says whether every continuation token is the
        argmax at its position.
    """
    if route_on not in ("context", "all"):
        raise ValueError(f"route_on must be 'context' or 'all', got {route_on!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    _check(requests)
    routed = has_routing(model) and route_on == "context"
    keep_logits = _accepts(model, "logits_to_keep")
    if not _accepts(model, "position_ids"):
        batch_size = 1  # padding would shift the positions of the padded rows: score each request alone
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]) + len(requests[i][1]))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [(list(requests[i][0]), list(requests[i][1])) for i in chunk]
        ids, attention, positions, context = left_padded(rows, pad_token_id)
        width, tail = ids.shape[1], max(len(k) for _, k in rows)  # the continuation positions kept
        kwargs = {"attention_mask": attention.to(device)}
        if batch_size > 1:
            kwargs["position_ids"] = positions.to(device)
        if _accepts(model, "use_cache"):
            kwargs["use_cache"] = False  # no KV cache to build
        if routed:
            kwargs["prompt_mask"] = context.to(device)
        if keep_logits:
            kwargs["logits_to_keep"] = tail + 1
        logits = model(input_ids=ids.to(device), **kwargs).logits[:, -(tail + 1) : -1].double()
        logprobs = torch.log_softmax(logits, dim=-1)  # position j predicts token width - tail + j
        targets = ids[:, width - tail :].to(device)
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        greedy = logprobs.argmax(-1).eq(targets)
        for row, (index, (_, cont)) in enumerate(zip(chunk, rows, strict=True)):
            span = slice(tail - len(cont), tail)
            results[index] = (float(token_lp[row, span].sum()), bool(greedy[row, span].all()))
    return results  # type: ignore[return-value]
