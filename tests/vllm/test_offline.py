"""Offline vLLM (``LLM.generate``) serves loramix adapters per request, token for token as transformers does."""

from __future__ import annotations

import pytest

from loramix.milora.served import BlockRouter
from loramix.vllm import _hooks

from .conftest import engine, reference_tokens, served_tokens

# Different lengths, five adapters (one more than the engine's max_loras=4 slots: vLLM schedules the fifth when
# a slot frees) and the base model (no adapter) among them.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33], [40, 41], [50, 51, 52]]
PROMPTS += [[80, 81, 82, 83, 84, 85]]
ADAPTERS = ["mor", "milora", "lora", None, "mor_mean", "milora", "mor_attention"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def references(models):
    return [reference_tokens(models, a, p, NEW_TOKENS) for p, a in zip(PROMPTS, ADAPTERS, strict=True)]


@pytest.fixture(scope="module")
def llm(models):
    return engine(models)


def test_the_adapters_change_the_tokens(models, references):
    """Guard of the comparisons below: every adapter's reference differs from the base model's tokens."""
    for prompt, adapter, tokens in zip(PROMPTS, ADAPTERS, references, strict=True):
        if adapter is not None:
            assert tokens != reference_tokens(models, None, prompt, NEW_TOKENS), adapter


def test_mixed_batch_equals_transformers(llm, models, references):
    assert served_tokens(llm, models, PROMPTS, ADAPTERS, NEW_TOKENS) == references


def test_each_request_alone_equals_transformers(llm, models, references):
    for prompt, adapter, expected in zip(PROMPTS, ADAPTERS, references, strict=True):
        assert served_tokens(llm, models, [prompt], [adapter], NEW_TOKENS) == [expected], adapter


def test_milora_routes_once_per_request_and_frees_it(llm, models, references, monkeypatch):
    """Each MiLoRA request is routed once per block, on its prompt; decoding steps reuse it; finishing frees it
    (at the runner's next step, which is when vLLM tells the model runner which requests finished)."""
    calls = []

    def counting_route(router, hidden):
        calls.append(hidden.shape[0])
        return route(router, hidden)

    route = BlockRouter.route
    monkeypatch.setattr(BlockRouter, "route", counting_route)
    before = set(_hooks.SERVED.routes.weights)  # left by engines of other tests, which stopped mid-stream
    assert served_tokens(llm, models, PROMPTS, ADAPTERS, NEW_TOKENS) == references
    milora_prompts = [len(p) for p, a in zip(PROMPTS, ADAPTERS, strict=True) if a == "milora"]
    blocks = 2
    assert sorted(calls) == sorted(milora_prompts * blocks)  # pooled over exactly the prompt's tokens
    ours = set(_hooks.SERVED.routes.weights) - before
    assert len(ours) <= len(milora_prompts)
    served_tokens(llm, models, [[1, 2, 3]], [None], 1)
    assert set(_hooks.SERVED.routes.weights) - before == set()


def test_no_adapter_rows_get_no_adapter(llm, models):
    """vLLM 0.32's CPU LoRA ops compute slot -1 (no adapter) with the last slot; the plugin zeroes those rows.

    The base request is batched with requests of every adapter, each adapter loaded in turn into the last slot.
    """
    prompt = [60, 61, 62, 63]
    expected = reference_tokens(models, None, prompt, NEW_TOKENS)
    for adapter in ("lora", "mor", "milora"):
        tokens = served_tokens(llm, models, [[9, 8, 7], prompt], [adapter, None], NEW_TOKENS)
        assert tokens[1] == expected, adapter
