"""The MoR layer against the float64 loop over experts (tests/mor/reference.py) and hand-derived cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramix import MoRConfig
from loramix.mor.layer import Linear
from tests.mor.reference import mor_linear_reference

# (d_in, d_out, r, num_experts, leading shape of x)
SHAPES = [
    (7, 5, 1, 1, (3,)),
    (16, 24, 4, 3, (2, 5)),
    (33, 17, 8, 8, (4, 7)),
    (64, 48, 16, 2, (1, 13)),
    (20, 31, 3, 16, (6,)),
]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_layer(d_in, d_out, r, n, router="softmax", bias=True, seed=0) -> Linear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    config = MoRConfig(r=r, lora_alpha=2 * r + 1, num_experts=n, lora_dropout=0.0, router=router, init_weights=False)
    return Linear(base, "default", config)


def reference_of(layer: Linear, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    base = layer.get_base_layer()
    return mor_linear_reference(
        x,
        base.weight,
        base.bias,
        layer.mor_A[name],
        layer.mor_B[name],
        layer.mor_omega_A[name],
        layer.mor_omega_B[name],
        layer.mor_router[name] if name in layer.mor_router else None,
        layer.scaling[name],
    )


@pytest.mark.parametrize("router", ["softmax", "mean"])
@pytest.mark.parametrize("d_in,d_out,r,n,lead", SHAPES)
def test_forward_matches_float64_loop(d_in, d_out, r, n, lead, router):
    layer = make_layer(d_in, d_out, r, n, router=router)
    x = torch.randn(*lead, d_in) * 2
    out = layer(x)
    assert out.shape == (*lead, d_out) and out.dtype == torch.float32
    assert rel_err(out, reference_of(layer, x)) < 1e-6


@pytest.mark.parametrize("d_in,d_out,r,n,lead", SHAPES)
def test_gradients_match_float64_loop(d_in, d_out, r, n, lead):
    layer = make_layer(d_in, d_out, r, n)
    x = torch.randn(*lead, d_in, requires_grad=True)
    upstream = torch.randn(*lead, d_out)
    (layer(x) * upstream).sum().backward()

    leaves = {
        "x": x,
        "mor_A": layer.mor_A["default"],
        "mor_B": layer.mor_B["default"],
        "mor_omega_A": layer.mor_omega_A["default"],
        "mor_omega_B": layer.mor_omega_B["default"],
        "mor_router": layer.mor_router["default"],
    }
    copies = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    base = layer.get_base_layer()
    expected = mor_linear_reference(
        copies["x"], base.weight.detach(), base.bias.detach(), copies["mor_A"], copies["mor_B"],
        copies["mor_omega_A"], copies["mor_omega_B"], copies["mor_router"], layer.scaling["default"],
    )  # fmt: skip
    (expected * upstream.double()).sum().backward()
    for key in leaves:
        assert leaves[key].grad is not None, key
        assert rel_err(leaves[key].grad, copies[key].grad) < 1e-6, key
    # the frozen base layer gets no gradient through the adapter's parameters
    assert base.weight.grad is not None  # base is not frozen in this bare-layer test ...
    # ... but it must only receive the plain linear gradient: upstream^T x
    expected_base_grad = upstream.reshape(-1, d_out).double().T @ x.detach().reshape(-1, d_in).double()
    assert rel_err(base.weight.grad, expected_base_grad) < 1e-6


def test_uniform_router_with_unit_omegas_is_plain_lora():
    """Hand-derived: with Ω = 1 the mixture is Σ_i G_i · B A x = B A x, whatever the router says."""
    layer = make_layer(12, 10, 4, 5)
    with torch.no_grad():
        layer.mor_omega_A["default"].fill_(1.0)
        layer.mor_omega_B["default"].fill_(1.0)
    x = torch.randn(3, 12)
    base = layer.get_base_layer()
    lora = (x.double() @ layer.mor_A["default"].double().T @ layer.mor_B["default"].double().T) * layer.scaling[
        "default"
    ]
    expected = x.double() @ base.weight.double().T + base.bias.double() + lora
    assert rel_err(layer(x), expected) < 1e-6


def test_hand_computed_two_experts():
    """A 1-d example worked out by hand: d_in = d_out = r = 1, N = 2."""
    base = nn.Linear(1, 1, bias=False)
    layer = Linear(base, "default", MoRConfig(r=1, lora_alpha=2, num_experts=2, lora_dropout=0.0))
    with torch.no_grad():
        base.weight.fill_(3.0)
        layer.mor_A["default"].fill_(2.0)
        layer.mor_B["default"].fill_(0.5)
        layer.mor_omega_A["default"].copy_(torch.tensor([[1.0], [4.0]]))
        layer.mor_omega_B["default"].copy_(torch.tensor([[2.0], [-1.0]]))
        layer.mor_router["default"].copy_(torch.tensor([[0.0], [torch.log(torch.tensor(3.0))]]))
    # x = 1: logits (0, ln 3) -> G = (1/4, 3/4); Ax = 2; experts: 2*0.5*(1*2) = 2 and -1*0.5*(4*2) = -4
    # o = 3 + (2/1) * (1/4 * 2 + 3/4 * -4) = 3 + 2 * (-2.5) = -2
    assert layer(torch.tensor([[1.0]])).item() == pytest.approx(-2.0, abs=1e-6)


def _router_gradient(layer: Linear) -> torch.Tensor:
    """The router's gradient (float64) for a random loss once B is non-zero (as after a first step)."""
    layer.double()
    with torch.no_grad():
        layer.mor_B["default"].normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = torch.randn(6, layer.out_features, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ((layer(x) - target) ** 2).sum().backward()
    return layer.mor_router["default"].grad


def test_identical_experts_give_the_router_no_gradient():
    # Ω = 1: every expert is the same function, so d loss / d logit_j = G_j (v_j - Σ_i G_i v_i) = 0 (up to the
    # float32 rounding of the router softmax); distinct experts (omega_init_std) give it one.
    gradients = {}
    for std in (0.0, 0.5):
        torch.manual_seed(0)
        config = MoRConfig(r=4, num_experts=4, lora_dropout=0.0, omega_init_std=std)
        gradients[std] = _router_gradient(Linear(nn.Linear(16, 8), "default", config)).abs().max().item()
    assert gradients[0.5] > 1.0
    assert gradients[0.0] < 1e-6 * gradients[0.5]


def test_omega_init_std_starts_as_a_no_op_with_distinct_experts():
    torch.manual_seed(0)
    base = nn.Linear(64, 256)
    layer = Linear(base, "default", MoRConfig(r=8, num_experts=8, omega_init_std=0.3))
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), base(x))  # B = 0
    for omega in (layer.mor_omega_A["default"], layer.mor_omega_B["default"]):
        values = omega.detach().double()
        assert abs(values.mean().item() - 1.0) < 0.1 and abs(values.std().item() - 0.3) < 0.1
        assert values.std(dim=0).min() > 0.01  # experts differ in every coordinate


