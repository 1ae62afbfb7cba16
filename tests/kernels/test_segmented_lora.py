"""The row-selected (segmented) LoRA kernels for MiLoRA decoding against their references."""

from __future__ import annotations

import pytest
import torch

from loramix.kernels.segmented import grouped_lora, segmented_lora, segmented_lora_reference
from tests.milora.reference import grouped_reference, stack_adapters
from tests.milora.test_functional import grouped_case

# (batch, seq, d_in, d_out, r, selected rows)
CASES = [
    (8, 1, 45, 29, 5, [1, 4, 7]),  # decoding: one token per sequence
    (5, 19, 40, 70, 32, [0, 3]),  # prefill-like: several tokens per selected sequence
    (3, 7, 33, 17, 8, []),  # nobody selected this module
    (4, 3, 20, 36, 4, [0, 1, 2, 3]),  # everybody did
]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_and_leaves_other_rows_alone(case, dtype):
    batch, seq, d_in, d_out, r, rows = case
    g = torch.Generator().manual_seed(len(rows) + seq)
    x = torch.randn(batch, seq, d_in, generator=g).to(dtype)
    lora_A = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(dtype)
    lora_B = (torch.randn(d_out, r, generator=g) / r**0.5).to(dtype)
    base = torch.randn(batch, seq, d_out, generator=g).to(dtype)
    index = torch.tensor(rows, dtype=torch.long)
    weights = torch.rand(len(rows), generator=g)

    out = segmented_lora(x, lora_A, lora_B, index, weights, scaling=2.0, out=base.clone())
    expected = segmented_lora_reference(
        x.double(), lora_A.double(), lora_B.double(), index, weights.double(), 2.0, out=base.double()
    )
    assert out.dtype == dtype
    err = ((out.double() - expected).norm() / expected.norm()).item()
    assert err < TOL[dtype]
    others = [i for i in range(batch) if i not in rows]
    assert torch.equal(out[others], base[others])


def test_two_dimensional_input_without_out_or_weights():
    x, lora_A, lora_B = torch.randn(6, 10), torch.randn(3, 10), torch.randn(12, 3)
    rows = torch.tensor([5, 2])
    out = segmented_lora(x, lora_A, lora_B, rows)
    torch.testing.assert_close(out, segmented_lora_reference(x, lora_A, lora_B, rows))
    assert out[[0, 1, 3, 4]].abs().sum() == 0


def test_refuses_autograd():
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no_grad"):
        segmented_lora(x, torch.randn(2, 4), torch.randn(3, 2), torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seq", [None, 1, 6], ids=["2-D", "decode", "prefill"])
def test_grouped_kernel_matches_a_loop_over_adapters_and_rows(seq, dtype):
    """Several adapters, each on its own rows, in one launch pair (mixed-adapter batches)."""
    x, out, adapters = grouped_case(seq, seed=3)
    x, out = x.to(dtype), out.to(dtype)
    adapters = [(a.to(dtype), b.to(dtype), rows, f) for a, b, rows, f in adapters]
    expected = grouped_reference(x, out, adapters)
    with torch.no_grad():
        actual = grouped_lora(x, *stack_adapters(adapters, dtype), out=out.clone())
    assert actual.dtype == dtype
    err = ((actual.double() - expected).norm() / expected.norm()).item()
    assert err < TOL[dtype]
    assert torch.equal(actual[3], out[3])  # a row of no adapter is untouched


def test_grouped_kernel_refuses_autograd_and_wrong_shapes():
    x, out, adapters = grouped_case(1)
    stack_A, stack_B, gather, counts, factor = stack_adapters(adapters)
    with pytest.raises(RuntimeError, match="no_grad"):
        grouped_lora(x.requires_grad_(), stack_A, stack_B, gather, counts, factor, out=out)
    with torch.no_grad(), pytest.raises(ValueError, match="do not fit"):
        grouped_lora(x, stack_A[:, :-1], stack_B, gather, counts, factor, out=out)
