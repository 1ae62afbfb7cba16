"""Fine-tune a causal LM with MoR or MiLoRA through ``transformers.Trainer``, save the adapter, and
plot how its routers route the tasks.

    python examples/train.py --method mor    --r 8 --num-experts 8            # SmolLM2-135M-Instruct
    python examples/train.py --method milora --r 8 --top-k 3
    python examples/train.py --model tiny --steps 20                          # seconds: a random tiny LLaMA
    python examples/train.py --model PATH_OR_HUB_ID --data my.jsonl ...       # your model and data

    # several processes (GPUs, or CPU processes with --cpu): see examples/accelerate/README.md
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train.py --method mor

``--data`` is ``multitask`` (the offline capital/addition/antonym/plural set of the quickstart) or a
JSON-lines file of ``{"prompt": ..., "completion": ..., "task": ...}`` rows (``task`` optional). The
loss covers the completion only; MiLoRA routes on the prompt. Writes to ``--output-dir``:
``adapter/`` (adapter + tokenizer; load it with ``examples/generate.py``), ``routing.json`` (router
statistics per task, :mod:`loramix.analysis`) and ``routing_heatmap.png`` / ``routing_tasks.png``.
The router aux loss is optimised and logged (``aux_loss``, ``router_entropy``, ``router_balance``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import string
import sys
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loramix  # noqa: E402  (registers MoR and MiLoRA with PEFT)
from loramix.analysis import plot_routing, router_statistics  # noqa: E402
from loramix.callbacks import add_router_stats_callback  # noqa: E402

IGNORE_INDEX = -100
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny', or a local path / Hub id")
    p.add_argument("--data", default="multitask", help="'multitask' or a JSON-lines file (prompt, completion, task)")
    p.add_argument("--method", choices=["mor", "milora"], default="mor")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (MoR: of the shared A, B; MiLoRA: of each expert)")
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 32 for MoR (paper), 2r for MiLoRA")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--num-experts", type=int, default=8, help="MoR: rank experts N")
    p.add_argument("--top-k", type=int, default=3, help="MiLoRA: modules selected per block and prompt")
    p.add_argument("--aux-coef", type=float, default=1e-2, help="router_aux_loss_coef (Switch balance loss)")
    p.add_argument("--target-modules", nargs="*", default=None, help="default: per architecture")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU, or recent CPUs)")
    p.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path("examples/output/train"))
    p.add_argument("--no-plot", action="store_true", help="skip the routing statistics and plots")
    return p.parse_args(argv)


# -- model and tokenizer --------------------------------------------------------------------------
def char_tokenizer():
    """A character-level tokenizer built offline, for ``--model tiny``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return tokenizer


