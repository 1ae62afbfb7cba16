"""Independent float64 reference for the MoR layer: a plain loop over experts, as in the paper.

    G(x) = softmax(W_r x);   o = W x + b + (α/r) Σ_i G_i(x) · Ω_B[i] ⊙ B (Ω_A[i] ⊙ (A x))

Written without any code from ``loramix`` so that the tests compare two separate derivations.
"""

from __future__ import annotations

import torch


def mor_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    omega_A: torch.Tensor,
    omega_B: torch.Tensor,
    router: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """The MoR linear in float64 (every argument is upcast); ``router=None`` means uniform 1/N."""
    d = torch.float64
    x, weight, lora_A, lora_B, omega_A, omega_B = (t.to(d) for t in (x, weight, lora_A, lora_B, omega_A, omega_B))
    num_experts = omega_A.shape[0]
    out = x @ weight.T
    if bias is not None:
        out = out + bias.to(d)
    if router is None:
        gates = torch.full((*x.shape[:-1], num_experts), 1.0 / num_experts, dtype=d)
    else:
        gates = torch.softmax(x @ router.to(d).T, dim=-1)
    for i in range(num_experts):
        expert = ((x @ lora_A.T) * omega_A[i]) @ lora_B.T * omega_B[i]
        out = out + scaling * gates[..., i : i + 1] * expert
    return out
