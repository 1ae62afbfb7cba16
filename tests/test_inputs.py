"""Unusual inputs never crash and never make the routers produce NaN, for every method; training is
deterministic."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from tests.methods import METHODS
from tests.tiny_models import tiny_llama


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return request.param


def make(method, base=None, autocast_adapter_dtype=True, **kwargs):
    factory, _ = METHODS[method]
    config = factory(init_weights=False, router_aux_loss_coef=0.01, **kwargs)
    return get_peft_model(base or tiny_llama(), config, autocast_adapter_dtype=autocast_adapter_dtype)


def outcome(fn):
    try:
        return fn().logits.shape
    except Exception as error:  # noqa: BLE001 - the error type is what is compared
        return type(error)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_behaves_like_the_base_model(method, shape):
    """transformers' LLaMA itself rejects some empty shapes; the adapter must add no failure of its own."""
    model = make(method).eval()
    input_ids = torch.zeros(shape, dtype=torch.long)
    with torch.no_grad():
        adapted = outcome(lambda: model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)))
        with model.disable_adapter():
            base = outcome(lambda: model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)))
    assert adapted == base


def test_mor_layers_accept_zero_tokens():
    """(MiLoRA experts only run inside their block, after its router: the model-level test covers them.)"""
    model = make("mor").eval()
    layers = [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "in_features")]
    for layer in layers:
        for lead in [(0,), (2, 0), (0, 3)]:
            x = torch.zeros(*lead, layer.in_features)
            with torch.no_grad():
                assert layer(x).shape == (*lead, layer.out_features)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_all_padding_row(method, input_ids, padding_side):
    model = make(method).eval()
    mask = torch.ones_like(input_ids)
    mask[1] = 0
    mask[0, :3] = 0 if padding_side == "left" else 1
    if padding_side == "right":
        mask[0, -3:] = 0
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids)
        base = model.get_base_model()
        with model.disable_adapter():
            base_out = base(input_ids=input_ids, attention_mask=mask)
    # the adapter adds no NaN where the base model has none, and the aux loss stays finite
    assert torch.equal(torch.isfinite(out.logits), torch.isfinite(base_out.logits))
    assert torch.isfinite(out.logits[0][mask[0].bool()]).all()
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.loss)


def test_sequences_of_length_one(method):
    model = make(method).eval()
    input_ids = torch.tensor([[5], [7]])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    assert torch.isfinite(out.logits).all()
    tokens = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=3)
    assert tokens.shape == (2, 4)


def test_long_prompt(method):
    model = make(method, base=tiny_llama(max_position_embeddings=4096)).eval()
    input_ids = torch.randint(1, 128, (1, 3000), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)


def test_half_precision_model_with_large_activations(method, input_ids):
    base = tiny_llama().to(torch.float16)
    with torch.no_grad():
        base.model.embed_tokens.weight.mul_(300.0)  # hidden states in the thousands
    model = make(method, base=base, autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        with model.disable_adapter():
            reference = model(input_ids=input_ids).logits
    assert torch.equal(torch.isfinite(out.logits), torch.isfinite(reference))
    assert torch.isfinite(out.aux_loss)


def train_and_snapshot(method, input_ids, steps=5):
    torch.manual_seed(1234)
    model = make(method).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    prefix = METHODS[method][1]
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{prefix}" in n}


def test_training_is_deterministic(method, input_ids):
    first, second = train_and_snapshot(method, input_ids), train_and_snapshot(method, input_ids)
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[k], second[k]) for k in first)