def test_fresh_adapter_is_a_no_op():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = Linear(base, "default", MoRConfig(r=4, num_experts=4))
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.mor_B["default"]) == 0
    assert torch.all(layer.mor_omega_A["default"] == 1) and torch.all(layer.mor_omega_B["default"] == 1)
    assert layer.mor_A["default"].abs().sum() > 0 and layer.mor_router["default"].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_softmax_stays_float32_under_autocast(dtype, monkeypatch):
    from loramix.mor import functional as functional_module

    seen = []
    original = functional_module.mor_delta

    def spy(x, lora_A, lora_B, omega_A, omega_B, probs, scaling):
        seen.append(probs.dtype)
        return original(x, lora_A, lora_B, omega_A, omega_B, probs, scaling)

    monkeypatch.setattr(functional_module, "mor_delta", spy)
    layer = make_layer(16, 8, 4, 4)
    x = torch.randn(3, 16) * 1e3  # large logits: a low-precision softmax would saturate
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)
    assert seen == [torch.float32]
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), reference_of(layer, x)) < 5e-2


def test_only_linear_targets():
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear(nn.Embedding(10, 4), "default", MoRConfig())


@torch.no_grad()
def test_grouped_adapters_match_each_rows_float64_loop():
    """A mixed-adapter batch: adapters of different ranks, expert counts and routers, each on its own rows,
    computed together (``_grouped_stacks`` + ``grouped_mor``) equal each row's own float64 loop."""
    from loramix.mor.functional import grouped_mor

    layer = make_layer(12, 10, 4, 3, seed=1)
    for seed, (name, r, n, router) in enumerate([("wide", 8, 5, "softmax"), ("mean", 2, 2, "mean")], start=2):
        torch.manual_seed(seed)
        config = MoRConfig(r=r, num_experts=n, lora_dropout=0.0, router=router, init_weights=False)
        layer.update_layer(name, config)
    groups = {"default": torch.tensor([0, 3]), "wide": torch.tensor([1, 4, 5]), "mean": torch.tensor([6])}
    x = torch.randn(8, 5, 12)  # row 2 and 7: no adapter
    base = layer.get_base_layer()(x)
    out, _ = grouped_mor(x, base.clone(), *layer._grouped_stacks(list(groups), groups)[0])
    for name, rows in groups.items():
        for row in rows.tolist():
            expected = reference_of(layer, x[row], name)
            assert rel_err(out[row], expected) < 1e-6, (name, row)
    for row in (2, 7):
        assert torch.equal(out[row], base[row])


@torch.no_grad()
def test_two_active_adapters_outside_a_model_forward():
    """A layer called by itself (no routing session, e.g. T5's encoder run by ``generate``) with two active
    adapters adds both updates."""
    layer = make_layer(12, 10, 4, 3, seed=1)
    torch.manual_seed(5)
    layer.update_layer("second", MoRConfig(r=2, num_experts=2, lora_dropout=0.0, init_weights=False))
    layer.set_adapter(["default", "second"])
    x = torch.randn(3, 4, 12)
    base = layer.get_base_layer()(x).double()
    expected = reference_of(layer, x, "default") + reference_of(layer, x, "second") - base
    assert rel_err(layer(x), expected) < 1e-6
