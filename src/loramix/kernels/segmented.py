"""LoRAs applied only to the rows of a batch that use them (Triton, Punica style).

MiLoRA routes each *sequence* to ``k`` of a layer's LoRA modules. When the sequences of a batch
selected different modules, one module's LoRA must run over the rows that selected it and nothing
else: multiplying the whole batch and zeroing the unselected rows wastes the work, and PyTorch's
``index_select`` → LoRA → ``index_add_`` costs five launches and two copies.

One kernel pair does it over the *gathered* tokens (the tokens of the selected rows, addressed through
``gather`` without copying ``x``), for ``L`` LoRAs at once, each on its own rows::

    shrink:  z[l, g] = w[l, row(g)] · A_l x[row(g), t(g)]          (float32)
    expand:  out[row(g), t(g)] += B_l z[l, g]                       (in place, selected rows only)

with one program block per LoRA and block of its tokens (Punica's SGMV; its BGMV for ``L = 1``).

* :func:`segmented_lora`: one LoRA on selected rows (MiLoRA decoding, one adapter);
* :func:`grouped_lora`: the LoRAs of several adapters, each on its own rows, in one launch pair per layer
  whatever their number (mixed-adapter batches). Their weights come stacked, ranks zero-padded.

Inference only (no autograd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import reference
from .hardware import pipeline_options


@triton.jit
def _tokens(GATHER, lora, pid, n, slots, seq_len, stride_b, stride_t, R: tl.constexpr, BLOCK_G: tl.constexpr):
    """Block ``pid`` of LoRA ``lora``'s ``n`` gathered tokens ``g`` (row ``gather[lora, g // seq_len]``, position
    ``g % seq_len``): their mask, their slot (index into ``gather`` / ``factor``), their offset in a
    (batch, seq, ·) tensor of strides ``(stride_b, stride_t)`` and the offset of their row of ``z``."""
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < n
    slot = lora * slots + g // seq_len
    row = tl.load(GATHER + slot, mask=g_ok, other=0).to(tl.int64)
    offset = row * stride_b + (g % seq_len).to(tl.int64) * stride_t
    z_off = (lora * slots * seq_len + g).to(tl.int64) * R
    return g_ok, slot, offset, z_off


@triton.jit
def _grouped_shrink_kernel(
    X, stride_xb, stride_xt, D_IN,  # x (batch, seq, d_in), unit stride along d_in
    A, stride_al, stride_ak, stride_ar,  # the LoRAs' Aᵀ (L, d_in, r)
    GATHER, COUNTS, FACTOR, slots, seq_len,  # gather and factor (L, slots), counts (L,); seq_len tokens a row
    Z,  # written: z (L, slots · seq_len, r), float32
    R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """z[l, g] = factor · A_l x[row(g), t(g)] for a block of LoRA l's gathered tokens."""
    lora = tl.program_id(0)
    pid = tl.program_id(1)
    n = tl.load(COUNTS + lora) * seq_len  # gathered tokens of this LoRA
    if pid * BLOCK_G < n:
        g_ok, slot, x_off, z_off = _tokens(GATHER, lora, pid, n, slots, seq_len, stride_xb, stride_xt, R, BLOCK_G)
        kr = tl.arange(0, BLOCK_R)
        a_base = A + lora.to(tl.int64) * stride_al
        acc = tl.full((BLOCK_G, BLOCK_R), 0.0, dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < D_IN
            x = tl.load(X + x_off[:, None] + cols[None, :], mask=g_ok[:, None] & col_ok[None, :], other=0.0)
            a = tl.load(a_base + cols[:, None] * stride_ak + kr[None, :] * stride_ar,
                        mask=col_ok[:, None] & (kr < R)[None, :], other=0.0)  # fmt: skip
            acc = tl.dot(x.to(DOT), a.to(DOT), acc, input_precision=PREC)
        acc = acc * tl.load(FACTOR + slot, mask=g_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(Z + z_off[:, None] + kr[None, :], acc, mask=g_ok[:, None] & (kr < R)[None, :])


@triton.jit
def _grouped_expand_kernel(
    Z,  # z (L, slots · seq_len, r), float32, from the shrink
    B, stride_bl, stride_br, stride_bo,  # the LoRAs' Bᵀ (L, r, d_out)
    GATHER, COUNTS, slots, seq_len,  # gather (L, slots), counts (L,); seq_len tokens a row
    OUT, stride_ob, stride_ot, D_OUT,  # added to in place: out (batch, seq, d_out), unit stride along d_out
    R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """out[row(g), t(g)] += B_l z[l, g] for a block of LoRA l's gathered tokens and a block of outputs."""
    lora = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_o = tl.program_id(2)
    n = tl.load(COUNTS + lora) * seq_len
    if pid_g * BLOCK_G < n:
        g_ok, _, o_off, z_off = _tokens(GATHER, lora, pid_g, n, slots, seq_len, stride_ob, stride_ot, R, BLOCK_G)
        kr = tl.arange(0, BLOCK_R)
        cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        col_ok = cols < D_OUT
        z = tl.load(Z + z_off[:, None] + kr[None, :], mask=g_ok[:, None] & (kr < R)[None, :], other=0.0)
        b_base = B + lora.to(tl.int64) * stride_bl
        b = tl.load(b_base + kr[:, None] * stride_br + cols[None, :] * stride_bo,
                    mask=(kr < R)[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        delta = tl.dot(z.to(DOT), b.to(DOT), input_precision=PREC)
        ptrs = OUT + o_off[:, None] + cols[None, :]
        m = g_ok[:, None] & col_ok[None, :]
        acc = tl.load(ptrs, mask=m, other=0.0).to(tl.float32) + delta
        tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=m)


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not isinstance(_grouped_shrink_kernel, InterpretedFunction):
        return tl.bfloat16
    return tl.float32  # float32, and bfloat16 under the interpreter (its bf16 products are wrong)


def _as_3d(x: torch.Tensor, out: torch.Tensor, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``out`` as ``(batch, seq, features)`` views with a contiguous last dimension."""
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(1) if squeeze else x
    if x3.dim() != 3:
        raise ValueError(f"x must be (batch, seq, d_in) or (batch, d_in), got shape {tuple(x.shape)}")
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    batch, seq_len, _ = x3.shape
    out3 = out.unsqueeze(1) if squeeze else out
    if out3.shape != (batch, seq_len, d_out) or out3.stride(-1) != 1:
        raise ValueError(f"out must be a ({batch}, {seq_len}, {d_out}) tensor with a contiguous last dimension")
    return x3, out3


def _launch(x3, out3, stack_A, stack_B, gather, counts, factor) -> None:
    """Both kernels for ``x3`` / ``out3`` (3-D), ``stack_A`` (L, d_in, r) and ``stack_B`` (L, r, d_out) of any
    strides, ``gather``/``factor`` (L, S), ``counts`` (L,)."""
    num, slots = gather.shape
    _, seq_len, d_in = x3.shape
    rank, d_out = stack_A.shape[-1], stack_B.shape[-1]
    gather = gather.to(device=x3.device, dtype=torch.int32).contiguous()
    counts = counts.to(device=x3.device, dtype=torch.int32).contiguous()
    factor = factor.to(device=x3.device, dtype=torch.float32).contiguous()
    dot = _dot_dtype(x3.dtype)
    prec = None if x3.dtype in (torch.float16, torch.bfloat16) else "ieee"
    block_r = max(16, triton.next_power_of_2(rank))
    tokens = slots * seq_len  # the most gathered tokens of one LoRA
    block_g = 16 if tokens <= 16 or not x3.is_cuda else 64
    block_k, block_o = (64, 64) if x3.is_cuda else (32, 32)
    z = torch.empty(num, tokens, rank, device=x3.device, dtype=torch.float32)
    A, B = stack_A, stack_B
    _grouped_shrink_kernel[(num, triton.cdiv(tokens, block_g))](
        x3, x3.stride(0), x3.stride(1), d_in, A, A.stride(0), A.stride(1), A.stride(2),
        gather, counts, factor, slots, seq_len, z,
        R=rank, BLOCK_G=block_g, BLOCK_K=block_k, BLOCK_R=block_r, DOT=dot, PREC=prec,
    )  # fmt: skip
    _grouped_expand_kernel[(num, triton.cdiv(tokens, block_g), triton.cdiv(d_out, block_o))](
        z, B, B.stride(0), B.stride(1), B.stride(2), gather, counts, slots, seq_len,
        out3, out3.stride(0), out3.stride(1), d_out,
        R=rank, BLOCK_G=block_g, BLOCK_O=block_o, BLOCK_R=block_r, DOT=dot, PREC=prec,
        # the float32 shrink output is cast in registers: vLLM's expand pattern (hardware.py: SM90, triton#9433)
        **pipeline_options(x3.device, lhs_in_registers=True),
    )  # fmt: skip


def _refuse_autograd(name: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{name} is an inference kernel (no autograd); call it under torch.no_grad().")


@reference.implements(reference.segmented_lora)
def segmented_lora(x, lora_A, lora_B, rows, weights=None, scaling=1.0, out=None):
    """``out[rows[i]] += weights[i] · scaling · B A x[rows[i]]``, touching only the selected rows.

    Args:
        x: ``(batch, seq, d_in)`` or ``(batch, d_in)``; the last dimension must be contiguous.
        lora_A: ``(r, d_in)``. lora_B: ``(d_out, r)``.
        rows: integer tensor ``(S,)`` of distinct batch indices (sequences) that use this LoRA.
        weights: ``(S,)`` per-row multipliers (e.g. MiLoRA's router weights), or ``None`` for 1.
        scaling: the LoRA scaling ``lora_alpha / r``.
        out: ``(batch, seq, d_out)`` (or 2-D like ``x``) to add into **in place** (e.g. the base
            layer's output); ``None`` allocates zeros, so unselected rows are 0.

    Returns:
        ``out``. Inference only: raises if autograd would need to track any argument.
    """
    _refuse_autograd("segmented_lora", x, lora_A, lora_B, weights, out)
    d_out = lora_B.shape[0]
    if out is None:
        out = torch.zeros(*x.shape[:-1], d_out, device=x.device, dtype=x.dtype)
    x3, out3 = _as_3d(x, out, d_out)
    rows = rows.reshape(1, -1).to(device=x.device)
    if rows.numel() == 0:
        return out
    factor = torch.full(rows.shape, float(scaling), device=x.device)
    if weights is not None:
        factor = factor * weights.reshape(1, -1).to(device=x.device, dtype=torch.float32)
    counts = torch.tensor([rows.shape[1]], dtype=torch.int32, device=x.device)
    # one LoRA of the grouped kernels: A^T and B^T as strided views, no copy
    _launch(x3, out3, lora_A.T.unsqueeze(0), lora_B.T.unsqueeze(0), rows, counts, factor)
    return out


# The same in PyTorch (gather, LoRA, scatter-add): the fallback and the test oracle (kernels/reference.py).
segmented_lora_reference = reference.segmented_lora


@reference.implements(reference.grouped_lora)
def grouped_lora(x, stack_A, stack_B, gather, counts, factor, out):
    """``out[gather[l, s]] += factor[l, s] · x[gather[l, s]] stack_A[l] stack_B[l]`` for ``s < counts[l]``, in place.

    Args:
        x: ``(batch, seq, d_in)`` or ``(batch, d_in)``; the last dimension must be contiguous.
        stack_A: ``(L, d_in, r)``, the adapters' ``A^T`` (ranks zero-padded to ``r``). stack_B: ``(L, r, d_out)``.
        gather: ``(L, S)`` batch rows per adapter; rows must be distinct over all valid slots (one adapter per
            row), which makes the in-place update race-free. counts: ``(L,)`` valid slots per adapter, each
            at most ``S`` (not checked on the device: callers build them so).
        factor: ``(L, S)`` per-row multipliers (router weight times ``lora_alpha / r``).
        out: like ``x`` with ``d_out`` features (the base layer's output).

    Returns ``out``. Inference only: raises if autograd would need to track any argument.
    """
    _refuse_autograd("grouped_lora", x, stack_A, stack_B, factor, out)
    num, slots = gather.shape
    d_in, rank, d_out = x.shape[-1], stack_A.shape[-1], stack_B.shape[-1]
    if stack_A.shape != (num, d_in, rank) or stack_B.shape != (num, rank, d_out) or factor.shape != (num, slots):
        raise ValueError(
            f"grouped_lora: stack_A {tuple(stack_A.shape)}, stack_B {tuple(stack_B.shape)} and factor "
            f"{tuple(factor.shape)} do not fit x {tuple(x.shape)} and gather {tuple(gather.shape)}."
        )
    x3, out3 = _as_3d(x, out, d_out)
    _launch(x3, out3, stack_A, stack_B, gather, counts, factor)
    return out
