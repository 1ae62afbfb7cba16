"""MiLoRA's router pieces and expert updates against the float64 references of ``reference.py``."""

from __future__ import annotations

import pytest
import torch

from loramix.milora import functional as F
from loramix.routing.balance import switch_balance_loss
from tests.milora.reference import (
    balance_reference,
    expert_reference,
    gelu_reference,
    grouped_reference,
    pool_reference,
    rational_reference,
    router_reference,
    stack_adapters,
)

MASKS = {
    "none": None,
    "left padding": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool),
    "right padding": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool),
    "prompt inside": torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 1, 0]], dtype=torch.bool),
}


@pytest.mark.parametrize("pooler", F.POOLERS)
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_pool_matches_reference_and_ignores_masked_tokens(pooler, mask_name):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 5, generator=generator)
    query = torch.randn(5, generator=generator)
    mask = MASKS[mask_name]
    pooled = F.pool(hidden, mask, pooler, query)
    assert torch.allclose(pooled.double(), pool_reference(hidden, mask, pooler, query), atol=1e-6)
    if mask is not None:  # whatever sits in the masked positions does not matter
        noisy = hidden.masked_fill(~mask.unsqueeze(-1), 1e4)
        assert torch.equal(F.pool(noisy, mask, pooler, query), pooled)


def test_attention_pool_with_zero_query_is_mean_pool():
    hidden = torch.randn(2, 4, 3)
    mask = MASKS["left padding"][:2, :4]
    assert torch.allclose(F.pool(hidden, mask, "attention", torch.zeros(3)), F.pool(hidden, mask, "mean"), atol=1e-6)


def test_rational_init_fits_gelu():
    """The (6, 5) rational starts as GeLU: max abs error < 1e-4 on [-3, 3] (measured 7.6e-5), < 1e-3 elsewhere near."""
    numerator, denominator = (torch.tensor(c) for c in F.rational_gelu_init(6, 5))
    x = torch.linspace(-3, 3, 6001)
    error = (F.rational(x, numerator, denominator).double() - gelu_reference(x)).abs().max().item()
    assert error < 1e-4
    exact = torch.nn.functional.gelu(x)  # torch's exact (erf) GeLU
    assert (F.rational(x, numerator, denominator) - exact).abs().max() < 1e-4
    assert (denominator[[1, 3]] > 0).all()  # even, positive Q: 1 + |Q| = 1 + Q, no kink from the absolute value


def test_rational_matches_eq6_with_random_coefficients():
    generator = torch.Generator().manual_seed(3)
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    numerator, denominator = (
        torch.randn(7, generator=generator, dtype=torch.float64),
        torch.randn(5, generator=generator, dtype=torch.float64),
    )
    assert torch.allclose(
        F.rational(x, numerator, denominator), rational_reference(x, numerator, denominator), rtol=1e-12
    )


@pytest.mark.parametrize("activation", ["rational", "gelu", "relu", "identity"])
def test_router_head_matches_reference(activation):
    generator = torch.Generator().manual_seed(1)
    hidden, query, weight = (
        torch.randn(3, 6, 8, generator=generator),
        torch.randn(8, generator=generator),
        torch.randn(7, 8, generator=generator),
    )
    mask = MASKS["left padding"]
    numerator, denominator = (torch.tensor(c) for c in F.rational_gelu_init(6, 5))
    pooled = F.activate(F.pool(hidden, mask, "attention", query), activation, numerator, denominator)
    probs = torch.softmax(pooled @ weight.T, dim=-1)
    gates, selected = F.top_k_gates(probs, 3, "probability")
    ref_probs, ref_gates = router_reference(
        hidden, mask, "attention", query, activation, weight, 3, numerator, denominator
    )
    assert torch.allclose(probs.double(), ref_probs, atol=1e-6)
    assert torch.allclose(gates.double(), ref_gates, atol=1e-6)
    assert torch.equal(selected, ref_gates > 0) and (selected.sum(-1) == 3).all()


def test_top_k_keeps_the_largest_probabilities_unnormalised():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.7, 0.1, 0.1, 0.1]])
    gates, selected = F.top_k_gates(probs, 2, "probability")
    assert torch.equal(gates, torch.tensor([[0.0, 0.4, 0.0, 0.3], [0.7, 0.0, 0.1, 0.0]])) or torch.equal(
        gates, torch.tensor([[0.0, 0.4, 0.0, 0.3], [0.7, 0.1, 0.0, 0.0]])
    )
    assert selected.sum() == 4 and torch.equal(selected, gates > 0)


