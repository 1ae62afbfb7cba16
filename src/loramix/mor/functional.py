"""The MoR mixture as one function (MoR paper, Tang et al. arXiv 2410.13408, Eq. 11 and 15).

Because A and B are shared by the experts, the mixture of N rank-r experts is one LoRA of rank N·r::

    z      = A x                                      # (T, r)
    G      = softmax(W_r x)                           # (T, N), in float32
    Y[i,k] = G_i · Ω_A[i,k] · z[k]                    # (T, N·r)
    B_eff[(i,k), o] = Ω_B[i,o] · B[o,k]               # (N·r, d_out), once per call
    Δo     = scaling · Y B_eff

No Python loop over experts and no (T, N, d_out) tensor: the cost is that of a rank-N·r LoRA plus
the router. The float64 loop over experts it must equal lives in ``tests/mor/reference.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loramix import kernels


def mor_linear(
    x: torch.Tensor,
    residual: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    omega_A: torch.Tensor,
    omega_B: torch.Tensor,
    router: torch.Tensor | None,
    scaling: float,
    dropout: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual + Δo(x), G(x))``: the MoR layer's output and its router probabilities ``(..., N)``.

    The one entry point of the MoR maths: fused Triton kernels where :func:`loramix.kernels.use_triton`
    says so (CUDA by default), else :func:`router_probs` and :func:`mor_delta`. ``dropout`` applies to the
    LoRA input only; the router reads ``x`` itself. ``x`` must already have the adapter's dtype.
    """
    if x.shape[:-1].numel() > 0 and kernels.use_triton(x):
        return kernels.mor_linear(
            dropout(x), lora_A, lora_B, omega_A, omega_B, router, scaling, x_router=x, residual=residual
        )
    probs = router_probs(x, router, omega_A.shape[0])
    delta = mor_delta(dropout(x), lora_A, lora_B, omega_A, omega_B, probs, scaling)
    return residual + delta.to(residual.dtype), probs


