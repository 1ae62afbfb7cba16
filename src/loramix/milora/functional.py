"""MiLoRA's numerical pieces, one function each (Zhang et al., arXiv 2410.18035).

Router of one transformer block (paper Eq. 2-3 and Appendix C), for a batch of prompts::

    h      = Pooler(H)                  # (B, d) from the block's input hidden states H (B, T, d), normalized
    logits = g(h) W_r^T                 # (B, N): g = rational / gelu / relu / identity
    p      = softmax(logits)            # (B, N)
    w      = Top-k(p)                   # for the k largest p_i, 0 elsewhere: p_i (the paper's Eq. 3),
                                        #   p_i / Σ_kept p_j, or k · p_i / Σ_kept p_j (MiLoRAConfig.gate_form)

``H`` is taken after the block's input norm by default (``MiLoRAConfig.router_input``). Expert ``i``
of the block (an ordinary LoRA, or DoRA for MiDoRA) then adds ``w_i · Δ_i(x)`` to its linear layer's
output for every token of that sequence. The float64 references these must equal live in
``tests/milora/reference.py``.

Not to be confused with the "minor singular components" MiLoRA (arXiv 2406.09044).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from loramix import kernels

POOLERS = ("attention", "mean", "last", "max")
# MiLoRAConfig.gate_form: what a selected expert's update is multiplied by (see top_k_gates).
GATE_FORMS = ("unit_mean", "normalized", "probability")
ACTIVATIONS = ("rational", "gelu", "relu", "identity")

# The GeLU fit of the rational activation: least squares on this many points of [-FIT_RANGE, FIT_RANGE].
FIT_RANGE = 3.0
FIT_POINTS = 2001


# ----------------------------------------------------------------------------------------------------------------------
# Pooling (paper §3.3 and Appendix C). ``mask`` (B, T) bool marks the tokens that may enter the pool;
# every row must have at least one (the routing context guarantees it). ``None`` means all tokens.
# ----------------------------------------------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooler: str, query: torch.Tensor | None = None):
    """Pool ``hidden`` (B, T, d) over the tokens where ``mask`` is True into (B, d).

    ``"attention"`` is the self-attention pooler of Appendix C: ``a = softmax_t(h_t · query)``,
    ``p = Σ_t a_t h_t`` (``query`` is ``W_sa``, shape (d,)); ``"mean"``, ``"max"`` (per feature) and
    ``"last"`` (the last token in the mask, so left and right padding both work) are the others.
    """
    if pooler == "mean":
        if mask is None:
            return hidden.mean(dim=1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    if pooler == "max":
        if mask is None:
            return hidden.amax(dim=1)
        return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    if pooler == "last":
        if mask is None:
            return hidden[:, -1]
        # index of the last True per row: the first True of the flipped mask (argmax returns the first maximum)
        last = hidden.shape[1] - 1 - mask.flip(-1).to(torch.int8).argmax(dim=-1)
        return hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
    if pooler == "attention":
        # a multiply-and-sum, not a matrix-vector product: BLAS's result for `hidden @ query` depends on the
        # memory alignment of `query` (transformers' load_adapter leaves adapter tensors unaligned), so the
        # same adapter would route differently depending on how it was loaded
        scores = (hidden * query.to(hidden.dtype)).sum(dim=-1)  # (B, T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        return torch.bmm(attn.unsqueeze(1), hidden).squeeze(1)
    raise ValueError(f"unknown pooler {pooler!r}; expected one of {POOLERS}")


# ----------------------------------------------------------------------------------------------------------------------
# Activation (paper §3.4, Eq. 6): Ra(x) = Σ_{j=0..m} a_j x^j / (1 + |Σ_{i=1..n} b_i x^i|)
# ----------------------------------------------------------------------------------------------------------------------


def rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """The rational activation ``P(x) / (1 + |Q(x)|)``, ``numerator`` = (a_0..a_m), ``denominator`` = (b_1..b_n).

    Both polynomials are evaluated with Horner's scheme (fewer roundings than summing powers).
    ``Q`` has no constant term, so the denominator is >= 1 and the function has no poles.
    """
    p = numerator[-1].expand_as(x)
    for coef in numerator.flip(0)[1:]:  # a_{m-1}, ..., a_0
        p = p * x + coef
    q = denominator[-1].expand_as(x)
    for coef in denominator.flip(0)[1:]:  # b_{n-1}, ..., b_1
        q = q * x + coef
    return p / (1.0 + (q * x).abs())


@functools.cache
def rational_gelu_init(m: int, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Coefficients ``(a_0..a_m), (b_1..b_n)`` of a rational of order (m, n) that approximates GeLU.

    Derivation (run once per order, cached): linear least squares, in float64, of
    ``P(x) - GeLU(x)·Q(x) = GeLU(x)`` on ``FIT_POINTS`` evenly spaced points of ``[-3, 3]`` — the
    linearised fit of Padé activation units (Molina et al. 2019). For (6, 5) the fitted ``Q`` is an
    even polynomial that is >= 0, so ``1 + |Q| = 1 + Q`` and the fit holds as is: the max abs error
    against exact (erf) GeLU on [-3, 3] is 7.6e-5 (``tests/milora/test_functional.py`` checks it).
    Outside the fitted range the function grows like ``c·|x|`` on both sides.
    """
    x = torch.linspace(-FIT_RANGE, FIT_RANGE, FIT_POINTS, dtype=torch.float64)
    y = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    powers_p = torch.stack([x**j for j in range(m + 1)], dim=1)
    powers_q = torch.stack([-y * x**i for i in range(1, n + 1)], dim=1)
    design = torch.cat([powers_p, powers_q], dim=1)
    solution = torch.linalg.lstsq(design, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return tuple(solution[: m + 1].tolist()), tuple(solution[m + 1 :].tolist())


def activate(x: torch.Tensor, activation: str, numerator=None, denominator=None) -> torch.Tensor:
    """The router activation ``g``: ``"rational"`` (learnable), ``"gelu"`` (exact erf), ``"relu"``, ``"identity"``."""
    if activation == "rational":
        return rational(x, numerator, denominator)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "relu":
        return F.relu(x)
    if activation == "identity":
        return x
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


# ----------------------------------------------------------------------------------------------------------------------
# Router head (Eq. 3) and experts
# ----------------------------------------------------------------------------------------------------------------------


def top_k_gates(probs: torch.Tensor, top_k: int, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``Top-k`` of Eq. 3: the router weights ``w`` (B, N) and the selection mask (B, N).

    ``w`` is 0 for the experts outside the ``k`` most probable; for the selected ones it depends on ``form``
    (:data:`GATE_FORMS`, ``MiLoRAConfig.gate_form``), with ``S = Σ_selected p_j``:

    * ``"probability"``: ``w_i = p_i``, Eq. 3 as written (Top-k of the softmax output, not renormalised). A
      selected expert's update is scaled by about ``1/N`` at the start (uniform router).
    * ``"normalized"``: ``w_i = p_i / S`` (``Σ w = 1``, as Mixtral's top-k).
    * ``"unit_mean"``: ``w_i = k · p_i / S``: the selected weights average 1, so an expert of a uniform router
      adds its update at LoRA's scale ``lora_alpha / r``; the router still trains through their ratios.

    With ``k = 1`` the last two are the constant 1, and only the balance loss reaches the router.
    """
    if form not in GATE_FORMS:
        raise ValueError(f"gate form must be one of {GATE_FORMS}, got {form!r}.")
    values, index = probs.topk(top_k, dim=-1)
    if form != "probability":
        values = values / values.sum(dim=-1, keepdim=True)
        if form == "unit_mean":
            values = values * top_k
    gates = torch.zeros_like(probs).scatter(-1, index, values)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, True)
    return gates, selected


def route(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    router_weight: torch.Tensor,
    *,
    pooler: str,
    activation: str,
    top_k: int,
    gate_form: str,
    query: torch.Tensor | None = None,
    numerator: torch.Tensor | None = None,
    denominator: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router of one block (paper Eq. 2-3): ``Top-k(softmax(g(Pooler(H)) W_r^T))`` for prompts ``hidden``.

    ``hidden`` (B, T, d) are the block inputs, ``mask`` (B, T) the tokens that may enter the pool (``None``:
    all), ``router_weight`` ``W_r`` (N, d); ``query`` is the attention pooler's ``W_sa`` and
    ``numerator``/``denominator`` the rational activation's coefficients, ``gate_form`` that of
    :func:`top_k_gates`. Returns ``(logits, probs, gates,
    selected)``, each (B, N): logits and probabilities, the router weights ``w`` and the selection mask.

    The one implementation of MiLoRA's routing: the tuner's router layer and the vLLM plugin both call it, so a
    served request routes as ``PeftModel.generate`` routes it. Computed in float32 with autocast off (the rational
    activation evaluates x^6, and float16 logits of large hidden states overflow); the parameters are moved to
    ``hidden``'s device.
    """
    device = hidden.device
    with torch.autocast(device_type=device.type, enabled=False):
        h = hidden.float()
        pooled = pool(h, mask, pooler, None if query is None else query.to(device).float())
        if activation == "rational":
            pooled = rational(pooled, numerator.to(device).float(), denominator.to(device).float())
        else:
            pooled = activate(pooled, activation)
        logits = F.linear(pooled, router_weight.to(device).float())
        probs = torch.softmax(logits, dim=-1)
        gates, selected = top_k_gates(probs, top_k, gate_form)
    return logits, probs, gates, selected


def gated_lora(x, out, lora_A, lora_B, rows, factor, dropout=None) -> torch.Tensor:
    """``out`` plus one expert's gated update ``factor · B A dropout(x)`` on the rows ``rows``.

    The one entry point of an expert's maths (paper Eq. 3: ``w_i · Δ_i(x)``): ``rows`` (S,) are the
    sequences whose prompt selected the expert (``None``: all), ``factor`` (S, 1, ..., 1) their router
    weight times ``lora_alpha / r``. At inference on CUDA a Triton gather-LoRA adds into ``out`` in place
    (:func:`loramix.kernels.segmented_lora`); elsewhere gather, LoRA, scatter-add in PyTorch.
    """
    if dropout is None and not torch.is_grad_enabled() and kernels.use_triton(x):
        rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
        return kernels.segmented_lora(x, lora_A, lora_B, rows, factor.reshape(-1), 1.0, out=out)
    if rows is not None:
        x = x.index_select(0, rows)
    delta = F.linear(F.linear(x if dropout is None else dropout(x), lora_A), lora_B)
    return add_rows(out, delta * factor.to(delta.dtype), rows)


def grouped_lora(x, out, stack_A, stack_B, gather, counts, factor) -> torch.Tensor:
    """``out`` plus the gated updates of ``L`` adapters' experts, each on its own rows (a mixed-adapter batch).

    The grouped form of :func:`gated_lora`, with the same maths per row: row ``gather[l, s]`` (for
    ``s < counts[l]``) gets ``factor[l, s] · B_l A_l x``. Shapes: ``x`` (B, [T,] d_in), ``stack_A``
    (L, d_in, r) = the ``A_l^T`` padded with zero columns to the largest rank, ``stack_B`` (L, r, d_out),
    ``gather`` (L, S) long, ``counts`` (L,) int, ``factor`` (L, S) with 0 on the padding slots (whose
    ``gather`` repeats a real row of the same adapter, so they add exact zeros). On CUDA (inference) one
    Triton launch pair covers every adapter (:func:`loramix.kernels.grouped_lora`, Punica-SGMV style); elsewhere
    one gather, two batched matmuls and one scatter-add, however many adapters the batch holds.
    """
    if not torch.is_grad_enabled() and kernels.use_triton(x):
        return kernels.grouped_lora(x, stack_A, stack_B, gather, counts, factor, out=out)
    num, slots = gather.shape
    rows = x.index_select(0, gather.reshape(-1))  # (L·S, [T,] d_in)
    z = torch.bmm(rows.reshape(num, -1, x.shape[-1]), stack_A)  # (L, S·T, r)
    z = z.view(num, slots, -1, z.shape[-1]) * factor.to(z.dtype).view(num, slots, 1, 1)
    delta = torch.bmm(z.view(num, -1, z.shape[-1]), stack_B)  # (L, S·T, d_out)
    return out.index_add(0, gather.reshape(-1), delta.reshape(num * slots, *out.shape[1:]).to(out.dtype))


def add_rows(out: torch.Tensor, delta: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``out + delta`` (``rows`` None) or ``out`` with ``delta`` added to the rows ``rows``."""
    delta = delta.to(out.dtype)
    return out + delta if rows is None else out.index_add(0, rows, delta)


def lora_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling · B A x`` for ``x`` (..., d_in), ``lora_A`` (r, d_in), ``lora_B`` (d_out, r)."""
    return F.linear(F.linear(x, lora_A), lora_B) * scaling


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
    """Row norms ``||W + scaling · B A||`` (d_out,) of the DoRA-adapted weight (``W`` is d_out x d_in)."""
    return torch.linalg.vector_norm(weight.to(lora_A.dtype) + scaling * (lora_B @ lora_A), dim=1)


def dora_update(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The DoRA update ``W' x - W x`` with ``W' = m ⊙ (W + s·BA) / ||W + s·BA||`` (Liu et al. 2024).

    As PEFT computes it (``peft/tuners/lora/dora.py``, ``DoraLinearLayer.forward``)::

        scale = m / ||W + s·BA||            # norm detached (DoRA §4.3)
        Δ     = (scale - 1) ⊙ (W x) + scale ⊙ s·B A x

    ``base_out`` is ``W x`` without bias. A MiDoRA expert adds ``w_i · Δ`` for its router weight ``w_i``.
    """
    scale = magnitude / weight_norm.detach()
    return (scale - 1) * base_out + scale * lora_update(x, lora_A, lora_B, scaling)
