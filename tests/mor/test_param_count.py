"""Trainable parameters on the LLaMA-2-7B shape, built on the meta device (no memory needed).

Paper Table 1: LoRA r=8 on the FFN has 11.6M trainable parameters, MoR E8R8 23.2M. Per adapted
linear (d_in -> d_out) MoR trains r(d_in + d_out) + N(d_in + d_out + r): A, B, Ω_B and the router
(N·d_out + N·d_in) and Ω_A (N·r).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loramix import MoRConfig

LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32,
)  # fmt: skip
FFN_SHAPES = [(4096, 11008), (4096, 11008), (11008, 4096)]  # gate, up, down: (d_in, d_out)


def trainable(config) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B))
    peft_model = get_peft_model(model, config)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def mor_formula(r: int, n: int, layers: int = 32) -> int:
    return layers * sum(r * (i + o) + n * (i + o + r) for i, o in FFN_SHAPES)


def test_paper_table1_lora_and_mor_e8r8():
    lora = trainable(LoraConfig(r=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    mor = trainable(MoRConfig(r=8, num_experts=8))
    assert round(lora / 1e6, 1) == 11.6
    assert round(mor / 1e6, 1) == 23.2
    assert lora == 32 * sum(8 * (i + o) for i, o in FFN_SHAPES)
    assert mor == mor_formula(8, 8) == 23_205_888


@pytest.mark.parametrize("r,n", [(4, 1), (8, 2), (16, 4), (2, 16)])
def test_per_layer_formula(r, n):
    assert trainable(MoRConfig(r=r, num_experts=n)) == mor_formula(r, n)


def test_mean_router_has_no_router_parameters():
    r, n = 8, 4
    expected = 32 * sum(r * (i + o) + n * (o + r) for i, o in FFN_SHAPES)
    assert trainable(MoRConfig(r=r, num_experts=n, router="mean")) == expected
