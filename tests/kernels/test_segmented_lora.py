"""The row-selected (segmented) LoRA kernel for MiLoRA decoding against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from loramix.kernels.segmented import segmented_lora, segmented_lora_reference

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
