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

from . import reference
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
def _range(start, BLOCK: tl.constexpr, n):
    """The indices ``start + [0, BLOCK)`` of one block of a dimension of size ``n``, and their mask ``< n``."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < n


@triton.jit
def _tile(ptr, rows, row_ok, stride, cols, col_ok):
    """``ptr[rows, cols]``, a (rows, cols) tile of a matrix with row stride ``stride`` and unit column stride,
    0 where masked. Row offsets are 64-bit (``T · d_in`` may pass 2³¹)."""
    offsets = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    return tl.load(ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _tile_t(ptr, rows, row_ok, stride, cols, col_ok):
    """The same tile transposed: ``ptr[rows, cols]ᵀ``, shape (cols, rows)."""
    offsets = rows.to(tl.int64)[None, :] * stride + cols[:, None]
    return tl.load(ptr + offsets, mask=col_ok[:, None] & row_ok[None, :], other=0.0)


@triton.jit
def _store_tile(ptr, rows, row_ok, stride, cols, col_ok, value):
    """``ptr[rows, cols] = value`` (a (rows, cols) tile, laid out as in :func:`_tile`) in ``ptr``'s dtype."""
    offsets = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _y_factors(P, Z, OA, rows, row_ok, j, j_ok, R: tl.constexpr, N: tl.constexpr):
    """The factors of ``y`` for a (rows, j) tile, float32: ``G[t, j // r]`` and ``z[t, j % r]`` (rows, j), and
    ``Ω_A.flat[j]`` (j,)."""
    p = _tile(P, rows, row_ok, N, j // R, j_ok)
    z = _tile(Z, rows, row_ok, R, j % R, j_ok)
    oa = tl.load(OA + j, mask=j_ok, other=0.0).to(tl.float32)
    return p, z, oa


@triton.jit
def _y_tile(P, Z, OA, rows, row_ok, j, j_ok, R: tl.constexpr, N: tl.constexpr):
    """``y[t, j] = G[t, j // r] · Ω_A.flat[j] · z[t, j % r]`` for a (rows, j) tile, float32."""
    p, z, oa = _y_factors(P, Z, OA, rows, row_ok, j, j_ok, R, N)
    return p * z * oa[None, :]


@triton.jit
def _beff_tile(OB, B, j, j_ok, cols, col_ok, R: tl.constexpr, D_OUT, TRANSPOSED: tl.constexpr):
    """``B_eff[j, o] = Ω_B[j // r, o] · B[o, j % r]`` for a (j, outputs) tile, float32; ``TRANSPOSED``: its
    transpose, an (outputs, j) tile."""
    if TRANSPOSED:
        ob = _tile_t(OB, j // R, j_ok, D_OUT, cols, col_ok)
        b = _tile(B, cols, col_ok, R, j % R, j_ok)
    else:
        ob = _tile(OB, j // R, j_ok, D_OUT, cols, col_ok)
        b = _tile_t(B, cols, col_ok, R, j % R, j_ok)
    return ob.to(tl.float32) * b.to(tl.float32)


@triton.jit
def _x_tiles(X, XR, rows, row_ok, stride_x, stride_xr, cols, col_ok, HAS_ROUTER: tl.constexpr, SAME_X: tl.constexpr):
    """The (rows, cols) tiles of ``x`` and of the router's input ``x_r``. When the router reads ``x`` (or there is
    no router), ``x_r``'s tile is ``x``'s: each tile of ``x`` is then read once for both."""
    x = _tile(X, rows, row_ok, stride_x, cols, col_ok)
    xr = x
    if HAS_ROUTER:
        if not SAME_X:
            xr = _tile(XR, rows, row_ok, stride_xr, cols, col_ok)
    return x, xr


@triton.jit
def _mor_proj_kernel(
    X, XR, stride_x, stride_xr,  # x, x_r (T, d_in), unit stride along d_in
    A, WR,  # A (r, d_in), W_r (N, d_in)
    Z, P,  # written: z (T, r) and G (T, N), float32
    T, D_IN,
    R: tl.constexpr, N: tl.constexpr, HAS_ROUTER: tl.constexpr, SAME_X: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """z = x Aᵀ and G = softmax(x_r W_rᵀ) for a block of tokens, reading each x tile once."""
    rows, row_ok = _range(tl.program_id(0) * BLOCK_T, BLOCK_T, T)
    kr, r_ok = _range(0, BLOCK_R, R)
    kn, n_ok = _range(0, BLOCK_N, N)
    acc_z = tl.full((BLOCK_T, BLOCK_R), 0.0, dtype=tl.float32)
    acc_l = tl.full((BLOCK_T, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        cols, col_ok = _range(k0, BLOCK_K, D_IN)
        x, xr = _x_tiles(X, XR, rows, row_ok, stride_x, stride_xr, cols, col_ok, HAS_ROUTER, SAME_X)
        a = _tile_t(A, kr, r_ok, D_IN, cols, col_ok)  # Aᵀ
        acc_z = tl.dot(x.to(DOT), a.to(DOT), acc_z, input_precision=PREC)
        if HAS_ROUTER:
            w = _tile_t(WR, kn, n_ok, D_IN, cols, col_ok)  # W_rᵀ
            acc_l = tl.dot(xr.to(tl.float32), w.to(tl.float32), acc_l, input_precision="ieee")  # float32 logits
    _store_tile(Z, rows, row_ok, R, kr, r_ok, acc_z)
    if HAS_ROUTER:
        logits = tl.where(n_ok[None, :], acc_l, float("-inf"))
        e = tl.exp(logits - _max(logits, axis=1)[:, None])
        p = e / _sum(e, axis=1)[:, None]
    else:
        p = tl.where(n_ok[None, :], 1.0 / N, 0.0) + tl.full((BLOCK_T, BLOCK_N), 0.0, dtype=tl.float32)
    _store_tile(P, rows, row_ok, N, kn, n_ok, p)


@triton.jit
def _mor_out_kernel(
    P, Z, OA, OB, B,  # G (T, N) and z (T, r) float32, Ω_A (N, r), Ω_B (N, d_out), B (d_out, r)
    RES, stride_res,  # the residual (T, d_out), read if HAS_RES
    OUT, stride_out,  # written: (T, d_out)
    T, D_OUT, scaling,
    R: tl.constexpr, N: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """out = [res +] s · y B_eff for a (tokens, outputs) tile; y and B_eff are rebuilt in registers."""
    rows, row_ok = _range(tl.program_id(0) * BLOCK_T, BLOCK_T, T)
    cols, col_ok = _range(tl.program_id(1) * BLOCK_O, BLOCK_O, D_OUT)
    acc = tl.full((BLOCK_T, BLOCK_O), 0.0, dtype=tl.float32)
    for j0 in range(0, N * R, BLOCK_J):
        j, j_ok = _range(j0, BLOCK_J, N * R)
        y = _y_tile(P, Z, OA, rows, row_ok, j, j_ok, R, N)
        beff = _beff_tile(OB, B, j, j_ok, cols, col_ok, R, D_OUT, False)
        acc = tl.dot(y.to(DOT), beff.to(DOT), acc, input_precision=PREC)
    acc = acc * scaling
    if HAS_RES:
        acc += _tile(RES, rows, row_ok, stride_res, cols, col_ok).to(tl.float32)
    _store_tile(OUT, rows, row_ok, stride_out, cols, col_ok, acc)


@triton.jit
def _mor_bwd_rows_kernel(
    G, stride_g,  # g = ∂L/∂Δo (T, d_out)
    P, Z, OA, OB, B, GP,  # as in _mor_out_kernel; GP: ∂L/∂G (T, N) float32, read if HAS_GP
    DZ, DL, DOA_PART,  # written, float32: dz (T, r), dlogits (T, N), dΩ_A of each token block (blocks, N·r)
    T, D_OUT, scaling,
    R: tl.constexpr, N: tl.constexpr, HAS_ROUTER: tl.constexpr, HAS_GP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per token block: h = s · g B_effᵀ, then dz, dlogits and this block's share of dΩ_A."""
    pid = tl.program_id(0)
    rows, row_ok = _range(pid * BLOCK_T, BLOCK_T, T)
    kr, r_ok = _range(0, BLOCK_R, R)
    kn, n_ok = _range(0, BLOCK_N, N)
    dz = tl.full((BLOCK_T, BLOCK_R), 0.0, dtype=tl.float32)
    dg = tl.full((BLOCK_T, BLOCK_N), 0.0, dtype=tl.float32)
    for j0 in range(0, N * R, BLOCK_J):
        j, j_ok = _range(j0, BLOCK_J, N * R)
        h = tl.full((BLOCK_T, BLOCK_J), 0.0, dtype=tl.float32)
        for o0 in range(0, D_OUT, BLOCK_O):
            cols, col_ok = _range(o0, BLOCK_O, D_OUT)
            g = _tile(G, rows, row_ok, stride_g, cols, col_ok)
            beff_t = _beff_tile(OB, B, j, j_ok, cols, col_ok, R, D_OUT, True)
            h = tl.dot(g.to(DOT), beff_t.to(DOT), h, input_precision=PREC)
        h = h * scaling
        p, z, oa = _y_factors(P, Z, OA, rows, row_ok, j, j_ok, R, N)
        sel_k = tl.where(((j % R)[:, None] == kr[None, :]) & j_ok[:, None], 1.0, 0.0)
        dz = tl.dot(h * p * oa[None, :], sel_k, dz, input_precision="ieee")
        if HAS_ROUTER:
            sel_i = tl.where(((j // R)[:, None] == kn[None, :]) & j_ok[:, None], 1.0, 0.0)
            dg = tl.dot(h * z * oa[None, :], sel_i, dg, input_precision="ieee")
        tl.store(DOA_PART + pid * (N * R) + j, _sum(h * p * z, axis=0), mask=j_ok)
    _store_tile(DZ, rows, row_ok, R, kr, r_ok, dz)
    if HAS_ROUTER:
        if HAS_GP:
            dg += _tile(GP, rows, row_ok, N, kn, n_ok)
        p_full = _tile(P, rows, row_ok, N, kn, n_ok)
        dl = p_full * (dg - _sum(p_full * dg, axis=1)[:, None])
        _store_tile(DL, rows, row_ok, N, kn, n_ok, dl)


@triton.jit
def _mor_bwd_m_kernel(
    G, stride_g,  # g = ∂L/∂Δo (T, d_out)
    P, Z, OA,  # G (T, N) and z (T, r) float32, Ω_A (N, r)
    M_PART,  # written: M of each chunk of tokens (chunks, d_out, N·r), float32
    T, D_OUT, T_CHUNK, scaling,
    R: tl.constexpr, N: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """M = s · gᵀ y over one chunk of tokens, for a (outputs, j) tile; chunks are summed afterwards."""
    cols, col_ok = _range(tl.program_id(0) * BLOCK_O, BLOCK_O, D_OUT)
    j, j_ok = _range(tl.program_id(1) * BLOCK_J, BLOCK_J, N * R)
    pid_s = tl.program_id(2)
    acc = tl.full((BLOCK_O, BLOCK_J), 0.0, dtype=tl.float32)
    start = pid_s * T_CHUNK
    for t0 in range(start, start + T_CHUNK, BLOCK_T):
        rows, row_ok = _range(t0, BLOCK_T, T)
        g_t = _tile_t(G, rows, row_ok, stride_g, cols, col_ok)
        y = _y_tile(P, Z, OA, rows, row_ok, j, j_ok, R, N)
        acc = tl.dot(g_t.to(DOT), y.to(DOT), acc, input_precision=PREC)
    acc = acc * scaling
    _store_tile(M_PART + pid_s * D_OUT * (N * R), cols, col_ok, N * R, j, j_ok, acc)


@triton.jit
def _mor_bwd_dx_kernel(
    DZ, DL,  # dz (T, r) and dlogits (T, N), float32
    A, WR,  # A (r, d_in), W_r (N, d_in)
    DX, DXR, stride_dx, stride_dxr,  # written: dx, dx_r (T, d_in), unit stride along d_in
    T, D_IN,
    R: tl.constexpr, N: tl.constexpr, HAS_ROUTER: tl.constexpr, SAME_X: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dx = dz A (+ dlogits W_r when the router reads the same x; else that goes to dx_r).

    One (tokens, d_in) tile per program, no loop: the reductions, over r and N, are one tile each.
    """
    rows, row_ok = _range(tl.program_id(0) * BLOCK_T, BLOCK_T, T)
    cols, col_ok = _range(tl.program_id(1) * BLOCK_I, BLOCK_I, D_IN)
    kr, r_ok = _range(0, BLOCK_R, R)
    kn, n_ok = _range(0, BLOCK_N, N)
    dz = _tile(DZ, rows, row_ok, R, kr, r_ok)
    a = _tile(A, kr, r_ok, D_IN, cols, col_ok)
    acc = tl.dot(dz.to(DOT), a.to(DOT), input_precision=PREC)
    if HAS_ROUTER:
        dl = _tile(DL, rows, row_ok, N, kn, n_ok)
        w = _tile(WR, kn, n_ok, D_IN, cols, col_ok)
        if SAME_X:
            acc = tl.dot(dl, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc_r = tl.dot(dl, w.to(tl.float32), input_precision="ieee")
            _store_tile(DXR, rows, row_ok, stride_dxr, cols, col_ok, acc_r)
    _store_tile(DX, rows, row_ok, stride_dx, cols, col_ok, acc)


@triton.jit
def _mor_bwd_dw_kernel(
    X, XR, stride_x, stride_xr,  # x, x_r (T, d_in), unit stride along d_in
    DZ, DL,  # dz (T, r) and dlogits (T, N), float32
    DA_PART, DW_PART,  # written: dA (r, d_in) and dW_r (N, d_in) of each chunk of tokens, float32
    T, D_IN, T_CHUNK,
    R: tl.constexpr, N: tl.constexpr, HAS_ROUTER: tl.constexpr, SAME_X: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dA = dzᵀ x and dW_r = dlogitsᵀ x_r over one chunk of tokens, reading each x tile once."""
    cols, col_ok = _range(tl.program_id(0) * BLOCK_I, BLOCK_I, D_IN)
    pid_s = tl.program_id(1)
    kr, r_ok = _range(0, BLOCK_R, R)
    kn, n_ok = _range(0, BLOCK_N, N)
    acc_a = tl.full((BLOCK_R, BLOCK_I), 0.0, dtype=tl.float32)
    acc_w = tl.full((BLOCK_N, BLOCK_I), 0.0, dtype=tl.float32)
    start = pid_s * T_CHUNK
    for t0 in range(start, start + T_CHUNK, BLOCK_T):
        rows, row_ok = _range(t0, BLOCK_T, T)
        x, xr = _x_tiles(X, XR, rows, row_ok, stride_x, stride_xr, cols, col_ok, HAS_ROUTER, SAME_X)
        dz_t = _tile_t(DZ, rows, row_ok, R, kr, r_ok)
        acc_a = tl.dot(dz_t.to(DOT), x.to(DOT), acc_a, input_precision=PREC)
        if HAS_ROUTER:
            acc_w = tl.dot(_tile_t(DL, rows, row_ok, N, kn, n_ok), xr.to(tl.float32), acc_w, input_precision="ieee")
    base = pid_s * D_IN
    _store_tile(DA_PART + base * R, kr, r_ok, D_IN, cols, col_ok, acc_a)
    if HAS_ROUTER:
        _store_tile(DW_PART + base * N, kn, n_ok, D_IN, cols, col_ok, acc_w)


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


def _split(T: int, block_t: int, programs: int, device: torch.device) -> tuple[int, int]:
    """Split a reduction over ``T`` tokens so that at least ~2 programs run per SM (2 chunks on CPU, to test the
    path): ``(chunks, tokens per chunk)``, each chunk a whole number of ``block_t`` token blocks."""
    n_tblocks = triton.cdiv(T, block_t)
    target = 2 * _num_sms(device) if device.type == "cuda" else 2 * programs
    split = max(1, min(n_tblocks, math.ceil(target / max(programs, 1))))
    t_chunk = triton.cdiv(n_tblocks, split) * block_t
    return triton.cdiv(T, t_chunk), t_chunk


def _tiles(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"BLOCK_T": 64, "BLOCK_K": 64, "BLOCK_O": 64, "BLOCK_I": 64}
    return {"BLOCK_T": 16, "BLOCK_K": 32, "BLOCK_O": 32, "BLOCK_I": 32}  # interpreter: small, odd shapes


def _constants(omega_A: torch.Tensor, x: torch.Tensor, compute_dtype: torch.dtype) -> dict:
    """The constexprs of one call's launches: ``R``, ``N``, ``DOT`` and ``PREC``, which every kernel takes, and the
    block sizes: ``BLOCK_T/K/O/I`` for the device, ``BLOCK_R`` / ``BLOCK_N`` (r and N padded), ``BLOCK_J`` (a
    block of the N·r index). :func:`_constexprs` hands each kernel its share."""
    num_experts, rank = omega_A.shape
    return {
        "R": rank, "N": num_experts, "DOT": _dot_dtype(compute_dtype), "PREC": _precision(x, compute_dtype),
        **_tiles(x.device), "BLOCK_R": _pow2(rank), "BLOCK_N": _pow2(num_experts),
        "BLOCK_J": min(64, _pow2(num_experts * rank)),
    }  # fmt: skip


def _constexprs(constants: dict, *blocks: str) -> dict:
    """``R``, ``N``, ``DOT``, ``PREC`` and the block sizes ``blocks`` of :func:`_constants`: one kernel's share."""
    return {name: constants[name] for name in ("R", "N", "DOT", "PREC", *blocks)}


def _rows(t: torch.Tensor, features: int) -> torch.Tensor:
    """``t`` as a (rows, features) matrix with a unit last stride, the layout the kernels address (a view if it can)."""
    t2 = t.reshape(-1, features)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


# --------------------------------------------------------------------------------------------- autograd


class _MoRFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_router, lora_A, lora_B, omega_A, omega_B, router, residual, scaling, compute_dtype):
        ctx.set_materialize_grads(False)
        d_in = x.shape[-1]
        lead = x.shape[:-1]
        x2 = _rows(x, d_in)
        same_x = x_router is None
        xr2 = x2 if same_x else _rows(x_router, d_in)
        A = lora_A.contiguous()
        B = lora_B.contiguous()
        OA = omega_A.contiguous()
        OB = omega_B.contiguous()
        WR = router.contiguous() if router is not None else A  # dummy pointer when there is no router
        c = _constants(OA, x, compute_dtype)
        num_experts, rank, d_out, T = c["N"], c["R"], B.shape[0], x2.shape[0]
        dev = x.device

        z = torch.empty(T, rank, device=dev, dtype=torch.float32)
        probs = torch.empty(T, num_experts, device=dev, dtype=torch.float32)
        _mor_proj_kernel[(triton.cdiv(T, c["BLOCK_T"]),)](
            x2, xr2, x2.stride(0), xr2.stride(0), A, WR, z, probs, T, d_in,
            HAS_ROUTER=router is not None, SAME_X=same_x, **_constexprs(c, "BLOCK_T", "BLOCK_K", "BLOCK_R", "BLOCK_N"),
            **pipeline_options(dev, lhs_in_registers=x2.dtype != compute_dtype),  # autocast: x cast in registers
        )  # fmt: skip

        out = torch.empty(T, d_out, device=dev, dtype=compute_dtype)
        res2 = _rows(residual, d_out) if residual is not None else out
        grid = (triton.cdiv(T, c["BLOCK_T"]), triton.cdiv(d_out, c["BLOCK_O"]))
        _mor_out_kernel[grid](
            probs, z, OA, OB, B, res2, res2.stride(0), out, out.stride(0), T, d_out, float(scaling),
            HAS_RES=residual is not None, **_constexprs(c, "BLOCK_T", "BLOCK_O", "BLOCK_J"),
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
        c = _constants(OA, x2, compute_dtype)
        (T, d_in), d_out = x2.shape, B.shape[0]
        num_experts, rank, nr = c["N"], c["R"], c["N"] * c["R"]
        dev = x2.device
        has_router = router is not None
        WR = router if has_router else A

        if grad_out is None:
            grad_out = torch.zeros(T, d_out, device=dev, dtype=compute_dtype)
        g = _rows(grad_out, d_out)
        gp = grad_probs.reshape(T, num_experts).float().contiguous() if grad_probs is not None else None

        n_tblocks = triton.cdiv(T, c["BLOCK_T"])
        dz = torch.empty(T, rank, device=dev, dtype=torch.float32)
        dl = torch.empty(T, num_experts, device=dev, dtype=torch.float32) if has_router else dz
        doa_part = torch.empty(n_tblocks, nr, device=dev, dtype=torch.float32)
        _mor_bwd_rows_kernel[(n_tblocks,)](
            g, g.stride(0), probs, z, OA, OB, B, gp if gp is not None else probs, dz, dl, doa_part,
            T, d_out, scaling,
            HAS_ROUTER=has_router, HAS_GP=has_router and gp is not None,
            **_constexprs(c, "BLOCK_T", "BLOCK_O", "BLOCK_J", "BLOCK_R", "BLOCK_N"),
            **pipeline_options(dev, lhs_in_registers=g.dtype != compute_dtype),
        )  # fmt: skip

        grad_x = grad_xr = grad_A = grad_B = grad_OA = grad_OB = grad_router = None
        needs = ctx.needs_input_grad  # x, x_router, A, B, Ω_A, Ω_B, router, residual, scaling
        if needs[2] or needs[4]:
            grad_OA = doa_part.sum(0).view(num_experts, rank).to(OA.dtype)
        if needs[3] or needs[5]:
            o_blocks, j_blocks = triton.cdiv(d_out, c["BLOCK_O"]), triton.cdiv(nr, c["BLOCK_J"])
            split, t_chunk = _split(T, c["BLOCK_T"], o_blocks * j_blocks, dev)
            m_part = torch.empty(split, d_out, nr, device=dev, dtype=torch.float32)
            _mor_bwd_m_kernel[(o_blocks, j_blocks, split)](
                g, g.stride(0), probs, z, OA, m_part, T, d_out, t_chunk, scaling,
                **_constexprs(c, "BLOCK_T", "BLOCK_O", "BLOCK_J"),
            )  # fmt: skip
            m = m_part.sum(0).view(d_out, num_experts, rank)
            grad_B = torch.einsum("oik,io->ok", m, OB.float()).to(B.dtype)
            grad_OB = torch.einsum("oik,ok->io", m, B.float()).to(OB.dtype)
        if needs[0] or needs[1]:
            grad_x = torch.empty(T, d_in, device=dev, dtype=x2.dtype)
            grad_xr = grad_x if same_x else torch.empty(T, d_in, device=dev, dtype=xr2.dtype)
            grid = (n_tblocks, triton.cdiv(d_in, c["BLOCK_I"]))
            _mor_bwd_dx_kernel[grid](
                dz, dl, A, WR, grad_x, grad_xr, grad_x.stride(0), grad_xr.stride(0), T, d_in,
                HAS_ROUTER=has_router, SAME_X=same_x, **_constexprs(c, "BLOCK_T", "BLOCK_I", "BLOCK_R", "BLOCK_N"),
            )  # fmt: skip
            grad_x = grad_x.view(*lead, d_in)
            grad_xr = None if same_x or not has_router else grad_xr.view(*lead, d_in)
        if needs[2] or needs[6]:
            i_blocks = triton.cdiv(d_in, c["BLOCK_I"])
            split, t_chunk = _split(T, c["BLOCK_T"], i_blocks, dev)
            da_part = torch.empty(split, rank, d_in, device=dev, dtype=torch.float32)
            dw_part = torch.empty(split, num_experts, d_in, device=dev, dtype=torch.float32) if has_router else da_part
            _mor_bwd_dw_kernel[(i_blocks, split)](
                x2, xr2, x2.stride(0), xr2.stride(0), dz, dl, da_part, dw_part, T, d_in, t_chunk,
                HAS_ROUTER=has_router, SAME_X=same_x, **_constexprs(c, "BLOCK_T", "BLOCK_I", "BLOCK_R", "BLOCK_N"),
                # dz (float32) is cast to a half compute dtype in registers (hardware.py: SM90)
                **pipeline_options(dev, lhs_in_registers=compute_dtype in (torch.float16, torch.bfloat16)),
            )  # fmt: skip
            grad_A = da_part.sum(0).to(A.dtype)
            if has_router:
                grad_router = dw_part.sum(0).to(router.dtype)
        grad_res = grad_out if has_res else None
        return grad_x, grad_xr, grad_A, grad_B, grad_OA, grad_OB, grad_router, grad_res, None, None


@reference.implements(reference.mor_linear)
def mor_linear(x, lora_A, lora_B, omega_A, omega_B, router, scaling, *, x_router=None, residual=None):
    """The MoR update with fused Triton kernels: returns ``(out, probs)`` (contract: :func:`.reference.mor_linear`).

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
