"""The fused MoR Triton kernels (run by Triton's CPU interpreter) against the PyTorch path, gradients included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramix import MoRConfig, kernels
from loramix.kernels.mor_triton import mor_linear
from loramix.mor.functional import mor_delta, router_probs
from loramix.mor.layer import Linear

# (T, d_in, d_out, r, N): none a multiple of the interpreter's blocks (16 tokens, 32 features).
SHAPES = [(37, 45, 29, 3, 5), (50, 70, 33, 8, 8), (21, 40, 70, 16, 6), (5, 19, 7, 1, 1)]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def make_inputs(T, d_in, d_out, r, n, dtype, *, router=True, separate_router_input=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, mean=0.0):
        return (mean + scale * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()

    return {
        "x": rand(T, d_in),
        "lora_A": rand(r, d_in, scale=d_in**-0.5),
        "lora_B": rand(d_out, r, scale=r**-0.5),
        "omega_A": rand(n, r, mean=1.0, scale=0.5),
        "omega_B": rand(n, d_out, mean=1.0, scale=0.5),
        "router": rand(n, d_in, scale=2 * d_in**-0.5) if router else None,
        "x_router": rand(T, d_in) if separate_router_input else None,
        "residual": rand(T, d_out),
    }


def torch_path(inp, scaling):
    """The PyTorch implementation (loramix.mor.functional) in float64."""
    d = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inp.items()}
    xr = d["x_router"] if d["x_router"] is not None else d["x"]
    probs = router_probs(xr, d["router"], d["omega_A"].shape[0])
    out = d["residual"] + mor_delta(d["x"], d["lora_A"], d["lora_B"], d["omega_A"], d["omega_B"], probs, scaling)
    return d, out, probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_torch_path(shape, dtype):
    T, d_in, d_out, r, n = shape
    inp = make_inputs(T, d_in, d_out, r, n, dtype)
    scaling = 1.7
    out, probs = mor_linear(
        inp["x"], inp["lora_A"], inp["lora_B"], inp["omega_A"], inp["omega_B"], inp["router"], scaling,
        residual=inp["residual"],
    )  # fmt: skip
    assert out.dtype == dtype and out.shape == (T, d_out) and probs.dtype == torch.float32
    ref_inp, ref_out, ref_probs = torch_path(inp, scaling)
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(probs, ref_probs) < 1e-5

    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(T, d_out, generator=g)
    upstream_probs = torch.randn(T, n, generator=g)  # a balance-loss-like use of the router weights
    leaves = [k for k, v in inp.items() if v is not None]
    grads = torch.autograd.grad(
        (out.float() * upstream).sum() + (probs * upstream_probs).sum(), [inp[k] for k in leaves]
    )
    ref = torch.autograd.grad(
        (ref_out * upstream.double()).sum() + (ref_probs * upstream_probs.double()).sum(), [ref_inp[k] for k in leaves]
    )
    for key, actual, expected in zip(leaves, grads, ref, strict=True):
        assert actual.dtype == dtype, key
        assert rel_err(actual, expected) < TOL[dtype], key


@pytest.mark.parametrize("router,separate", [(False, False), (True, True)])
def test_mean_router_and_separate_router_input(router, separate):
    """Uniform router (no W_r), and a router reading x while A reads dropout(x)."""
    inp = make_inputs(29, 37, 23, 4, 3, torch.float32, router=router, separate_router_input=separate, seed=2)
    out, probs = mor_linear(
        inp["x"], inp["lora_A"], inp["lora_B"], inp["omega_A"], inp["omega_B"], inp["router"], 0.5,
        x_router=inp["x_router"], residual=inp["residual"],
    )  # fmt: skip
    ref_inp, ref_out, ref_probs = torch_path(inp, 0.5)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(probs, ref_probs) < 1e-6
    leaves = [k for k, v in inp.items() if v is not None]
    upstream = torch.randn(29, 23)
    grads = torch.autograd.grad((out * upstream).sum(), [inp[k] for k in leaves])
    ref = torch.autograd.grad((ref_out * upstream.double()).sum(), [ref_inp[k] for k in leaves])
    for key, actual, expected in zip(leaves, grads, ref, strict=True):
        assert rel_err(actual, expected) < 1e-5, key


def test_bfloat16_is_upcast_inside_the_kernel():
    """The interpreter's bfloat16 products are wrong; the kernels upcast tiles there, so bf16 still matches."""
    inp = make_inputs(19, 33, 21, 4, 4, torch.bfloat16, seed=3)
    out, _ = mor_linear(
        inp["x"], inp["lora_A"], inp["lora_B"], inp["omega_A"], inp["omega_B"], inp["router"], 2.0,
        residual=inp["residual"],
    )  # fmt: skip
    _, ref_out, _ = torch_path(inp, 2.0)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref_out) < 2e-2


