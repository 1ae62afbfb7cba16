"""Answer prompts with a saved MoR or MiLoRA adapter.

    python examples/generate.py examples/output/train/adapter "What is the capital of Peru?" "What is 12 + 30?"
    python examples/generate.py ADAPTER --model PATH_OR_HUB_ID "..."    # base model other than the saved one

The base model is the one recorded in the adapter's ``adapter_config.json`` (``examples/train.py``
records it), unless ``--model`` is given; ``import loramix`` must come before loading (it registers
the methods with PEFT). MoR routes every generated token; MiLoRA routes once per prompt and reuses
that routing for every new token, with the KV cache on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loramix  # noqa: E402, F401  (registers MoR and MiLoRA with PEFT: needed before loading)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", type=Path, help="directory written by save_pretrained (examples/train.py: .../adapter)")
    p.add_argument("prompts", nargs="+", help="questions to answer")
    p.add_argument("--model", default=None, help="base model path / Hub id ('smollm2' for the converted SmolLM2)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def load(adapter: Path, model: str | None):
    """``(peft_model, tokenizer)`` in eval mode."""
    if model is None:
        peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32)
        base_path = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    else:
        if model == "smollm2":
            from smollm2 import load_smollm2

            model = str(load_smollm2())
        base_path = model
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), adapter
        )
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").exists() else base_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return peft_model.eval(), tokenizer


@torch.no_grad()
def answer(model, tokenizer, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy answers, one per prompt (chat template, left-padded batch, KV cache on)."""
    encoded = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for p in prompts
    ]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    device = next(model.parameters()).device
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.adapter, args.model)
    answers = answer(model, tokenizer, args.prompts, args.max_new_tokens)
    method = model.peft_config[model.active_adapter].peft_type.value
    if args.json:
        print(json.dumps({"method": method, "answers": dict(zip(args.prompts, answers, strict=True))}))
    else:
        for prompt, text in zip(args.prompts, answers, strict=True):
            print(f"[{method}] {prompt} -> {text}")
    return answers


if __name__ == "__main__":
    main()