def router_probs(x: torch.Tensor, router_weight: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """Per-token router weights ``G(x)`` of shape ``(..., N)``, always float32.

    ``router_weight is None`` is the paper's "mean" router: uniform 1/N, not learnable.
    Logits and softmax are computed in float32 with autocast off: in float16 the logits of
    large-magnitude inputs overflow to inf and the softmax returns NaN. The router has only N rows,
    so the extra precision costs little next to the LoRA product.
    """
    if router_weight is None:
        return x.new_full((*x.shape[:-1], num_experts), 1.0 / num_experts, dtype=torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = F.linear(x.float(), router_weight.float())
    return torch.softmax(logits, dim=-1)


def mor_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    omega_A: torch.Tensor,
    omega_B: torch.Tensor,
    probs: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The MoR update ``Δo = scaling · Σ_i G_i · Ω_B[i] ⊙ B(Ω_A[i] ⊙ A x)`` in the rank-(N·r) form.

    Args:
        x: LoRA input (after dropout), ``(..., d_in)``.
        lora_A: ``(r, d_in)``. lora_B: ``(d_out, r)``.
        omega_A: ``(N, r)``. omega_B: ``(N, d_out)``.
        probs: router weights ``(..., N)`` from :func:`router_probs`.
        scaling: ``lora_alpha / r``.

    Returns:
        ``(..., d_out)`` in the dtype of ``x`` @ ``lora_A`` (the autocast dtype under autocast).
    """
    num_experts, rank = omega_A.shape
    z = F.linear(x, lora_A)  # (..., r)
    gate = probs.to(z.dtype).unsqueeze(-1) * omega_A.to(z.dtype)  # (..., N, r)
    y = (gate * z.unsqueeze(-2)).flatten(-2)  # (..., N·r)
    # B_eff[(i,k), o] = scaling · Ω_B[i,o] · B[o,k]; F.linear wants (out, in) = (d_out, N·r). The scaling goes
    # into this small matrix rather than onto the (..., d_out) output: one pass over the output fewer, each way.
    b_eff = omega_B.unsqueeze(-1) * (lora_B * scaling).unsqueeze(0)
    return F.linear(y, b_eff.transpose(0, 1).reshape(lora_B.shape[0], num_experts * rank))


def grouped_mor(x, out, stack_A, stack_router, expert_bias, stack_omega_A, stack_B, stack_omega_B, gather, valid):
    """``out`` plus the MoR updates of ``L`` adapters, each on its own rows (a mixed-adapter batch), and the
    router probabilities ``(L, S·T, N)``.

    The same maths as :func:`router_probs` and :func:`mor_delta` per row, for all adapters at once: one gather,
    three batched matmuls and one scatter-add, however many adapters the batch holds. Shapes (ranks and expert
    counts zero-padded to the largest): ``x`` (B, T, d_in); ``stack_A`` (L, d_in, r); ``stack_router``
    (L, d_in, N) (zeros for the mean router); ``expert_bias`` (L, N): 0, or ``-inf`` for padded experts;
    ``stack_omega_A`` (L, N, r); ``stack_B`` (L, r, d_out) = ``scaling · B^T``; ``stack_omega_B`` (L, N, d_out);
    ``gather`` (L, S) batch rows per adapter (padding slots repeat a real row); ``valid`` (L, S) 1 for real
    slots, 0 for padding (which then adds exact zeros). ``B_eff`` is built per call, as :func:`mor_delta` does.
    """
    num, slots = gather.shape
    rows = x.index_select(0, gather.reshape(-1)).reshape(num, -1, x.shape[-1])  # (L, S·T, d_in)
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = torch.bmm(rows.float(), stack_router.float()) + expert_bias.unsqueeze(1)
    probs = torch.softmax(logits, dim=-1)  # (L, S·T, N)
    z = torch.bmm(rows, stack_A)  # (L, S·T, r)
    gate = probs.to(z.dtype).unsqueeze(-1) * stack_omega_A.to(z.dtype).unsqueeze(1)  # (L, S·T, N, r)
    y = (gate * z.unsqueeze(-2)).flatten(-2)  # (L, S·T, N·r)
    b_eff = (stack_omega_B.unsqueeze(-2) * stack_B.unsqueeze(1)).flatten(1, 2)  # (L, N·r, d_out), row (i, k)
    delta = torch.bmm(y, b_eff).view(num, slots, -1, b_eff.shape[-1])
    delta = delta * valid.to(delta.dtype).view(num, slots, 1, 1)
    return out.index_add(0, gather.reshape(-1), delta.reshape(num * slots, *out.shape[1:]).to(out.dtype)), probs


def mor_delta_weight(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    omega_A: torch.Tensor,
    omega_B: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The fixed ``ΔW = scaling · Σ_i g_i diag(Ω_B[i]) B diag(Ω_A[i]) A`` for input-independent weights ``g``.

    Only meaningful when G does not depend on x (``num_experts == 1`` or the mean router); that is
    what makes merging exact. Returns ``(d_out, d_in)``.
    """
    # Σ_i g_i Ω_B[i,o] Ω_A[i,k] is an (d_out, r) matrix C; ΔW = (C ⊙ B) A.
    mix = torch.einsum("i,io,ik->ok", expert_weights.to(omega_A.dtype), omega_B, omega_A)
    return (mix * lora_B) @ lora_A * scaling


class _KeepMaskDropout(torch.autograd.Function):
    """Inverted dropout that keeps a 1-byte mask for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


class MoRDropout(torch.nn.Dropout):
    """``nn.Dropout`` for the input of ``A`` that keeps a 1-byte mask for backward on CPU.

    PyTorch's CPU dropout multiplies by a float noise tensor and keeps it for backward (4 bytes per
    input element, per adapted layer); CUDA's fused dropout already keeps a 1-byte mask and is used
    as is. Same distribution as ``nn.Dropout`` (not the same random stream).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0.0 < self.p < 1.0 and not self.inplace and x.device.type == "cpu":
            return _KeepMaskDropout.apply(x, self.p)
        return super().forward(x)