def test_mor_layer_dispatches_to_triton_when_forced():
    """The MoR layer gives the same outputs and gradients on both backends, dropout and 3-D input included."""
    torch.manual_seed(0)
    layer = Linear(nn.Linear(35, 27), "default", MoRConfig(r=4, num_experts=3, lora_dropout=0.3, init_weights=False))
    x = torch.randn(2, 11, 35)
    results = {}
    for name in ("torch", "triton"):
        layer.zero_grad()
        x_leaf = x.clone().requires_grad_()
        torch.manual_seed(5)  # same dropout mask on both paths
        with kernels.backend(name):
            out = layer(x_leaf)
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results[name] = (out.detach(), x_leaf.grad, grads)
    (out_t, gx_t, g_t), (out_k, gx_k, g_k) = results["torch"], results["triton"]
    assert rel_err(out_k, out_t) < 1e-5 and rel_err(gx_k, gx_t) < 1e-5
    assert g_t.keys() == g_k.keys() and len(g_t) == 7  # A, B, Ω_A, Ω_B, router, base weight and bias
    for key in g_t:
        assert rel_err(g_k[key], g_t[key]) < 1e-5, key


def test_autocast_computes_in_the_autocast_dtype_with_float32_router():
    """Under autocast: bfloat16 output, float32 router weights and float32 gradients for float32 tensors."""
    inp = make_inputs(23, 41, 19, 4, 5, torch.float32, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, probs = mor_linear(
            inp["x"], inp["lora_A"], inp["lora_B"], inp["omega_A"], inp["omega_B"], inp["router"], 1.5
        )
    assert out.dtype == torch.bfloat16 and probs.dtype == torch.float32
    inp["residual"] = torch.zeros(23, 19)
    ref_inp, ref_out, ref_probs = torch_path(inp, 1.5)
    assert rel_err(out, ref_out) < 2e-2 and rel_err(probs, ref_probs) < 1e-5
    leaves = ["x", "lora_A", "lora_B", "omega_A", "omega_B", "router"]
    upstream = torch.randn(23, 19)
    grads = torch.autograd.grad((out.float() * upstream).sum(), [inp[k] for k in leaves])
    ref = torch.autograd.grad((ref_out * upstream.double()).sum(), [ref_inp[k] for k in leaves])
    for key, actual, expected in zip(leaves, grads, ref, strict=True):
        assert actual.dtype == torch.float32, key
        assert rel_err(actual, expected) < 3e-2, key


def test_no_tokens():
    inp = make_inputs(0, 12, 10, 2, 3, torch.float32)
    out, probs = mor_linear(
        inp["x"], inp["lora_A"], inp["lora_B"], inp["omega_A"], inp["omega_B"], inp["router"], 1.0,
        residual=inp["residual"],
    )  # fmt: skip
    assert out.shape == (0, 10) and probs.shape == (0, 3)
    out.sum().backward()
    assert inp["lora_A"].grad is not None and inp["lora_A"].grad.abs().sum() == 0
