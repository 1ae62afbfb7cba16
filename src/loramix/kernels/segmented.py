"""A LoRA applied only to the rows of a batch that selected it (Triton, Punica-BGMV style).

MiLoRA routes each *sequence* to ``k`` of a layer's LoRA modules. When the sequences of a batch
selected different modules, one module's LoRA must run over the rows that selected it and nothing
else: multiplying the whole batch and zeroing the unselected rows wastes the work, and PyTorch's
``index_select`` → LoRA → ``index_add_`` costs five launches and two copies.

:func:`segmented_lora` does it in two kernels over the *gathered* tokens (the tokens of the selected
rows, addressed through ``rows`` without copying ``x``)::

    shrink:  z[g] = w[row(g)] · s · A x[row(g), t(g)]        (G x r, float32)
    expand:  out[row(g), t(g)] += B z[g]                      (in place, selected rows only)

as Punica's ``bgmv_shrink`` / ``bgmv_expand`` do. Inference only (no autograd).

:func:`grouped_lora` is the mixed-adapter form (Punica's SGMV): the experts of ``L`` adapters in one
batch, each over its own rows, in one shrink and one expand launch per layer whatever ``L`` is. The
adapters' weights come stacked (``(L, d_in, r)`` and ``(L, r, d_out)``, ranks zero-padded) and each
program works on the rows of one adapter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _shrink_kernel(
    X, ROWS, W, A, Z,
    n_gathered, seq_len, D_IN, stride_xb, stride_xt, scaling,
    R: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < n_gathered
    sel = g // seq_len
    row = tl.load(ROWS + sel, mask=g_ok, other=0).to(tl.int64)
    x_off = row * stride_xb + (g % seq_len).to(tl.int64) * stride_xt
    kr = tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_G, BLOCK_R), 0.0, dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < D_IN
        x = tl.load(X + x_off[:, None] + cols[None, :], mask=g_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(A + kr[None, :] * D_IN + cols[:, None], mask=(kr < R)[None, :] & col_ok[:, None], other=0.0)
        acc = tl.dot(x.to(DOT), a.to(DOT), acc, input_precision=PREC)
    acc = acc * scaling
    if HAS_W:
        acc = acc * tl.load(W + sel, mask=g_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(Z + g[:, None] * R + kr[None, :], acc, mask=g_ok[:, None] & (kr < R)[None, :])


@triton.jit
def _expand_kernel(
    Z, ROWS, B, OUT,
    n_gathered, seq_len, D_OUT, stride_ob, stride_ot,
    R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_g = tl.program_id(0)
    pid_o = tl.program_id(1)
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < n_gathered
    row = tl.load(ROWS + g // seq_len, mask=g_ok, other=0).to(tl.int64)
    o_off = row * stride_ob + (g % seq_len).to(tl.int64) * stride_ot
    kr = tl.arange(0, BLOCK_R)
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    col_ok = cols < D_OUT
    z = tl.load(Z + g[:, None] * R + kr[None, :], mask=g_ok[:, None] & (kr < R)[None, :], other=0.0)
    b = tl.load(B + cols[None, :] * R + kr[:, None], mask=(kr < R)[:, None] & col_ok[None, :], other=0.0)
    delta = tl.dot(z.to(DOT), b.to(DOT), input_precision=PREC)
    ptrs = OUT + o_off[:, None] + cols[None, :]
    m = g_ok[:, None] & col_ok[None, :]
    acc = tl.load(ptrs, mask=m, other=0.0).to(tl.float32) + delta
    tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _grouped_shrink_kernel(
    X, GATHER, COUNTS, FACTOR, A, Z,
    slots, seq_len, D_IN, stride_xb, stride_xt, stride_al, stride_ak,
    R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    lora = tl.program_id(0)
    pid = tl.program_id(1)
    n = tl.load(COUNTS + lora) * seq_len  # gathered tokens of this adapter
    if pid * BLOCK_G < n:
        g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
        g_ok = g < n
        slot = lora * slots + g // seq_len
        row = tl.load(GATHER + slot, mask=g_ok, other=0).to(tl.int64)
        x_off = row * stride_xb + (g % seq_len).to(tl.int64) * stride_xt
        kr = tl.arange(0, BLOCK_R)
        a_base = A + lora.to(tl.int64) * stride_al
        acc = tl.full((BLOCK_G, BLOCK_R), 0.0, dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < D_IN
            x = tl.load(X + x_off[:, None] + cols[None, :], mask=g_ok[:, None] & col_ok[None, :], other=0.0)
            a = tl.load(a_base + cols[:, None] * stride_ak + kr[None, :], mask=col_ok[:, None] & (kr < R)[None, :],
                        other=0.0)  # fmt: skip
            acc = tl.dot(x.to(DOT), a.to(DOT), acc, input_precision=PREC)
        acc = acc * tl.load(FACTOR + slot, mask=g_ok, other=0.0).to(tl.float32)[:, None]
        z_off = (lora * slots * seq_len + g).to(tl.int64) * R
        tl.store(Z + z_off[:, None] + kr[None, :], acc, mask=g_ok[:, None] & (kr < R)[None, :])


@triton.jit
def _grouped_expand_kernel(
    Z, GATHER, COUNTS, B, OUT,
    slots, seq_len, D_OUT, stride_ob, stride_ot, stride_bl, stride_br,
    R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    lora = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_o = tl.program_id(2)
    n = tl.load(COUNTS + lora) * seq_len
    if pid_g * BLOCK_G < n:
        g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
        g_ok = g < n
        row = tl.load(GATHER + lora * slots + g // seq_len, mask=g_ok, other=0).to(tl.int64)
        o_off = row * stride_ob + (g % seq_len).to(tl.int64) * stride_ot
        kr = tl.arange(0, BLOCK_R)
        cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        col_ok = cols < D_OUT
        z_off = (lora * slots * seq_len + g).to(tl.int64) * R
        z = tl.load(Z + z_off[:, None] + kr[None, :], mask=g_ok[:, None] & (kr < R)[None, :], other=0.0)
        b_base = B + lora.to(tl.int64) * stride_bl
        b = tl.load(b_base + kr[:, None] * stride_br + cols[None, :], mask=(kr < R)[:, None] & col_ok[None, :],
                    other=0.0)  # fmt: skip
        delta = tl.dot(z.to(DOT), b.to(DOT), input_precision=PREC)
        ptrs = OUT + o_off[:, None] + cols[None, :]
        m = g_ok[:, None] & col_ok[None, :]
        acc = tl.load(ptrs, mask=m, other=0.0).to(tl.float32) + delta
        tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=m)


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not isinstance(_shrink_kernel, InterpretedFunction):
        return tl.bfloat16
    return tl.float32  # float32, and bfloat16 under the interpreter (its bf16 products are wrong)


def segmented_lora(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor | None = None,
    scaling: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
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
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_A, lora_B, weights, out)):
        raise RuntimeError("segmented_lora is an inference kernel (no autograd); call it under torch.no_grad().")
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(1) if squeeze else x
    if x3.dim() != 3:
        raise ValueError(f"x must be (batch, seq, d_in) or (batch, d_in), got shape {tuple(x.shape)}")
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    batch, seq_len, d_in = x3.shape
    rank = lora_A.shape[0]
    d_out = lora_B.shape[0]
    if out is None:
        out = torch.zeros(*x.shape[:-1], d_out, device=x.device, dtype=x.dtype)
    out3 = out.unsqueeze(1) if squeeze else out
    if out3.shape != (batch, seq_len, d_out) or out3.stride(-1) != 1:
        raise ValueError(f"out must be a ({batch}, {seq_len}, {d_out}) tensor with a contiguous last dimension")
    rows = rows.reshape(-1).to(device=x.device, dtype=torch.int32).contiguous()
    n_gathered = rows.numel() * seq_len
    if n_gathered == 0:
        return out
    A = lora_A.contiguous()
    B = lora_B.contiguous()
    w = weights.reshape(-1).contiguous() if weights is not None else rows
    dot = _dot_dtype(x.dtype)
    prec = None if x.dtype in (torch.float16, torch.bfloat16) else "ieee"
    block_r = max(16, triton.next_power_of_2(rank))
    block_g = 16 if n_gathered <= 16 or not x.is_cuda else 64
    block_k, block_o = (64, 64) if x.is_cuda else (32, 32)
    z = torch.empty(n_gathered, rank, device=x.device, dtype=torch.float32)
    _shrink_kernel[(triton.cdiv(n_gathered, block_g),)](
        x3, rows, w, A, z, n_gathered, seq_len, d_in, x3.stride(0), x3.stride(1), float(scaling),
        R=rank, HAS_W=weights is not None, BLOCK_G=block_g, BLOCK_K=block_k, BLOCK_R=block_r, DOT=dot, PREC=prec,
    )  # fmt: skip
    _expand_kernel[(triton.cdiv(n_gathered, block_g), triton.cdiv(d_out, block_o))](
        z, rows, B, out3, n_gathered, seq_len, d_out, out3.stride(0), out3.stride(1),
        R=rank, BLOCK_G=block_g, BLOCK_O=block_o, BLOCK_R=block_r, DOT=dot, PREC=prec,
    )  # fmt: skip
    return out


def segmented_lora_reference(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor | None = None,
    scaling: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same in PyTorch (gather, LoRA, scatter-add): the fallback and the test oracle."""
    if out is None:
        out = torch.zeros(*x.shape[:-1], lora_B.shape[0], device=x.device, dtype=x.dtype)
    rows = rows.reshape(-1).to(device=x.device, dtype=torch.long)
    if rows.numel() == 0:
        return out
    delta = (x.index_select(0, rows) @ lora_A.T.to(x.dtype)) @ lora_B.T.to(x.dtype) * scaling
    if weights is not None:
        delta = delta * weights.to(delta.dtype).reshape(-1, *([1] * (delta.dim() - 1)))
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

    Args:
        x: ``(batch, seq, d_in)`` or ``(batch, d_in)``; the last dimension must be contiguous.
        stack_A: ``(L, d_in, r)``, the adapters' ``A^T`` (ranks zero-padded to ``r``). stack_B: ``(L, r, d_out)``.
        gather: ``(L, S)`` batch rows per adapter; rows must be distinct over all valid slots (one adapter per
            row), which makes the in-place update race-free. counts: ``(L,)`` valid slots per adapter.
        factor: ``(L, S)`` per-row multipliers (router weight times ``lora_alpha / r``).
        out: like ``x`` with ``d_out`` features (the base layer's output).

    Returns ``out``. Inference only: raises if autograd would need to track any argument.
    """
    tensors = (x, stack_A, stack_B, factor, out)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError("grouped_lora is an inference kernel (no autograd); call it under torch.no_grad().")
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(1) if squeeze else x
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    batch, seq_len, d_in = x3.shape
    num, slots = gather.shape
    rank, d_out = stack_A.shape[-1], stack_B.shape[-1]
    if stack_A.shape != (num, d_in, rank) or stack_B.shape != (num, rank, d_out) or factor.shape != (num, slots):
        raise ValueError(
            f"grouped_lora: stack_A {tuple(stack_A.shape)}, stack_B {tuple(stack_B.shape)} and factor "
            f"{tuple(factor.shape)} do not fit x {tuple(x.shape)} and gather {tuple(gather.shape)}."
        )
    out3 = out.unsqueeze(1) if squeeze else out
    if out3.shape != (batch, seq_len, d_out) or out3.stride(-1) != 1:
        raise ValueError(f"out must be a ({batch}, {seq_len}, {d_out}) tensor with a contiguous last dimension")
    A, B = stack_A.contiguous(), stack_B.contiguous()
    gather = gather.to(device=x.device, dtype=torch.int32).contiguous()
    counts = counts.to(device=x.device, dtype=torch.int32).contiguous()
    factor = factor.to(device=x.device, dtype=torch.float32).contiguous()
    dot = _dot_dtype(x.dtype)
    prec = None if x.dtype in (torch.float16, torch.bfloat16) else "ieee"
    block_r = max(16, triton.next_power_of_2(rank))
    tokens = slots * seq_len  # the most gathered tokens of one adapter
    block_g = 16 if tokens <= 16 or not x.is_cuda else 64
    block_k, block_o = (64, 64) if x.is_cuda else (32, 32)
    z = torch.empty(num, tokens, rank, device=x.device, dtype=torch.float32)
    _grouped_shrink_kernel[(num, triton.cdiv(tokens, block_g))](
        x3, gather, counts, factor, A, z, slots, seq_len, d_in, x3.stride(0), x3.stride(1), A.stride(0), A.stride(1),
        R=rank, BLOCK_G=block_g, BLOCK_K=block_k, BLOCK_R=block_r, DOT=dot, PREC=prec,
    )  # fmt: skip
    _grouped_expand_kernel[(num, triton.cdiv(tokens, block_g), triton.cdiv(d_out, block_o))](
        z, gather, counts, B, out3, slots, seq_len, d_out, out3.stride(0), out3.stride(1), B.stride(0), B.stride(1),
        R=rank, BLOCK_G=block_g, BLOCK_O=block_o, BLOCK_R=block_r, DOT=dot, PREC=prec,
    )  # fmt: skip
    return out
