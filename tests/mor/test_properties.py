"""Property tests: the MoR layer equals the float64 loop over experts for any shape, rank, expert
count, router, dtype and leading batch shape Hypothesis comes up with."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from loramix import MoRConfig
from loramix.mor.layer import Linear
from tests.mor.reference import mor_linear_reference

# Relative tolerance per compute dtype: float32 to 1e-6 as the foundation issue demands; half
# precision only to its own resolution (the reference is float64 on the same half-rounded inputs).
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 5e-3}


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


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    assert out.dtype == case["dtype"] and out.shape == (*case["lead"], case["d_out"])
    assert torch.isfinite(out).all()
    expected = mor_linear_reference(
        x,
        base.weight,
        base.bias,
        layer.mor_A["default"],
        layer.mor_B["default"],
        layer.mor_omega_A["default"],
        layer.mor_omega_B["default"],
        layer.mor_router["default"] if case["router"] == "softmax" else None,
        layer.scaling["default"],
    )
    # Relative to the size of the summands, not of their sum: when W x and the update nearly cancel
    # (Hypothesis finds such cases, e.g. d_out = 1), rounding error is still bounded by the summands.
    base_part = x.double() @ base.weight.double().T
    scale = base_part.norm() + (expected - base_part).norm()
    error = (out.double() - expected).norm() / scale.clamp_min(1e-12)
    assert error < TOLERANCE[case["dtype"]], (error.item(), case)


@settings(max_examples=40, deadline=None)
@given(layer_cases())
def test_router_weights_are_a_distribution(case):
    """Whatever the input magnitude, the router's weights are finite, non-negative and sum to 1 in float32."""
    from loramix.mor.functional import router_probs

    torch.manual_seed(case["seed"])
    router = torch.randn(case["n"], case["d_in"]).to(case["dtype"])
    # up to ~3e4 (float16's largest finite value is 65504): large but representable inputs
    x = (torch.randn(*case["lead"], case["d_in"]) * case["scale"] * 1e3).clamp(-6e4, 6e4).to(case["dtype"])
    probs = router_probs(x, router if case["router"] == "softmax" else None, case["n"])
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
