"""Independent float64 references for MiLoRA, written from the paper without any code from ``loramix``.

Zhang et al., arXiv 2410.18035: Eq. 2-3 (pooler, activation, router, Top-k), Eq. 4-5 (balance
loss), Eq. 6 (rational activation), Appendix C (self-attention pooler); DoRA per Liu et al. 2024.
Everything runs row by row in plain loops over the tokens that may enter a pool.
"""

from __future__ import annotations

import math

import torch

D = torch.float64


def pool_reference(hidden, mask, pooler, query=None):
    """(B, T, d) -> (B, d), one row at a time over the tokens where ``mask`` is True."""
    rows = []
    for b in range(hidden.shape[0]):
        keep = [t for t in range(hidden.shape[1]) if mask is None or bool(mask[b, t])]
        tokens = hidden[b, keep].to(D)  # (n, d)
        if pooler == "mean":
            rows.append(tokens.sum(0) / len(keep))
        elif pooler == "max":
            rows.append(torch.stack([tokens[:, j].max() for j in range(tokens.shape[1])]))
        elif pooler == "last":
            rows.append(tokens[-1])
        elif pooler == "attention":
            scores = [float(tokens[i] @ query.to(D)) for i in range(len(keep))]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            rows.append(sum((w / total) * tokens[i] for i, w in enumerate(weights)))
        else:
            raise ValueError(pooler)
    return torch.stack(rows)


def gelu_reference(x):
    return 0.5 * x.to(D) * (1.0 + torch.erf(x.to(D) / math.sqrt(2.0)))


def rational_reference(x, numerator, denominator):
    """Eq. 6 with explicit powers: Σ_j a_j x^j / (1 + |Σ_i b_i x^i|)."""
    x = x.to(D)
    p = sum(float(a) * x**j for j, a in enumerate(numerator))
    q = sum(float(b) * x ** (i + 1) for i, b in enumerate(denominator))
    return p / (1.0 + q.abs())


def router_reference(
    hidden, mask, pooler, query, activation, weight, top_k, numerator=None, denominator=None, gate_form="probability"
):
    """Eq. 2-3: (probs, gates) of shape (B, N); gates keep p_i of the top-k experts, 0 elsewhere
    (``gate_form`` "normalized": p_i divided by the sum of the kept p_j; "unit_mean": that times top_k)."""
    pooled = pool_reference(hidden, mask, pooler, query)
    if activation == "rational":
        pooled = rational_reference(pooled, numerator, denominator)
    elif activation == "gelu":
        pooled = gelu_reference(pooled)
    elif activation == "relu":
        pooled = pooled.clamp_min(0)
    probs = torch.softmax(pooled @ weight.to(D).T, dim=-1)
    gates = torch.zeros_like(probs)
    for b in range(probs.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda i: -float(probs[b, i]))
        kept = sum(float(probs[b, i]) for i in order[:top_k]) if gate_form != "probability" else 1.0
        times = top_k if gate_form == "unit_mean" else 1
        for i in order[:top_k]:
            gates[b, i] = times * probs[b, i] / kept
    return probs, gates


def balance_reference(probs) -> float:
    """Eq. 4-5 for one layer: N · Σ_i f_i · p̂_i with f_i the share of prompts whose argmax is i."""
    rows = probs.tolist()
    n, count = len(rows[0]), len(rows)
    f = [sum(1 for row in rows if max(range(n), key=row.__getitem__) == i) / count for i in range(n)]
    p = [sum(row[i] for row in rows) / count for i in range(n)]
    return n * sum(fi * pi for fi, pi in zip(f, p, strict=True))


def expert_reference(x, weight, bias, lora_A, lora_B, scaling, gate, magnitude=None):
    """One expert's linear for one sequence: W x + b + gate · (W' - W) x, W' = W + s·BA (LoRA) or DoRA's."""
    x, weight = x.to(D), weight.to(D)
    adapted = weight + scaling * (lora_B.to(D) @ lora_A.to(D))
    if magnitude is not None:
        norms = torch.sqrt((adapted**2).sum(dim=1, keepdim=True))
        adapted = magnitude.to(D).unsqueeze(1) * adapted / norms
    out = x @ weight.T + gate * (x @ (adapted - weight).T)
    return out if bias is None else out + bias.to(D)


def grouped_reference(x, out, adapters):
    """Several adapters' experts in one batch, a loop over adapters and rows in float64.

    ``adapters`` lists ``(lora_A (r, d_in), lora_B (d_out, r), rows, factors)``: row ``rows[j]`` of ``out``
    gets ``factors[j] · B A x[rows[j]]``; the other rows are left as they are.
    """
    out = out.to(D).clone()
    for lora_A, lora_B, rows, factors in adapters:
        for row, factor in zip(rows, factors, strict=True):
            out[row] += float(factor) * (x[row].to(D) @ lora_A.to(D).T @ lora_B.to(D).T)
    return out


def stack_adapters(adapters, dtype=torch.float32):
    """The stacked inputs of ``grouped_lora`` for ``adapters`` (as in :func:`grouped_reference`)."""
    rank = max(a.shape[0] for a, _, _, _ in adapters)
    slots = max(len(rows) for _, _, rows, _ in adapters)
    d_in, d_out = adapters[0][0].shape[1], adapters[0][1].shape[0]
    stack_A = torch.zeros(len(adapters), d_in, rank, dtype=dtype)
    stack_B = torch.zeros(len(adapters), rank, d_out, dtype=dtype)
    gather = torch.zeros(len(adapters), slots, dtype=torch.long)
    factor = torch.zeros(len(adapters), slots)
    for i, (lora_A, lora_B, rows, factors) in enumerate(adapters):
        stack_A[i, :, : lora_A.shape[0]] = lora_A.T
        stack_B[i, : lora_A.shape[0]] = lora_B.T
        gather[i, : len(rows)] = torch.tensor(rows)
        gather[i, len(rows) :] = rows[0]
        factor[i, : len(rows)] = torch.as_tensor(factors)
    counts = torch.tensor([len(rows) for _, _, rows, _ in adapters], dtype=torch.int32)
    return stack_A, stack_B, gather, counts, factor
