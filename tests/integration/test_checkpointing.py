"""Activation (gradient) checkpointing, reentrant and not, gives the gradients of a run without it —
router balance loss included (MoR records router probabilities inside the checkpointed blocks, MiLoRA
caches its per-prompt routing)."""

from __future__ import annotations

import pytest
import torch

from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS
from tests.integration.helpers import (
    CHECKPOINTING_EVERY_N_LAYERS,
    METHOD_NAMES,
    enable_activation_checkpointing,
    peft_model,
    sequences,
)
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.filterwarnings(*IGNORE_UPSTREAM_DEPRECATIONS, "ignore::UserWarning")


def gradients(method, checkpointing=None, every_n_layers=1, coef=0.5):
    model = peft_model(method, base=tiny_llama(num_hidden_layers=3), router_aux_loss_coef=coef).train()
    if checkpointing is not None:
        enable_activation_checkpointing(
            model, checkpointing, **({"every_n_layers": every_n_layers} if every_n_layers != 1 else {})
        )
    ids = sequences(rows=3, length=10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt for MiLoRA's routing
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize(
    "reentrant, every_n_layers", [(False, 1), (True, 1), (True, 2)], ids=["non-reentrant", "reentrant", "mixed"]
)
def test_checkpointing_gives_the_same_gradients(method, reentrant, every_n_layers):
    if every_n_layers != 1 and not CHECKPOINTING_EVERY_N_LAYERS:
        pytest.skip("transformers < 5.16 has no every_n_layers (checkpointing of some blocks only)")
    loss, expected = gradients(method)
    ckpt_loss, grads = gradients(method, reentrant, every_n_layers)
    assert torch.equal(ckpt_loss, loss)
    assert grads.keys() == expected.keys() and len(grads) > 0
    router_grads = [n for n in grads if "router" in n]
    assert router_grads  # the balance loss reaches the routers
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_the_aux_loss_is_what_moves_the_router_gradient(method):
    """Guard for the test above: without the aux loss the router gradients differ, so a lost aux
    gradient under checkpointing would have been seen."""
    _, with_aux = gradients(method, coef=0.5)
    _, without = gradients(method, coef=0.0)
    routers = [n for n in with_aux if "router" in n]
    assert any(not torch.allclose(with_aux[n], without[n]) for n in routers)