def test_top_k_normalized_divides_by_the_kept_sum():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.05, 0.6, 0.15, 0.2]])
    gates, selected = F.top_k_gates(probs, 2, "normalized")
    expected = torch.tensor([[0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7], [0.0, 0.6 / 0.8, 0.0, 0.2 / 0.8]])
    assert torch.allclose(gates, expected, atol=1e-7)
    assert torch.equal(selected, expected > 0)


def test_top_k_unit_mean_averages_one_over_the_selected():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.05, 0.6, 0.15, 0.2]])
    gates, selected = F.top_k_gates(probs, 3, "unit_mean")
    # kept sums 0.9 and 0.95; each kept p_i times 3 / sum
    expected = torch.tensor([[0.0, 1.2 / 0.9, 0.6 / 0.9, 0.9 / 0.9], [0.0, 1.8 / 0.95, 0.45 / 0.95, 0.6 / 0.95]])
    assert torch.allclose(gates, expected, atol=1e-6)
    assert torch.allclose(gates.sum(-1), torch.tensor([3.0, 3.0]), atol=1e-6)
    assert torch.equal(selected, expected > 0)
    uniform, _ = F.top_k_gates(torch.full((1, 7), 1 / 7), 3, "unit_mean")
    assert torch.allclose(uniform[uniform > 0], torch.ones(3), atol=1e-6)  # LoRA's scale for a uniform router


def test_top_k_refuses_an_unknown_gate_form():
    with pytest.raises(ValueError, match="gate form.*'softmax'"):
        F.top_k_gates(torch.full((1, 4), 0.25), 2, "softmax")


def test_balance_loss_on_a_hand_made_batch():
    # 4 prompts, 3 experts: argmax -> experts 0, 0, 1, 2, so f = (1/2, 1/4, 1/4);
    # p̂ = (0.375, 0.325, 0.3); loss = 3 · (0.1875 + 0.08125 + 0.075) = 1.03125
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.5, 0.3], [0.2, 0.1, 0.7]])
    assert switch_balance_loss(probs).item() == pytest.approx(1.03125, rel=1e-6)
    assert switch_balance_loss(probs).item() == pytest.approx(balance_reference(probs), rel=1e-6)
    assert switch_balance_loss(torch.full((5, 4), 0.25)).item() == pytest.approx(1.0)  # ties: all to expert 0
    assert switch_balance_loss(torch.eye(4)).item() == pytest.approx(1.0)  # perfectly balanced


@pytest.mark.parametrize("dora", [False, True])
def test_expert_update_matches_reference(dora):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, 6, generator=generator)
    weight, bias = torch.randn(4, 6, generator=generator), torch.randn(4, generator=generator)
    lora_A, lora_B = torch.randn(3, 6, generator=generator), torch.randn(4, 3, generator=generator)
    scaling, gate = 0.7, 0.3
    base_out = x @ weight.T + bias
    if dora:
        magnitude = torch.rand(4, generator=generator) + 0.5
        norm = F.dora_weight_norm(weight, lora_A, lora_B, scaling)
        delta = F.dora_update(x, x @ weight.T, lora_A, lora_B, magnitude, norm, scaling)
    else:
        magnitude = None
        delta = F.lora_update(x, lora_A, lora_B, scaling)
    expected = expert_reference(x, weight, bias, lora_A, lora_B, scaling, gate, magnitude)
    assert torch.allclose((base_out + gate * delta).double(), expected, atol=1e-5)


def grouped_case(seq: int | None, seed: int = 0):
    """Three adapters of ranks 2, 5, 3 on 3, 1 and 2 rows of a batch of 7 (rows 3 not used: a base row)."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 11, 9
    x = torch.randn(7, *(() if seq is None else (seq,)), d_in, generator=g)
    out = torch.randn(*x.shape[:-1], d_out, generator=g)
    adapters = [
        (
            torch.randn(r, d_in, generator=g),
            torch.randn(d_out, r, generator=g),
            rows,
            torch.rand(len(rows), generator=g),
        )
        for r, rows in ((2, [0, 4, 6]), (5, [2]), (3, [5, 1]))
    ]
    return x, out, adapters


@pytest.mark.parametrize("seq", [None, 1, 6], ids=["2-D", "decode", "prefill"])
def test_grouped_lora_matches_a_loop_over_adapters_and_rows(seq):
    x, out, adapters = grouped_case(seq)
    expected = grouped_reference(x, out, adapters)
    with torch.no_grad():
        actual = F.grouped_lora(x, out.clone(), *stack_adapters(adapters))
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(actual[3], out[3])  # a row of no adapter is untouched
