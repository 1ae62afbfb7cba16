"""MoR's served form for vLLM: a rank-(N·r + N) LoRA gated per token (see :mod:`loramix.vllm.convert`).

Because the N rank-r experts share ``A`` and ``B`` (arXiv 2410.13408, Eq. 11/15; :mod:`loramix.mor.functional`),
the mixture is one LoRA of rank N·r, and the router's N rows ride along in the shrink::

    A_served = [Ω_A[0]⊙A; ...; Ω_A[N-1]⊙A; W_router]        # (N·r + N, d_in), row (i, k) = Ω_A[i, k] · A[k]
    B_served = [scaling·Ω_B[0]⊙B, ..., scaling·Ω_B[N-1]⊙B, 0]  # (d_out, N·r + N), column (i, k)

The gate (:class:`MoRGate`, a per-token :class:`~loramix.vllm.gates.TokenGate`) turns the last N buffer columns
into ``G = softmax(router logits)`` and multiplies column block i by ``G_i``, as tensor operations on every token
(no Python per request: it runs in compiled models). With the mean router or a single
expert ``G`` is constant and is folded into ``B``: a plain rank-r LoRA, no gate.

Pure PyTorch; imported by the vLLM plugin only (``Method.served_form``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from loramix.vllm.convert import ServedAdapter, UnservableAdapter, by_module, lora_keys
from loramix.vllm.gates import Gate, TokenGate

# Every token is gated on its own: prompts may be split across steps and prefixes cached.
ROUTES_ON_PROMPT = False


def check_config(config: dict) -> list[str]:
    """The settings of a MoR adapter that the served form does not reproduce exactly."""
    if config.get("bias", "none") != "none":
        return [f"`bias`={config['bias']!r} (trained biases are not LoRA weights)"]
    return []


def served_rank(config: dict) -> tuple[int, str]:
    """``N·(r + 1)`` with a learned router over several experts (the router rows ride along), else ``r``."""
    if config.get("router", "softmax") != "mean" and config["num_experts"] > 1:
        return config["num_experts"] * (config["r"] + 1), "num_experts·r expert ranks + num_experts router rows"
    return int(config["r"]), ""


@dataclass(frozen=True)
class MoRGate(TokenGate):
    """The gate of a MoR module: buffer columns ``[0, N·r)`` are the experts, ``[N·r, N·r + N)`` the router logits.

    Column ``(i, k) = i·r + k`` is multiplied by ``G_i = softmax(router logits)_i`` and the logit columns are set
    to 0 (their ``B`` columns are zero anyway), per token, by :class:`~loramix.vllm.gates.GateTables`.
    """

    num_experts: int
    rank: int

    def columns(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        width = self.num_experts * self.rank
        experts = tuple(c // self.rank for c in range(width))
        return experts, tuple(range(width, width + self.num_experts))


def convert(config: dict, tensors: dict[str, torch.Tensor], hf_config: PretrainedConfig) -> ServedAdapter:
    """MoR as a rank-(N·r [+ N]) LoRA per module; see the module docstring. ``hf_config`` is not needed."""
    scaling = config["lora_alpha"] / config["r"]
    out: dict[str, torch.Tensor] = {}
    gates: dict[str, Gate] = {}
    rank = 0
    for module, p in by_module(tensors, "mor_").items():
        missing = {"A", "B", "omega_A", "omega_B"} - set(p)
        if missing:
            raise UnservableAdapter(f"MoR module '{module}' lacks {sorted(missing)} in the checkpoint.")
        lora_A, lora_B, omega_A, omega_B = p["A"], p["B"], p["omega_A"], p["omega_B"]
        num_experts, r = omega_A.shape
        router = p.get("router")
        if router is not None:  # the file holds P; the router weight is W_r = router_lr_ratio · P (ScaledRouter)
            router = router * config.get("router_lr_ratio", 1.0)
        key_A, key_B = lora_keys(module)
        if router is None or num_experts == 1:
            # G is constant (1/N for the mean router, 1 for a single expert), so the mixture is one rank-r LoRA:
            # ΔW = scaling · ((Σ_i G_i Ω_B[i] ⊗ Ω_A[i]) ⊙ B) A   (mor_delta_weight), computed in float64
            g = torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
            mix = torch.einsum("i,io,ik->ok", g, omega_B.double(), omega_A.double())
            out[key_A], out[key_B] = lora_A, (scaling * mix * lora_B.double()).float()
            rank = max(rank, r)
            continue
        stacked_A = (omega_A.unsqueeze(-1) * lora_A.unsqueeze(0)).reshape(num_experts * r, -1)  # row (i, k)
        # column (i, k) of the served B: scaling · Ω_B[i, o] · B[o, k]
        stacked_B = scaling * omega_B.unsqueeze(1) * lora_B.t().unsqueeze(0)  # (N, r, d_out)
        out[key_A] = torch.cat([stacked_A, router], dim=0)  # (N·r + N, d_in)
        out[key_B] = torch.cat(
            [stacked_B.reshape(num_experts * r, -1).t(), lora_B.new_zeros(lora_B.shape[0], num_experts)], dim=1
        )
        gates[module] = MoRGate(num_experts, r)
        rank = max(rank, num_experts * r + num_experts)
    return ServedAdapter(config["peft_type"], rank, out, gates)
