"""The memory-saving pieces of the MoR PyTorch path (benchmarks/RESULTS.md: peak memory vs LoRA)."""

from __future__ import annotations

import torch
from torch import nn

from loramix import MoRConfig
from loramix.mor.functional import MoRDropout
from loramix.mor.layer import Linear


def saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_dropout_keeps_a_one_byte_mask_and_is_inverted_dropout():
    torch.manual_seed(0)
    drop = MoRDropout(0.25).train()
    x = torch.randn(400, 300, requires_grad=True)
    out, saved = saved_tensors(lambda: drop(x))
    assert [t.dtype for t in saved] == [torch.bool]
    keep = out != 0
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(out[keep], x[keep] / 0.75)
    grad = torch.randn_like(x)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad * keep / 0.75)
    assert torch.equal(drop.eval()(x), x)


def test_mor_layer_with_dropout_routes_the_clean_input():
    """Dropout reaches A only; the router and the base layer read x itself (paper, MoRConfig.lora_dropout)."""
    torch.manual_seed(0)
    layer = Linear(nn.Linear(16, 12), "default", MoRConfig(r=4, num_experts=3, lora_dropout=0.5, init_weights=False))
    assert isinstance(layer.mor_dropout["default"], MoRDropout)
    x = torch.randn(6, 16)
    seen = []
    handle = layer.mor_dropout["default"].register_forward_hook(lambda m, i, o: seen.append(o))
    out = layer.train()(x)
    handle.remove()
    x_drop = seen[0]
    probs = torch.softmax(x @ layer.mor_router["default"].T, -1)
    z = x_drop @ layer.mor_A["default"].T
    experts = torch.stack(
        [
            (z * layer.mor_omega_A["default"][i]) @ layer.mor_B["default"].T * layer.mor_omega_B["default"][i]
            for i in range(3)
        ]
    )
    expected = layer.get_base_layer()(x) + layer.scaling["default"] * torch.einsum("tn,nto->to", probs, experts)
    torch.testing.assert_close(out, expected)
