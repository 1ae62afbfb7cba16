"""Property tests: the MoR layer equals the float64 loop over experts for any shape, rank, expert
count, router, dtype and leading batch shape Hypothesis comes up with.

Tolerances are forward error bounds of the layer's computation in the dtype it runs in (see
:func:`mor_error_bound`), not fixed numbers: each output element may differ from the float64 reference
by at most what rounding in that dtype can explain, given the sizes reduced over and the magnitudes of
the operands. Anything more is a bug.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from loramix import MoRConfig
from loramix.mor.layer import Linear
from tests.mor.reference import mor_linear_reference

D = torch.float64


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: |fl(a op b) - a op b| <= u |a op b| (round to nearest), 2^-24 for float32."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, u: float) -> float:
    """Higham's γ_n = n u / (1 - n u) (Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1): n
    successive roundings multiply a value by at most 1 ± γ_n (Lemma 3.1), and an inner product of length n,
    summed in any order, with or without FMA, is off by at most γ_n |a|ᵀ|b| (eq. 3.5)."""
    assert n * u < 1, (n, u)
    return n * u / (1 - n * u)


def mor_error_bound(x, weight, bias, lora_A, lora_B, omega_A, omega_B, router, scaling, dtype) -> torch.Tensor:
    """Per output element, how far the MoR layer computed in ``dtype`` may be from the exact result.

    The layer (``loramix.mor.functional.mor_linear``, CPU path) computes, each step rounded to ``dtype``::

        o = fl(W x + b) + fl(Σ_(i,k) y_ik · B_eff[(i,k), o]),   y_ik = fl(fl(G_i · Ω_A[i,k]) · fl(A x)_k),
        B_eff[(i,k), o] = fl(Ω_B[i,o] · fl(B[o,k] · s)),        G = softmax(W_r x) in float32

    so, with u the unit roundoff of ``dtype`` and magnitudes |·| taken element-wise (float64)::

        |o - o_exact| <= γ_(d_in+2)(u) · M_base  +  [(1 + ρ)(1 + γ_(d_in+N·r+6)(u)) - 1] · M_Δ  +  floor
        M_base = |W| |x| + |b|                                   (d_in products, + bias, + final add)
        M_Δ    = s Σ_i G_i |Ω_B[i]| ⊙ |B| (|Ω_A[i]| ⊙ |A| |x|)   (d_in for A x, 4 elementwise roundings,
                                                                   N·r for the second product, + final add)
        ρ      = relative error of the float32 router weights G:
                 softmax: logits off by ≤ λ = γ_d_in(u32) · max_j (|W_r| |x|)_j, which moves each G_i by a factor
                 in [e^-2λ, e^2λ], and softmax's own N + 4 roundings (max, exp ≤ 2, sum N-1, reciprocal, product):
                 ρ = expm1(2λ) + γ_(N+4)(u32) e^2λ;   mean router: G = fl32(1/N), ρ = u32
        floor  = gradual underflow (float16 only in practice; bfloat16 and float32 share float32's exponent range):
                 a result below the smallest normal number is off by ≤ η = u · tiny absolutely, not relatively.
                 Each of the ≤ K = d_in + N·r + 6 roundings on a path may do so, amplified by at most what
                 multiplies it afterwards: floor = K η (1 + Σ_(i,k) |B_eff[(i,k),o]| (1 + |Ω_A[i,k]| + (|A||x|)_k)
                 + Σ_(i,k) G_i |Ω_A[i,k]| (|A||x|)_k).

    This is the worst case (constant c = 1, rounding errors all of one sign; Higham eq. 3.5 and Lemma 3.3
    for chaining γ's): it holds for every input, so no seed can make it flaky, and it is linear in the lengths
    d_in and N·r reduced over. Measured on 4,600 random cases: at most 0.63 of it (d_in = 1: a few roundings, all
    near maximal), typically 10-100x below. A wrong sign, a missing Ω or G factor or a scaling off by 0.1% moves o
    by far more in float32 (in half precision only gross errors stand out against K · u). The float64 reference's
    own error (u64 ≈ 1.1e-16) is 10^9 times below u32 and ignored.
    """
    u, u32 = unit_roundoff(dtype), unit_roundoff(torch.float32)
    d_in = x.shape[-1]
    n, r = omega_A.shape
    ax = x.to(D).abs()
    abs_A, abs_B = lora_A.to(D).abs(), lora_B.to(D).abs()
    abs_omega_A, abs_omega_B = omega_A.to(D).abs(), omega_B.to(D).abs()
    m_base = ax @ weight.to(D).abs().T + (0.0 if bias is None else bias.to(D).abs())
    if router is None:
        probs = torch.full((*x.shape[:-1], n), 1.0 / n, dtype=D)
        rho = u32
    else:
        probs = torch.softmax(x.to(D) @ router.to(D).T, dim=-1)
        lam = gamma(d_in, u32) * (ax @ router.to(D).abs().T).amax(-1, keepdim=True)
        rho = torch.expm1(2 * lam) + gamma(n + 4, u32) * torch.exp(2 * lam)
    z = ax @ abs_A.T  # (..., r): magnitude of A x
    y = probs.unsqueeze(-1) * abs_omega_A * z.unsqueeze(-2)  # (..., N, r): magnitude of y_ik
    b_eff = scaling * abs_omega_B.unsqueeze(-1) * abs_B  # (N, d_out, r): |B_eff[(i,k), o]|, indexed [i, o, k]
    m_delta = torch.einsum("...ik,iok->...o", y, b_eff)
    k = d_in + n * r + 6
    bound = gamma(d_in + 2, u) * m_base + ((1 + rho) * (1 + gamma(k, u)) - 1) * m_delta
    eta = u * torch.finfo(dtype).tiny
    paths = torch.einsum("...ik,iok->...o", 1 + abs_omega_A + z.unsqueeze(-2), b_eff)
    amplification = 1 + paths + y.sum((-2, -1)).unsqueeze(-1)
    return bound + k * eta * amplification


@st.composite
def layer_cases(draw):
    return dict(
        d_in=draw(st.integers(1, 48)),
        d_out=draw(st.integers(1, 48)),
        r=draw(st.integers(1, 12)),
        n=draw(st.integers(1, 10)),
        lead=tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))) + (draw(st.integers(1, 6)),),
        router=draw(st.sampled_from(["softmax", "mean"])),
        bias=draw(st.booleans()),
        scale=draw(st.sampled_from([1e-3, 1.0, 30.0])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(layer_cases())
def test_layer_equals_reference(case):
    torch.manual_seed(case["seed"])
    base = nn.Linear(case["d_in"], case["d_out"], bias=case["bias"])
    config = MoRConfig(
        r=case["r"], lora_alpha=16, num_experts=case["n"], router=case["router"], lora_dropout=0.0, init_weights=False
    )
    layer = Linear(base, "default", config).to(case["dtype"])
    x = (torch.randn(*case["lead"], case["d_in"]) * case["scale"]).to(case["dtype"])
    out = layer(x)
    assert out.dtype == case["dtype"] and out.shape == (*case["lead"], case["d_out"]), (out.dtype, out.shape, case)
    assert torch.isfinite(out).all(), case
    router = layer.mor_router["default"] if case["router"] == "softmax" else None
    args = (
        x, base.weight, base.bias, layer.mor_A["default"], layer.mor_B["default"], layer.mor_omega_A["default"],
        layer.mor_omega_B["default"], router, layer.scaling["default"],
    )  # fmt: skip
    expected = mor_linear_reference(*args)
    bound = mor_error_bound(*args, case["dtype"])
    error = (out.double() - expected).abs()
    worst = int((error / bound).argmax())
    assert (error <= bound).all(), (
        f"{int((error > bound).sum())} of {error.numel()} outputs beyond the rounding bound; worst: error "
        f"{error.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} (output "
        f"{out.flatten()[worst].item():.6g}, reference {expected.flatten()[worst].item():.6g}); {case}"
    )


@settings(max_examples=40)
@given(layer_cases())
def test_router_weights_are_a_distribution(case):
    """Whatever the input magnitude, the router's weights are finite, non-negative and sum to 1 in float32."""
    from loramix.mor.functional import router_probs

    torch.manual_seed(case["seed"])
    router = torch.randn(case["n"], case["d_in"]).to(case["dtype"])
    # up to ~3e4 (float16's largest finite value is 65504): large but representable inputs
    x = (torch.randn(*case["lead"], case["d_in"]) * case["scale"] * 1e3).clamp(-6e4, 6e4).to(case["dtype"])
    probs = router_probs(x, router if case["router"] == "softmax" else None, case["n"])
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all() and (probs >= 0).all(), (probs, case)
    # softmax divides by its own float32 sum S = fl(Σ_j e_j) (N - 1 roundings, in any order) with ≤ 2 more
    # roundings (reciprocal, product), so Σ_i p_i = (Σ_j e_j / S)(1 + θ_2), whatever the logits: summed here in
    # float64, |Σ p - 1| <= γ_(N+1)(u32) (≈ 6.6e-7 for N = 10); the mean router's N · fl32(1/N) is within u32.
    tolerance = gamma(case["n"] + 1, unit_roundoff(torch.float32))
    total = probs.double().sum(-1)
    assert ((total - 1).abs() <= tolerance).all(), ((total - 1).abs().max().item(), tolerance, case)
