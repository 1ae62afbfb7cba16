"""Default target modules per transformers architecture (``config.model_type``).

MoR targets the feed-forward block (paper: LLaMA ``gate_proj``, ``up_proj``, ``down_proj``);
MiLoRA targets every linear projection of a transformer block. Architectures missing here need
``target_modules`` set explicitly. Mixtral is left out on purpose: its FFN is a sparse MoE of
fused expert tensors, not ``nn.Linear`` layers.
"""

from __future__ import annotations

_LLAMA_FFN = ["gate_proj", "up_proj", "down_proj"]
_LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Architectures that name their projections exactly like LLaMA.
_LLAMA_LIKE = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
    "olmo", "olmo2", "granite", "smollm3", "cohere", "glm",
)  # fmt: skip

TRANSFORMERS_MODELS_TO_FFN_TARGET_MODULES: dict[str, list[str]] = {
    **{name: _LLAMA_FFN for name in _LLAMA_LIKE},
    "phi3": ["gate_up_proj", "down_proj"],
    "phi": ["fc1", "fc2"],
    "opt": ["fc1", "fc2"],
    "bloom": ["dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["dense_h_to_4h", "dense_4h_to_h"],
    "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["fc_in", "fc_out"],
    "starcoder2": ["c_fc", "c_proj"],
}

TRANSFORMERS_MODELS_TO_BLOCK_TARGET_MODULES: dict[str, list[str]] = {
    **{name: _LLAMA_ATTN + _LLAMA_FFN for name in _LLAMA_LIKE},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}

# MiLoRA: the module of every transformer block whose input is the block's input hidden states and
# that runs before any projection of the block; the block's router wraps it. Post-norm blocks (OLMo-2)
# have no such module and are left out.
TRANSFORMERS_MODELS_TO_MILORA_ROUTER_ANCHOR: dict[str, str] = {
    **{name: "input_layernorm" for name in _LLAMA_LIKE if name != "olmo2"},
    "phi3": "input_layernorm",
}
