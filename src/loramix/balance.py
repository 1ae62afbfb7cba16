"""The Switch-Transformer load-balancing loss, shared by MoR (per token) and MiLoRA (per prompt)."""

from __future__ import annotations

import torch


def switch_balance_loss(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``N · Σ_i f_i · p̂_i`` over the rows of one layer.

    ``probs`` holds router probabilities ``(..., N)``: one row per token (MoR) or per prompt (MiLoRA).
    ``f_i`` is the fraction of rows whose largest router weight is expert ``i`` and ``p̂_i`` the mean
    router weight of expert ``i`` (Fedus et al. 2022, Eq. 4-6; MiLoRA paper Eq. 4-5); rows where
    ``mask`` is 0 (padding) are left out. It is 1 for a perfectly balanced router and N when every row
    goes to one expert. Only ``p̂`` carries a gradient (``f`` comes from an argmax).
    """
    num_experts = probs.shape[-1]
    probs = probs.reshape(-1, num_experts).float()
    if mask is not None and mask.numel() == probs.shape[0]:
        keep = mask.reshape(-1).to(torch.bool)
        probs = probs[keep]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = torch.nn.functional.one_hot(probs.argmax(dim=-1), num_experts).to(probs.dtype)
    return num_experts * (counts.mean(0) * probs.mean(0)).sum()
