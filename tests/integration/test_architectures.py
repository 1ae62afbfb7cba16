"""Default target modules resolved per architecture: tiny Mistral, Qwen2 and Gemma from configs train
with each method's defaults; an unknown architecture is a clear error listing the modules to set."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS
from tests.integration.helpers import METHOD_NAMES, config, sequences

pytestmark = pytest.mark.filterwarnings(*IGNORE_UPSTREAM_DEPRECATIONS, "ignore::UserWarning")

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)
ARCHITECTURES = {
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"head_dim": 8}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, {"head_dim": 8}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 8}),
}
FFN = {"gate_proj", "up_proj", "down_proj"}
BLOCK = FFN | {"q_proj", "k_proj", "v_proj", "o_proj"}


def tiny(arch):
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(0)
    return model_cls(config_cls(**COMMON, **extra))


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_default_targets_per_architecture(method, arch):
    model = get_peft_model(tiny(arch), config(method))
    adapted = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) and isinstance(m.get_base_layer(), torch.nn.Linear)
    }
    assert adapted == (FFN if method == "mor" else BLOCK)
    ids = sequences(rows=2, length=8)
    labels = ids.clone()
    labels[:, :3] = -100
    out = model.train()(input_ids=ids, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "router" in n)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_unknown_architecture_lists_the_modules_to_set(method):
    # CodeGen is in neither default table; its linear layers must be named in the error.
    model = transformers.CodeGenForCausalLM(
        transformers.CodeGenConfig(
            n_layer=1, n_embd=16, n_head=2, vocab_size=50, rotary_dim=4, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    )
    with pytest.raises(ValueError, match=r"target_modules") as error:
        get_peft_model(model, config(method))
    assert all(name in str(error.value) for name in ("qkv_proj", "out_proj", "fc_in", "fc_out"))


def _tiny_opt(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=16, init_std=0.3,
    )  # fmt: skip
    return transformers.OPTForCausalLM(config).eval()


def _left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.ones(len(lengths), width, dtype=torch.long)  # OPT's pad token id is 1
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(2, 64, (n,), generator=generator)
        mask[row, width - n :] = 1
    return ids, mask


@torch.no_grad()
def test_opt_flattened_ffn_tokens_keep_each_rows_routing_and_adapter():
    """OPT's fc1/fc2 see (batch·tokens, hidden): MiLoRA experts there and MoR mixed-adapter batches there compute each
    row as it is computed alone (greedy tokens and last logits of a left-padded batch)."""
    from loramix import MiLoRAConfig, MoRConfig

    ids, mask = _left_padded([6, 3])
    milora = get_peft_model(
        _tiny_opt(),
        MiLoRAConfig(
            r=4, top_k=2, init_weights=False, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "fc1", "fc2"],
            router_anchor="self_attn_layer_norm", task_type="CAUSAL_LM",
        ),
    ).eval()  # fmt: skip
    mor = get_peft_model(
        _tiny_opt(), MoRConfig(r=4, num_experts=3, init_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM"), "a"
    ).eval()
    mor.add_adapter("b", MoRConfig(r=4, num_experts=2, init_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM"))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 1}
    cases = [(milora, None), (mor, ["a", "b"])]
    for model, names in cases:
        extra = {} if names is None else {"adapter_names": names}
        batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs, **extra)
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            if names is not None:
                model.set_adapter(names[row])
            alone = model.generate(input_ids=ids[row : row + 1, keep], **kwargs)
            assert batched[row, ids.shape[1] :].tolist() == alone[0, int(keep.sum()) :].tolist(), (names, row)
