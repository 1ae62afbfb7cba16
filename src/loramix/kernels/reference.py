"""The maths of each kernel family in plain PyTorch: the guard's fallback and its float64 oracle.

Each function here is the contract (signature, maths) of the Triton entry point of the same name
(:func:`loramix.kernels.mor_linear`, :func:`~loramix.kernels.segmented_lora`,
:func:`~loramix.kernels.grouped_lora`), which declares it with :func:`implements`, and computes what the
library's PyTorch path computes (:mod:`loramix.mor.functional`, :mod:`loramix.milora.functional`). Two uses:

* the fallback: when the guard (``guard.py``) turns a kernel off, the entry point runs this instead, in
  the caller's dtype, so the result is that of the PyTorch path the caller would otherwise have taken;
* the oracle: called on float64 copies of the inputs (autocast off), it is the exact result the guard
  and ``benchmarks/gpu_check.py`` measure the kernels against.

Kept inside ``loramix.kernels`` (rather than imported from ``loramix.mor`` / ``loramix.milora``) so that
the kernels package has no import-time dependency on the rest of the library. The maths is the same as
those modules' and ``tests/kernels`` checks both against the kernels.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

_Fn = TypeVar("_Fn", bound=Callable)


def _parameters(fn: Callable) -> list[tuple]:
    """The names, kinds and defaults of ``fn``'s parameters."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def implements(contract: Callable) -> Callable[[_Fn], _Fn]:
    """Decorator of a Triton entry point that computes ``contract`` (a function of this module) its own way.

    The entry point's ``def`` names the parameters only; their annotations and meaning are the contract's. This
    checks at import time that the names, kinds and defaults are the contract's (the guard binds a call with the
    contract's signature and may hand it to either function) and gives the entry point the contract's annotated
    signature (``help``, ``inspect.signature``).
    """

    def declare(fn: _Fn) -> _Fn:
        if _parameters(fn) != _parameters(contract):
            raise TypeError(f"{fn.__qualname__} must take the parameters of {contract.__qualname__}")
        fn.__signature__ = inspect.signature(contract)
        fn.__annotations__ = dict(contract.__annotations__)
        return fn

    return declare


def router_probs(x: torch.Tensor, router: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """``softmax(x W_rᵀ)`` (..., N), float32 or wider, autocast off; ``router=None``: uniform ``1/N``.

    As :func:`loramix.mor.functional.router_probs`: float32 at least because float16 logits overflow.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    if router is None:
        return x.new_full((*x.shape[:-1], num_experts), 1.0 / num_experts, dtype=dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = F.linear(x.to(dtype), router.to(dtype))
    return torch.softmax(logits, dim=-1)


def mor_linear(
    x: torch.Tensor,  # (..., d_in)
    lora_A: torch.Tensor, lora_B: torch.Tensor,  # (r, d_in), (d_out, r)
    omega_A: torch.Tensor, omega_B: torch.Tensor,  # (N, r), (N, d_out)
    router: torch.Tensor | None,  # (N, d_in); None: the uniform (mean) router
    scaling: float,
    *,
    x_router: torch.Tensor | None = None,  # (..., d_in), the router's input when it is not x
    residual: torch.Tensor | None = None,  # (..., d_out)
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``([residual +] Δo(x), G(x_router))``, the contract :func:`loramix.kernels.mor_triton.mor_linear` implements.

    ``Δo = scaling · Σ_i G_i · Ω_B[i] ⊙ B (Ω_A[i] ⊙ A x)`` in its rank-``N·r`` form, exactly as
    :func:`loramix.mor.functional.mor_delta` computes it (the LoRA products follow autocast; the router
    is float32 with autocast off). Differentiable in every tensor argument.
    """
    num_experts, rank = omega_A.shape
    probs = router_probs(x if x_router is None else x_router, router, num_experts)
    z = F.linear(x, lora_A)  # (..., r)
    gate = probs.to(z.dtype).unsqueeze(-1) * omega_A.to(z.dtype)  # (..., N, r)
    y = (gate * z.unsqueeze(-2)).flatten(-2)  # (..., N·r)
    b_eff = omega_B.unsqueeze(-1) * (lora_B * scaling).unsqueeze(0)  # (N, d_out, r): B_eff[(i,k), o]
    delta = F.linear(y, b_eff.transpose(0, 1).reshape(lora_B.shape[0], num_experts * rank))
    if residual is None:
        return delta, probs
    return residual + delta.to(residual.dtype), probs


def segmented_lora(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor | None = None,
    scaling: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[rows[i]] += weights[i] · scaling · B A x[rows[i]]`` in place (gather, LoRA, scatter-add).

    The contract that :func:`loramix.kernels.segmented.segmented_lora` implements; ``out=None`` starts from zeros.
    """
    if out is None:
        out = torch.zeros(*x.shape[:-1], lora_B.shape[0], device=x.device, dtype=x.dtype)
    rows = rows.reshape(-1).to(device=x.device, dtype=torch.long)
    if rows.numel() == 0:
        return out
    delta = (x.index_select(0, rows) @ lora_A.T.to(x.dtype)) @ lora_B.T.to(x.dtype) * scaling
    if weights is not None:
        delta = delta * weights.to(device=x.device, dtype=delta.dtype).reshape(-1, *([1] * (delta.dim() - 1)))
    out.index_add_(0, rows, delta.to(out.dtype))
    return out


def grouped_lora(
    x: torch.Tensor,
    stack_A: torch.Tensor,
    stack_B: torch.Tensor,
    gather: torch.Tensor,
    counts: torch.Tensor,
    factor: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out[gather[l, s]] += factor[l, s] · x[gather[l, s]] stack_A[l] stack_B[l]`` for ``s < counts[l]``, in place.

    The contract that :func:`loramix.kernels.segmented.grouped_lora` implements, computed as
    :func:`loramix.milora.functional.grouped_lora` does (one gather, two batched matmuls, one scatter-add).
    Slots at or past ``counts[l]`` add exact zeros whatever their ``gather`` and ``factor`` hold, as in the
    kernel, which skips them.
    """
    num, slots = gather.shape
    valid = torch.arange(slots, device=x.device) < counts.to(x.device).reshape(num, 1)  # (L, S)
    gather = torch.where(valid, gather.to(device=x.device, dtype=torch.long), 0)  # any real row: its factor is 0
    weight = factor.to(device=x.device) * valid
    rows = x.index_select(0, gather.reshape(-1))  # (L·S, [T,] d_in)
    z = torch.bmm(rows.reshape(num, -1, x.shape[-1]), stack_A.to(x.dtype))  # (L, S·T, r)
    z = z.view(num, slots, -1, z.shape[-1]) * weight.to(z.dtype).view(num, slots, 1, 1)
    delta = torch.bmm(z.view(num, -1, z.shape[-1]), stack_B.to(x.dtype))  # (L, S·T, d_out)
    out.index_add_(0, gather.reshape(-1), delta.reshape(num * slots, *out.shape[1:]).to(out.dtype))
    return out


__all__ = ["grouped_lora", "implements", "mor_linear", "router_probs", "segmented_lora"]