def load_model_and_tokenizer(name: str, output_dir: Path, seed: int):
    """``(model, tokenizer, base_path)``; ``base_path`` is what ``generate.py`` loads the base from."""
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = char_tokenizer()
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, initializer_range=0.1,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
        base_path = output_dir / "base"
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one writer per machine under `accelerate launch`
            model.save_pretrained(base_path)  # so that generate.py / plot_routing.py find the same base
            tokenizer.save_pretrained(base_path)
        return model, tokenizer, base_path
    if name == "smollm2":
        from smollm2 import load_smollm2

        name = str(load_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model, tokenizer, name


def adapter_config(args: argparse.Namespace):
    common = dict(
        r=args.r,
        lora_dropout=args.lora_dropout,
        router_aux_loss_coef=args.aux_coef,
        target_modules=args.target_modules or None,
        task_type="CAUSAL_LM",
    )
    if args.method == "mor":
        return loramix.MoRConfig(num_experts=args.num_experts, lora_alpha=args.lora_alpha or 32, **common)
    return loramix.MiLoRAConfig(top_k=args.top_k, lora_alpha=args.lora_alpha or 2 * args.r, **common)


# -- data -----------------------------------------------------------------------------------------
def load_rows(data: str, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` rows of ``{"prompt", "completion", "task"}``."""
    if data == "multitask":
        from multitask_data import build_dataset

        train, test = build_dataset(seed=seed)
        as_row = lambda ex: {"prompt": ex.question, "completion": ex.answer, "task": ex.task}  # noqa: E731
        return [as_row(ex) for ex in train], [as_row(ex) for rows in test.values() for ex in rows]
    rows = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    for row in rows:
        row.setdefault("task", "all")
    random.Random(seed).shuffle(rows)
    cut = max(1, len(rows) // 10)
    return rows[cut:], rows[:cut]


def encode(tokenizer, row: dict) -> dict[str, Any]:
    """Chat-formatted prompt + completion + end of sequence; labels -100 on the prompt."""
    messages = [{"role": "user", "content": row["prompt"]}]
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer = tokenizer(row["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer, "task": row["task"]}


class Collator:
    """Right-pads ``input_ids``/``labels`` and builds the attention mask; keeps ``task`` if asked."""

    def __init__(self, pad_id: int, keep_task: bool = False) -> None:
        self.pad_id, self.keep_task = pad_id, keep_task

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": torch.tensor([r["input_ids"] + [self.pad_id] * (width - len(r["input_ids"])) for r in rows]),
            "labels": torch.tensor([r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"])) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]),
        }  # fmt: skip
        if self.keep_task:
            batch["task"] = [r["task"] for r in rows]
        return batch


def checkpointing_argument() -> str:
    """``TrainingArguments``' name for activation checkpointing: ``activation_checkpointing`` from transformers
    5.23 on (``gradient_checkpointing`` is its deprecated alias there), ``gradient_checkpointing`` before."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


# -- main -----------------------------------------------------------------------------------------
def process_group_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def end_process_group(trainer: Trainer | None) -> None:
    """Destroy the distributed process group, as accelerate asks of every script it launches.

    ``Accelerator.end_training()`` finishes the trackers, then destroys the group (``Trainer.end()`` of recent
    transformers calls it too). A group left to the interpreter's exit is torn down while its threads still run,
    which can abort a rank after training succeeded ("terminate called without an active exception", exit -6).
    """
    if not process_group_initialized():
        return
    if trainer is not None:
        trainer.accelerator.end_training()
    if process_group_initialized():  # no Trainer yet, or an accelerate that leaves the group to the script
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Under `accelerate launch` the Trainer's Accelerator starts the process group: this run then ends it, on every
    # rank, once all ranks are done (or on the way out of an error). A group that was already there is the caller's.
    owns_process_group = not process_group_initialized()
    trainer = None
    try:
        trainer, result = train(args)
        trainer.accelerator.wait_for_everyone()
        return result
    finally:
        if owns_process_group:
            end_process_group(trainer)


def train(args: argparse.Namespace) -> tuple[Trainer, dict[str, Any]]:
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, base_path = load_model_and_tokenizer(args.model, args.output_dir, args.seed)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, adapter_config(args))
    model.peft_config["default"].base_model_name_or_path = str(base_path)

    train_rows, test_rows = load_rows(args.data, args.seed)
    if args.max_examples:
        train_rows = train_rows[: args.max_examples]
    train_set = [encode(tokenizer, row) for row in train_rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    use_cpu = args.cpu or not torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=use_cpu,
        bf16=args.bf16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # only when asked (passing False under the old name would warn too)
        **({checkpointing_argument(): True} if args.gradient_checkpointing else {}),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, data_collator=Collator(pad_id))
    add_router_stats_callback(trainer)  # logs aux_loss, router_entropy, router_balance
    model.print_trainable_parameters() if trainer.is_world_process_zero() else None
    trainer.train()

    result: dict[str, Any] = {
        "method": args.method,
        "steps": args.steps,
        "processes": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "logs": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        adapter_dir = args.output_dir / "adapter"
        trainer.save_model(str(adapter_dir))
        tokenizer.save_pretrained(adapter_dir)
        result["adapter"] = str(adapter_dir)
        if not args.no_plot:
            result.update(routing_report(trainer.model, tokenizer, test_rows, pad_id, args.output_dir))
        (args.output_dir / "train_summary.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"[train] adapter saved to {adapter_dir}")
    return trainer, result


def routing_report(model, tokenizer, rows: list[dict], pad_id: int, output_dir: Path) -> dict[str, Any]:
    """Router statistics per task on ``rows`` -> ``routing.json`` and the PNG plots."""
    collate = Collator(pad_id, keep_task=True)
    encoded = [encode(tokenizer, row) for row in rows]
    batches = [collate(encoded[i : i + 16]) for i in range(0, len(encoded), 16)]
    stats = router_statistics(model, batches)
    (output_dir / "routing.json").write_text(json.dumps(stats))
    paths: dict[str, Any] = {"routing_stats": str(output_dir / "routing.json")}
    try:
        paths.update({k: str(v) for k, v in plot_routing(stats, output_dir).items()})
    except ImportError as err:
        print(f"[train] no plots: {err}")
    return paths


if __name__ == "__main__":
    main()
