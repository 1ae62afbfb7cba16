"""``torch.compile`` of a PEFT model with each adapter runs and matches eager, forward and backward.

Training is compiled with ``aot_eager`` (TorchDynamo tracing + AOTAutograd, the parts that meet
loramix's Python code: hooks, custom autograd functions, routing state); inference also with the
default ``inductor`` backend, which generates C++ on CPU (its first compile takes about half a minute
on two cores, later ones hit the on-disk cache)."""

from __future__ import annotations

import pytest
import torch

from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS
from tests.integration.helpers import METHOD_NAMES, peft_model, sequences

pytestmark = pytest.mark.filterwarnings(*IGNORE_UPSTREAM_DEPRECATIONS, "ignore::UserWarning")


def inputs():
    ids = sequences(rows=2, length=10)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_compiled_training_step_matches_eager(method):
    eager = peft_model(method).train()
    compiled_model = peft_model(method).train()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    for _ in range(2):  # the second call runs the cached graphs (MiLoRA: new routing state)
        ref, out = eager(**inputs()), compiled(**inputs())
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)
        ref.loss.backward()
        out.loss.backward()
    grads = {n: p.grad for n, p in compiled_model.named_parameters() if p.grad is not None}
    expected = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys() and grads
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_inductor_inference_matches_eager(method):
    model = peft_model(method).eval()
    with torch.no_grad():
        ref = model(**inputs())
        out = torch.compile(model)(**inputs())
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-4, atol=1e-5)
