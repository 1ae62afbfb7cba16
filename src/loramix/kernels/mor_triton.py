"""Fused Triton kernels for the MoR update, forward and backward.

The maths is that of :mod:`loramix.mor.functional` (MoR paper Eq. 11 and 15 as one rank-N·r LoRA)::

    z      = A x                         (T, r)      } one pass over x
    G      = softmax(W_r x)              (T, N)      }  (kernel ``_proj``)
    y[t,j] = G[t,i] · Ω_A[i,k] · z[t,k]  j = i·r + k (never stored: rebuilt from G and z in registers)
    B_eff[j,o] = Ω_B[i,o] · B[o,k]                   (never stored: rebuilt from Ω_B and B in registers)
    Δo     = s · y B_eff                             (kernel ``_out``, optionally adding the base output)

Only ``z`` and ``G`` (``T x (r+N)`` floats, float32) are kept for the backward. With ``g = ∂L/∂Δo``
and ``h = s · g B_effᵀ`` (``T x N·r``, rebuilt per token block, never stored)::

    dz     = Σ_i h[:, (i,·)] · G_i · Ω_A[i]      dG_i = Σ_k h[:, (i,k)] · Ω_A[i,k] · z_k
    dΩ_A   = Σ_t h · G · z                       dlogits = G ⊙ (dG − Σ_i G_i dG_i)     (kernel ``_bwd_rows``)
    M      = s · gᵀ y  (d_out x N·r)  → dB[o,k] = Σ_i Ω_B[i,o] M[o,(i,k)],
                                        dΩ_B[i,o] = Σ_k B[o,k] M[o,(i,k)]               (kernel ``_bwd_m``)
    dx     = dz A + dlogits W_r                                                        (kernel ``_bwd_dx``)
    dA     = dzᵀ x,  dW_r = dlogitsᵀ x       (one pass over x)                          (kernel ``_bwd_dw``)

Group sums over the ``(i, k)`` index (``Σ_i`` for dz, ``Σ_k`` for dG) are small matrix products with a
0/1 selection matrix, so any ``N`` and ``r`` work (blocks are padded to powers of two ≥ 16 and masked).
All accumulation is float32. The LoRA tile products use the compute dtype (the input's, or the
autocast dtype: float16 / bfloat16 tensor cores on GPU), except under Triton's CPU interpreter, whose
bfloat16 products are wrong: there every tile is upcast to float32 inside the kernel. The router's
products are float32 always (its logits must not overflow in float16; it has only N rows).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .hardware import pipeline_options

# --------------------------------------------------------------------------------------------- kernels


# Reductions go through ``tl.reduce`` with the standard library's combine functions instead of
# ``tl.sum`` / ``tl.max``: those two (and ``tl.zeros``) are ``@triton.jit`` functions created when
# ``triton`` is first imported, and PEFT imports it; if that happened before ``TRITON_INTERPRET=1``
# was set, the interpreter cannot call them, while it recognises these combine functions and runs
# numpy. Compiled code is the same as ``tl.sum`` / ``tl.max``.
@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _y_tile(P, Z, OA, rows, row_ok, j, j_ok, R: tl.constexpr, N: tl.constexpr):
    """``y[t, j] = G[t, j // r] · Ω_A.flat[j] · z[t, j % r]`` for a (rows, j) tile, float32."""
    ei = j // R
    ek = j % R
    m2 = row_ok[:, None] & j_ok[None, :]
    p = tl.load(P + rows[:, None] * N + ei[None, :], mask=m2, other=0.0)
    z = tl.load(Z + rows[:, None] * R + ek[None, :], mask=m2, other=0.0)
    oa = tl.load(OA + j, mask=j_ok, other=0.0).to(tl.float32)
    return p * z * oa[None, :]


@triton.jit
def _mor_proj_kernel(
    X, XR, A, WR, Z, P,
    T, D_IN, stride_x, stride_xr,
    R: tl.constexpr, N: tl.constexpr, HAS_ROUTER: tl.constexpr, SAME_X: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """z = x Aᵀ and G = softmax(x_r W_rᵀ) for a block of tokens, reading each x tile once."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    kr = tl.arange(0, BLOCK_R)
    kn = tl.arange(0, BLOCK_N)
    acc_z = tl.full((BLOCK_T, BLOCK_R), 0.0, dtype=tl.float32)
    acc_l = tl.full((BLOCK_T, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < D_IN
        x = tl.load(
            X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
        )
        a = tl.load(A + kr[None, :] * D_IN + cols[:, None], mask=(kr < R)[None, :] & col_ok[:, None], other=0.0)
        acc_z = tl.dot(x.to(DOT), a.to(DOT), acc_z, input_precision=PREC)
        if HAS_ROUTER:
            if SAME_X:
                xr = x
            else:
                xr = tl.load(
                    XR + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
            w = tl.load(WR + kn[None, :] * D_IN + cols[:, None], mask=(kn < N)[None, :] & col_ok[:, None], other=0.0)
            acc_l = tl.dot(xr.to(tl.float32), w.to(tl.float32), acc_l, input_precision="ieee")  # float32 logits
    tl.store(Z + rows[:, None] * R + kr[None, :], acc_z, mask=row_ok[:, None] & (kr < R)[None, :])
    n_ok = (kn < N)[None, :]
    if HAS_ROUTER:
        logits = tl.where(n_ok, acc_l, float("-inf"))
        e = tl.exp(logits - _max(logits, axis=1)[:, None])
        p = e / _sum(e, axis=1)[:, None]
    else:
        p = tl.where(n_ok, 1.0 / N, 0.0) + tl.full((BLOCK_T, BLOCK_N), 0.0, dtype=tl.float32)
    tl.store(P + rows[:, None] * N + kn[None, :], p, mask=row_ok[:, None] & n_ok)


@triton.jit
def _mor_out_kernel(
    P, Z, OA, OB, B, RES, OUT,
    T, D_OUT, scaling, stride_res, stride_out,
    R: tl.constexpr, N: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """out = [res +] s · y B_eff for a (tokens, outputs) tile; y and B_eff are rebuilt in registers."""
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    col_ok = cols < D_OUT
    acc = tl.full((BLOCK_T, BLOCK_O), 0.0, dtype=tl.float32)
    for j0 in range(0, N * R, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < N * R
        y = _y_tile(P, Z, OA, rows, row_ok, j, j_ok, R, N)
        m2 = j_ok[:, None] & col_ok[None, :]
        ob = tl.load(OB + (j // R)[:, None] * D_OUT + cols[None, :], mask=m2, other=0.0)
        b = tl.load(B + cols[None, :] * R + (j % R)[:, None], mask=m2, other=0.0)
        beff = ob.to(tl.float32) * b.to(tl.float32)
        acc = tl.dot(y.to(DOT), beff.to(DOT), acc, input_precision=PREC)
    acc = acc * scaling
    m_out = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        acc += tl.load(RES + rows.to(tl.int64)[:, None] * stride_res + cols[None, :], mask=m_out, other=0.0).to(
            tl.float32
        )
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], acc.to(OUT.dtype.element_ty), mask=m_out)


@triton.jit
def _mor_bwd_rows_kernel(
    G, P, Z, OA, OB, B, GP, DZ, DL, DOA_PART,
    T, D_OUT, scaling, stride_g,
    R: tl.constexpr, N: tl.constexpr, HAS_ROUTER: tl.constexpr, HAS_GP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per token block: h = s · g B_effᵀ, then dz, dlogits and this block's share of dΩ_A."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    kr = tl.arange(0, BLOCK_R)
    kn = tl.arange(0, BLOCK_N)
    dz = tl.full((BLOCK_T, BLOCK_R), 0.0, dtype=tl.float32)
    dg = tl.full((BLOCK_T, BLOCK_N), 0.0, dtype=tl.float32)
    for j0 in range(0, N * R, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < N * R
        ei = j // R
        ek = j % R
        h = tl.full((BLOCK_T, BLOCK_J), 0.0, dtype=tl.float32)
        for o0 in range(0, D_OUT, BLOCK_O):
            cols = o0 + tl.arange(0, BLOCK_O)
            col_ok = cols < D_OUT
            g = tl.load(
                G + rows.to(tl.int64)[:, None] * stride_g + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            m2 = col_ok[:, None] & j_ok[None, :]
            ob = tl.load(OB + ei[None, :] * D_OUT + cols[:, None], mask=m2, other=0.0)
            b = tl.load(B + cols[:, None] * R + ek[None, :], mask=m2, other=0.0)
            beff_t = ob.to(tl.float32) * b.to(tl.float32)
            h = tl.dot(g.to(DOT), beff_t.to(DOT), h, input_precision=PREC)
        h = h * scaling
        m2 = row_ok[:, None] & j_ok[None, :]
        p = tl.load(P + rows[:, None] * N + ei[None, :], mask=m2, other=0.0)
        z = tl.load(Z + rows[:, None] * R + ek[None, :], mask=m2, other=0.0)
        oa = tl.load(OA + j, mask=j_ok, other=0.0).to(tl.float32)
        sel_k = tl.where((ek[:, None] == kr[None, :]) & j_ok[:, None], 1.0, 0.0)
        dz = tl.dot(h * p * oa[None, :], sel_k, dz, input_precision="ieee")
        if HAS_ROUTER:
            sel_i = tl.where((ei[:, None] == kn[None, :]) & j_ok[:, None], 1.0, 0.0)
            dg = tl.dot(h * z * oa[None, :], sel_i, dg, input_precision="ieee")
        tl.store(DOA_PART + pid * (N * R) + j, _sum(h * p * z, axis=0), mask=j_ok)
    tl.store(DZ + rows[:, None] * R + kr[None, :], dz, mask=row_ok[:, None] & (kr < R)[None, :])
    if HAS_ROUTER:
        m_n = row_ok[:, None] & (kn < N)[None, :]
        if HAS_GP:
            dg += tl.load(GP + rows[:, None] * N + kn[None, :], mask=m_n, other=0.0)
        p_full = tl.load(P + rows[:, None] * N + kn[None, :], mask=m_n, other=0.0)
        dl = p_full * (dg - _sum(p_full * dg, axis=1)[:, None])
        tl.store(DL + rows[:, None] * N + kn[None, :], dl, mask=m_n)


@triton.jit
def _mor_bwd_m_kernel(
    G, P, Z, OA, M_PART,
    T, D_OUT, T_CHUNK, scaling, stride_g,
    R: tl.constexpr, N: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """M = s · gᵀ y over one chunk of tokens, for a (outputs, j) tile; chunks are summed afterwards."""
    pid_o = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    col_ok = cols < D_OUT
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < N * R
    acc = tl.full((BLOCK_O, BLOCK_J), 0.0, dtype=tl.float32)
    start = pid_s * T_CHUNK
    for t0 in range(start, start + T_CHUNK, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        g_t = tl.load(
            G + rows.to(tl.int64)[None, :] * stride_g + cols[:, None], mask=col_ok[:, None] & row_ok[None, :], other=0.0
        )
        y = _y_tile(P, Z, OA, rows, row_ok, j, j_ok, R, N)
        acc = tl.dot(g_t.to(DOT), y.to(DOT), acc, input_precision=PREC)
    acc = acc * scaling
    out = M_PART + pid_s * D_OUT * (N * R) + cols[:, None] * (N * R) + j[None, :]
    tl.store(out, acc, mask=col_ok[:, None] & j_ok[None, :])


@triton.jit
def _mor_bwd_dx_kernel(
    DZ, DL, A, WR, DX, DXR,
    T, D_IN, stride_dx, stride_dxr,
    R: tl.constexpr, N: tl.constexpr, HAS_ROUTER: tl.constexpr, SAME_X: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dx = dz A (+ dlogits W_r when the router reads the same x; else that goes to dx_r)."""
    pid_t = tl.program_id(0)
    pid_i = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    col_ok = cols < D_IN
    kr = tl.arange(0, BLOCK_R)
    kn = tl.arange(0, BLOCK_N)
    dz = tl.load(DZ + rows[:, None] * R + kr[None, :], mask=row_ok[:, None] & (kr < R)[None, :], other=0.0)
    a = tl.load(A + kr[:, None] * D_IN + cols[None, :], mask=(kr < R)[:, None] & col_ok[None, :], other=0.0)
    acc = tl.dot(dz.to(DOT), a.to(DOT), input_precision=PREC)
    m_out = row_ok[:, None] & col_ok[None, :]
    if HAS_ROUTER:
        dl = tl.load(DL + rows[:, None] * N + kn[None, :], mask=row_ok[:, None] & (kn < N)[None, :], other=0.0)
        w = tl.load(WR + kn[:, None] * D_IN + cols[None, :], mask=(kn < N)[:, None] & col_ok[None, :], other=0.0)
        if SAME_X:
            acc = tl.dot(dl, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc_r = tl.dot(dl, w.to(tl.float32), input_precision="ieee")
            tl.store(
                DXR + rows.to(tl.int64)[:, None] * stride_dxr + cols[None, :],
                acc_r.to(DXR.dtype.element_ty),
                mask=m_out,
            )
    tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + cols[None, :], acc.to(DX.dtype.element_ty), mask=m_out)


@triton.jit
def _mor_bwd_dw_kernel(
    X, XR, DZ, DL, DA_PART, DW_PART,
    T, D_IN, T_CHUNK, stride_x, stride_xr,
    R: tl.constexpr, N: tl.constexpr, HAS_ROUTER: tl.constexpr, SAME_X: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dA = dzᵀ x and dW_r = dlogitsᵀ x_r over one chunk of tokens, reading each x tile once."""
    pid_i = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    col_ok = cols < D_IN
    kr = tl.arange(0, BLOCK_R)
    kn = tl.arange(0, BLOCK_N)
    acc_a = tl.full((BLOCK_R, BLOCK_I), 0.0, dtype=tl.float32)
    acc_w = tl.full((BLOCK_N, BLOCK_I), 0.0, dtype=tl.float32)
    start = pid_s * T_CHUNK
    for t0 in range(start, start + T_CHUNK, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        m_x = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=m_x, other=0.0)
        dz_t = tl.load(DZ + rows[None, :] * R + kr[:, None], mask=(kr < R)[:, None] & row_ok[None, :], other=0.0)
        acc_a = tl.dot(dz_t.to(DOT), x.to(DOT), acc_a, input_precision=PREC)
        if HAS_ROUTER:
            if SAME_X:
                xr = x
            else:
                xr = tl.load(XR + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :], mask=m_x, other=0.0)
            dl_t = tl.load(DL + rows[None, :] * N + kn[:, None], mask=(kn < N)[:, None] & row_ok[None, :], other=0.0)
            acc_w = tl.dot(dl_t, xr.to(tl.float32), acc_w, input_precision="ieee")
    base = pid_s * D_IN
    tl.store(DA_PART + base * R + kr[:, None] * D_IN + cols[None, :], acc_a, mask=(kr < R)[:, None] & col_ok[None, :])
    if HAS_ROUTER:
        tl.store(
            DW_PART + base * N + kn[:, None] * D_IN + cols[None, :], acc_w, mask=(kn < N)[:, None] & col_ok[None, :]
        )


# --------------------------------------------------------------------------------------------- launch helpers


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(int(n)))


def _interpreted() -> bool:
    """Whether these kernels were defined under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter)."""
    return isinstance(_mor_proj_kernel, InterpretedFunction)


def _dot_dtype(dtype: torch.dtype):
    """Tile-product dtype: the input's on GPU; float32 for bfloat16 under the interpreter (its bf16 dot is wrong)."""
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16:
        return tl.float32 if _interpreted() else tl.bfloat16
    return tl.float32


def _precision(x: torch.Tensor, compute_dtype: torch.dtype) -> str | None:
    """float32 products: TF32 only where PyTorch's own matmuls would use it; half products: the default."""
    if compute_dtype in (torch.float16, torch.bfloat16):
        return None
    return "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _split(n_tblocks: int, programs: int, device: torch.device) -> int:
    """Split the token reduction so that at least ~2 programs run per SM (2 chunks on CPU, to test the path)."""
    target = 2 * _num_sms(device) if device.type == "cuda" else 2 * programs
    return max(1, min(n_tblocks, math.ceil(target / max(programs, 1))))


def _tiles(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"BLOCK_T": 64, "BLOCK_K": 64, "BLOCK_O": 64, "BLOCK_I": 64}
    return {"BLOCK_T": 16, "BLOCK_K": 32, "BLOCK_O": 32, "BLOCK_I": 32}  # interpreter: small, odd shapes


# --------------------------------------------------------------------------------------------- autograd


class _MoRFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_router, lora_A, lora_B, omega_A, omega_B, router, residual, scaling, compute_dtype):
        ctx.set_materialize_grads(False)
        d_in = x.shape[-1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, d_in)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        same_x = x_router is None
        xr2 = x2 if same_x else x_router.reshape(-1, d_in)
        if xr2.stride(-1) != 1:
            xr2 = xr2.contiguous()
        A = lora_A.contiguous()
        B = lora_B.contiguous()
        OA = omega_A.contiguous()
        OB = omega_B.contiguous()
        WR = router.contiguous() if router is not None else A  # dummy pointer when there is no router
        num_experts, rank = OA.shape
        d_out = B.shape[0]
        T = x2.shape[0]
        dev = x.device
        tiles = _tiles(dev)
        bt = tiles["BLOCK_T"]
        dot, prec = _dot_dtype(compute_dtype), _precision(x, compute_dtype)
        block_r, block_n = _pow2(rank), _pow2(num_experts)
        block_j = min(64, _pow2(num_experts * rank))

        z = torch.empty(T, rank, device=dev, dtype=torch.float32)
        probs = torch.empty(T, num_experts, device=dev, dtype=torch.float32)
        grid = (triton.cdiv(T, bt),)
        _mor_proj_kernel[grid](
            x2, xr2, A, WR, z, probs, T, d_in, x2.stride(0), xr2.stride(0),
            R=rank, N=num_experts, HAS_ROUTER=router is not None, SAME_X=same_x,
            BLOCK_T=bt, BLOCK_K=tiles["BLOCK_K"], BLOCK_R=block_r, BLOCK_N=block_n, DOT=dot, PREC=prec,
            **pipeline_options(dev, lhs_in_registers=x2.dtype != compute_dtype),  # autocast: x cast in registers
        )  # fmt: skip

        out = torch.empty(T, d_out, device=dev, dtype=compute_dtype)
        res2 = residual.reshape(T, d_out) if residual is not None else out
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        grid = (triton.cdiv(T, bt), triton.cdiv(d_out, tiles["BLOCK_O"]))
        _mor_out_kernel[grid](
            probs, z, OA, OB, B, res2, out, T, d_out, float(scaling), res2.stride(0), out.stride(0),
            R=rank, N=num_experts, HAS_RES=residual is not None,
            BLOCK_T=bt, BLOCK_O=tiles["BLOCK_O"], BLOCK_J=block_j, DOT=dot, PREC=prec,
            **pipeline_options(dev, lhs_in_registers=True),  # y is rebuilt in registers (hardware.py: SM90)
        )  # fmt: skip

        ctx.save_for_backward(x2, xr2 if not same_x else None, A, B, OA, OB, router, z, probs)
        ctx.meta = (lead, same_x, float(scaling), residual is not None, compute_dtype)
        return out.reshape(*lead, d_out), probs.reshape(*lead, num_experts)

    @staticmethod
    def backward(ctx, grad_out, grad_probs):
        x2, xr2, A, B, OA, OB, router, z, probs = ctx.saved_tensors
        lead, same_x, scaling, has_res, compute_dtype = ctx.meta
        if xr2 is None:
            xr2 = x2
        num_experts, rank = OA.shape
        d_out, d_in = B.shape[0], x2.shape[1]
        T = x2.shape[0]
        dev = x2.device
        tiles = _tiles(dev)
        bt = tiles["BLOCK_T"]
        dot, prec = _dot_dtype(compute_dtype), _precision(x2, compute_dtype)
        block_r, block_n = _pow2(rank), _pow2(num_experts)
        nr = num_experts * rank
        block_j = min(64, _pow2(nr))
        has_router = router is not None
        WR = router if has_router else A

        if grad_out is None:
            grad_out = torch.zeros(T, d_out, device=dev, dtype=compute_dtype)
        g = grad_out.reshape(T, d_out)
        if g.stride(-1) != 1:
            g = g.contiguous()
        gp = grad_probs.reshape(T, num_experts).float().contiguous() if grad_probs is not None else None

        n_tblocks = triton.cdiv(T, bt)
        dz = torch.empty(T, rank, device=dev, dtype=torch.float32)
        dl = torch.empty(T, num_experts, device=dev, dtype=torch.float32) if has_router else dz
        doa_part = torch.empty(n_tblocks, nr, device=dev, dtype=torch.float32)
        _mor_bwd_rows_kernel[(n_tblocks,)](
            g, probs, z, OA, OB, B, gp if gp is not None else probs, dz, dl, doa_part,
            T, d_out, scaling, g.stride(0),
            R=rank, N=num_experts, HAS_ROUTER=has_router, HAS_GP=has_router and gp is not None,
            BLOCK_T=bt, BLOCK_O=tiles["BLOCK_O"], BLOCK_J=block_j, BLOCK_R=block_r, BLOCK_N=block_n,
            DOT=dot, PREC=prec, **pipeline_options(dev, lhs_in_registers=g.dtype != compute_dtype),
        )  # fmt: skip

        grad_x = grad_xr = grad_A = grad_B = grad_OA = grad_OB = grad_router = None
        needs = ctx.needs_input_grad  # x, x_router, A, B, Ω_A, Ω_B, router, residual, scaling
        if needs[2] or needs[4]:
            grad_OA = doa_part.sum(0).view(num_experts, rank).to(OA.dtype)
        if needs[3] or needs[5]:
            o_blocks, j_blocks = triton.cdiv(d_out, tiles["BLOCK_O"]), triton.cdiv(nr, block_j)
            split = _split(n_tblocks, o_blocks * j_blocks, dev)
            t_chunk = triton.cdiv(n_tblocks, split) * bt
            split = triton.cdiv(T, t_chunk)
            m_part = torch.empty(split, d_out, nr, device=dev, dtype=torch.float32)
            _mor_bwd_m_kernel[(o_blocks, j_blocks, split)](
                g, probs, z, OA, m_part, T, d_out, t_chunk, scaling, g.stride(0),
                R=rank, N=num_experts, BLOCK_T=bt, BLOCK_O=tiles["BLOCK_O"], BLOCK_J=block_j, DOT=dot, PREC=prec,
            )  # fmt: skip
            m = m_part.sum(0).view(d_out, num_experts, rank)
            grad_B = torch.einsum("oik,io->ok", m, OB.float()).to(B.dtype)
            grad_OB = torch.einsum("oik,ok->io", m, B.float()).to(OB.dtype)
        if needs[0] or needs[1]:
            grad_x = torch.empty(T, d_in, device=dev, dtype=x2.dtype)
            grad_xr = grad_x if same_x else torch.empty(T, d_in, device=dev, dtype=xr2.dtype)
            grid = (n_tblocks, triton.cdiv(d_in, tiles["BLOCK_I"]))
            _mor_bwd_dx_kernel[grid](
                dz, dl, A, WR, grad_x, grad_xr, T, d_in, grad_x.stride(0), grad_xr.stride(0),
                R=rank, N=num_experts, HAS_ROUTER=has_router, SAME_X=same_x,
                BLOCK_T=bt, BLOCK_I=tiles["BLOCK_I"], BLOCK_R=block_r, BLOCK_N=block_n, DOT=dot, PREC=prec,
            )  # fmt: skip
            grad_x = grad_x.view(*lead, d_in)
            grad_xr = None if same_x or not has_router else grad_xr.view(*lead, d_in)
        if needs[2] or needs[6]:
            i_blocks = triton.cdiv(d_in, tiles["BLOCK_I"])
            split = _split(n_tblocks, i_blocks, dev)
            t_chunk = triton.cdiv(n_tblocks, split) * bt
            split = triton.cdiv(T, t_chunk)
            da_part = torch.empty(split, rank, d_in, device=dev, dtype=torch.float32)
            dw_part = torch.empty(split, num_experts, d_in, device=dev, dtype=torch.float32) if has_router else da_part
            _mor_bwd_dw_kernel[(i_blocks, split)](
                x2, xr2, dz, dl, da_part, dw_part, T, d_in, t_chunk, x2.stride(0), xr2.stride(0),
                R=rank, N=num_experts, HAS_ROUTER=has_router, SAME_X=same_x,
                BLOCK_T=bt, BLOCK_I=tiles["BLOCK_I"], BLOCK_R=block_r, BLOCK_N=block_n, DOT=dot, PREC=prec,
                # dz (float32) is cast to a half compute dtype in registers (hardware.py: SM90)
                **pipeline_options(dev, lhs_in_registers=compute_dtype in (torch.float16, torch.bfloat16)),
            )  # fmt: skip
            grad_A = da_part.sum(0).to(A.dtype)
            if has_router:
                grad_router = dw_part.sum(0).to(router.dtype)
        grad_res = grad_out if has_res else None
        return grad_x, grad_xr, grad_A, grad_B, grad_OA, grad_OB, grad_router, grad_res, None, None


def mor_linear(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    omega_A: torch.Tensor,
    omega_B: torch.Tensor,
    router: torch.Tensor | None,
    scaling: float,
    *,
    x_router: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoR update with fused Triton kernels: returns ``(out, probs)``.

    ``out = [residual +] scaling · Σ_i G_i(x_r) · Ω_B[i] ⊙ B (Ω_A[i] ⊙ A x)`` and ``probs = G(x_r)``
    (float32, differentiable, e.g. for a balance loss). ``x_router`` is the router's input when it
    differs from ``x`` (LoRA dropout); by default the router reads ``x``, and each tile of ``x`` is then
    read once for both ``A x`` and ``W_r x``. ``router=None`` is the uniform (mean) router.
    Gradients flow to every tensor argument, in its own dtype.

    ``out`` has ``x``'s dtype, or the autocast dtype under autocast: the LoRA products then run in
    that dtype (tensors are cast tile by tile inside the kernels, nothing is copied), while the
    router logits and softmax are always float32, as in :func:`loramix.mor.functional.router_probs`.

    Shapes: ``x`` (..., d_in), ``lora_A`` (r, d_in), ``lora_B`` (d_out, r), ``omega_A`` (N, r),
    ``omega_B`` (N, d_out), ``router`` (N, d_in), ``residual`` (..., d_out).
    """
    if x_router is x:
        x_router = None
    if x.shape[:-1].numel() == 0:  # nothing to launch: the same maths on empty tensors (zero gradients)
        x_r, n = (x if x_router is None else x_router), omega_A.shape[0]
        if router is None:
            probs = x_r.new_full((*x_r.shape[:-1], n), 1.0 / n, dtype=torch.float32)
        else:
            probs = torch.softmax(x_r.float() @ router.float().T, dim=-1)
        y = (probs.to(x.dtype).unsqueeze(-1) * omega_A * (x @ lora_A.T).unsqueeze(-2)).flatten(-2)
        b_eff = (omega_B.unsqueeze(-1) * lora_B * scaling).transpose(0, 1).reshape(lora_B.shape[0], -1)
        out = y @ b_eff.T
        return (out if residual is None else residual + out.to(residual.dtype)), probs
    device_type = x.device.type
    compute_dtype = x.dtype
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        compute_dtype = torch.get_autocast_dtype(device_type)
    if residual is not None and (residual.dtype != compute_dtype or residual.shape[:-1] != x.shape[:-1]):
        out, probs = _MoRFunction.apply(
            x, x_router, lora_A, lora_B, omega_A, omega_B, router, None, scaling, compute_dtype
        )
        return residual + out.to(residual.dtype), probs
    return _MoRFunction.apply(x, x_router, lora_A, lora_B, omega_A, omega_B, router, residual, scaling, compute_dtype)
