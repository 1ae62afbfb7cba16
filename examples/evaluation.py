"""Per-task evaluation for the quickstart: exact-match accuracy and answer loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from multitask_data import IGNORE_INDEX, Example, collate, is_correct, prompt_ids


@dataclass
class TaskScore:
    """Scores of one task: exact-match accuracy, mean answer-token loss, predictions."""

    accuracy: float
    loss: float
    predictions: list[str]


def _batches(examples: list[Example], size: int) -> list[list[Example]]:
    return [examples[i : i + size] for i in range(0, len(examples), size)]


@torch.no_grad()
def answer_loss(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example], batch_size: int
) -> float:
    """Token-weighted mean cross-entropy of the answer tokens (teacher forcing)."""
    total, count = 0.0, 0
    for chunk in _batches(examples, batch_size):
        batch = collate(tokenizer, chunk)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        losses = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += losses.item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    batch_size: int,
    max_new_tokens: int = 12,
) -> list[str]:
    """Greedy answers to the examples' prompts (left-padded batches)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for chunk in _batches(examples, batch_size):
        prompts = [prompt_ids(tokenizer, ex) for ex in chunk]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
    return [a.strip() for a in answers]


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    test: dict[str, list[Example]],
    batch_size: int = 25,
) -> dict[str, TaskScore]:
    """Score every task of ``test``; the model is put in eval mode and left there."""
    model.eval()
    scores = {}
    for task, examples in test.items():
        predictions = generate_answers(model, tokenizer, examples, batch_size)
        correct = sum(is_correct(p, ex) for p, ex in zip(predictions, examples, strict=True))
        scores[task] = TaskScore(
            accuracy=correct / len(examples),
            loss=answer_loss(model, tokenizer, examples, batch_size),
            predictions=predictions,
        )
    return scores
