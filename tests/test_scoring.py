"""``loramix.scoring.loglikelihood`` against each request computed alone, unpadded, in float64.

References: ``_alone`` runs one request as one unpadded forward (what a harness computes for it), and
``_generated`` runs MiLoRA the way ``generate`` does: the context alone first (the routers pool over it
and its KV cache keeps their decision), then the continuation continuing that cache.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loramix import MoRConfig
from loramix.scoring import left_padded, loglikelihood
from tests.milora.common import CACHE, milora_model
from tests.tiny_models import tiny_llama

REQUESTS = [
    ([5, 9, 14, 3], [7]),
    ([11, 2], [40, 41, 42]),
    ([8, 8, 8, 8, 8, 8, 8], [1, 2]),
    ([20], [21, 22, 23, 24]),
    ([33, 34, 35], [60]),
]


def _score(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """Σ log p of ``continuation`` from the logits of the positions that predict it, in float64."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    target = torch.tensor(continuation)
    total = sum(float(logprobs[i, t]) for i, t in enumerate(continuation))
    return total, bool(torch.equal(logprobs.argmax(-1), target))


@torch.no_grad()
def _alone(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    logits = model(input_ids=torch.tensor([context + continuation])).logits[0]
    return _score(logits[len(context) - 1 : -1], continuation)


@torch.no_grad()
def _generated(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    first = model(input_ids=torch.tensor([context]), use_cache=True)
    rest = model(input_ids=torch.tensor([continuation]), use_cache=True, **{CACHE: first[CACHE]})
    logits = torch.cat([first.logits[0, -1:], rest.logits[0, :-1]])
    return _score(logits, continuation)


def _check(results, references, atol=1e-4):
    assert len(results) == len(references)
    for (logprob, greedy), (ref_logprob, ref_greedy) in zip(results, references, strict=True):
        assert logprob == pytest.approx(ref_logprob, abs=atol)
        assert greedy == ref_greedy


@pytest.mark.parametrize("kind", ["base", "lora", "mor"])
def test_matches_each_request_alone(kind):
    model = tiny_llama(3)
    if kind == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    elif kind == "mor":
        model = get_peft_model(model, MoRConfig(r=4, num_experts=3, init_weights=False, lora_dropout=0.0))
    model.eval()
    references = [_alone(model, c, k) for c, k in REQUESTS]
    for batch_size in (1, 2, 5):  # padding and batch composition change nothing
        _check(loglikelihood(model, REQUESTS, batch_size=batch_size), references)
    # MoR routes per token: where its routers pool does not apply
    _check(loglikelihood(model, REQUESTS, route_on="all", batch_size=3), references)


class _NoPositions(torch.nn.Module):
    """A causal LM whose forward takes no ``position_ids`` (so left padding would shift its positions)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_a_model_without_position_ids_is_scored_request_by_request():
    model = tiny_llama(3)
    references = [_alone(model, c, k) for c, k in REQUESTS]
    _check(loglikelihood(_NoPositions(model), REQUESTS, batch_size=5), references)


def test_greedy_flag_can_be_true():
    model = tiny_llama(3)
    context = [5, 9, 14]
    with torch.no_grad():
        greedy = [int(model(input_ids=torch.tensor([context])).logits[0, -1].argmax())]
    assert loglikelihood(model, [(context, greedy)])[0][1] is True


def test_milora_routes_on_the_context_like_generate():
    model = milora_model(4).eval()
    generated = [_generated(model, c, k) for c, k in REQUESTS]
    one_forward = [_alone(model, c, k) for c, k in REQUESTS]
    _check(loglikelihood(model, REQUESTS, batch_size=2), generated)
    _check(loglikelihood(model, REQUESTS, route_on="all", batch_size=2), one_forward)
    # the two routings really differ on this model, so the checks above can tell them apart
    assert max(abs(a[0] - b[0]) for a, b in zip(generated, one_forward, strict=True)) > 1e-2


def test_left_padded_layout():
    ids, attention, positions, context = left_padded([([1, 2], [3]), ([4], [5, 6, 7])], pad_token_id=9)
    assert ids.tolist() == [[9, 1, 2, 3], [4, 5, 6, 7]]
    assert attention.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert positions.tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]
    assert context.tolist() == [[False, True, True, False], [True, False, False, False]]


@pytest.mark.parametrize(
    ("requests", "kwargs", "error", "message"),
    [
        ([([], [1])], {}, ValueError, "request 0 has an empty context"),
        ([([1], [])], {}, ValueError, "request 0 has an empty continuation"),
        ([([1], [2], [3])], {}, TypeError, "request 0 must be a"),
        ([([1], [2])], {"route_on": "prompt"}, ValueError, "route_on must be 'context' or 'all'"),
        ([([1], [2])], {"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ],
)
def test_bad_requests_are_refused(requests, kwargs, error, message):
    with pytest.raises(error, match=message):
        loglikelihood(tiny_llama(0), requests, **kwargs)
