"""Tiny real transformers models built from configs (no hub access needed)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-block LLaMA small enough for sub-second forward passes on CPU."""
    kwargs = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A freshly initialised tiny ``LlamaForCausalLM`` in eval mode, deterministic for a seed."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def save_adapters_with_expected_logits(root, configs) -> None:
    """Save a tiny base model to ``root/base`` and, per ``{method: config factory}``, an adapter with those weights
    to ``root/<method>`` plus ``root/expected_<method>.safetensors``: a left-padded batch (MiLoRA's routing must skip
    the padding) and the logits this process computes for it, for other processes to compare against."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import save_file

    tiny_llama().save_pretrained(root / "base")
    input_ids = torch.arange(1, 11).reshape(2, 5)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    for method, config in configs.items():
        model = get_peft_model(tiny_llama(), config())
        model.peft_config["default"].base_model_name_or_path = str(root / "base")
        model.eval().save_pretrained(root / method)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "logits": logits}
        save_file(tensors, root / f"expected_{method}.safetensors")
