"""The routing session of both methods (``loramix.routing.session``): per call, every entry point, every output form."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

from loramix import MiLoRAConfig, MoRConfig
from loramix.milora.layer import MiLoRARouter
from loramix.routing import session as routing_module
from loramix.routing.session import RoutingSession, capture_routing
from tests.milora.common import left_pad, random_tokens, wide_llama
from tests.milora.test_routing import count_routes, greedy_without_cache


def build(method: str, task_type: str | None = "CAUSAL_LM", seed: int = 0, **overrides):
    if method == "mor":
        config = MoRConfig(r=4, num_experts=3, init_weights=False, router_aux_loss_coef=0.3, task_type=task_type)
    else:
        config = MiLoRAConfig(r=4, top_k=2, lora_dropout=0.0, init_weights=False, router_aux_loss_coef=0.3,
                              task_type=task_type, **overrides)  # fmt: skip
    return get_peft_model(wide_llama(seed), config)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def batch(seed: int):
    ids, mask = left_pad([random_tokens(9, seed), random_tokens(5, seed + 1), random_tokens(7, seed + 2)])
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("method", ["mor", "milora"])
def test_threads_sharing_one_model_each_get_their_own_routing(method):
    """A threaded server: concurrent forwards on one model in eval mode each see their own inputs' routing."""
    model = build(method).eval()
    inputs = [batch(10 * i) for i in range(4)]
    with torch.no_grad():
        alone = [model(**x) for x in inputs]
    errors, start = [], threading.Barrier(len(inputs))

    def serve(i: int) -> None:
        start.wait()
        for _ in range(15):
            with torch.no_grad():
                out = model(**inputs[i])
            if not torch.equal(out.logits, alone[i].logits) or not torch.equal(out.aux_loss, alone[i].aux_loss):
                errors.append(i)
            if method == "milora" and not all(
                torch.equal(a, b) for a, b in zip(out.router_logits, alone[i].router_logits, strict=True)
            ):
                errors.append(i)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.parametrize("method", ["mor", "milora"])
@pytest.mark.parametrize("training", [True, False])
def test_return_dict_false_returns_the_same_loss_with_the_balance_term(method, training):
    model = build(method).train(training)
    x = batch(3)
    labels = torch.where(x["attention_mask"].bool(), x["input_ids"], -100)
    torch.manual_seed(0)
    as_dict = model(**x, labels=labels)
    torch.manual_seed(0)
    as_tuple = model(**x, labels=labels, return_dict=False)
    expected = lm_loss(as_dict.logits, labels) + 0.3 * as_dict.aux_loss  # computed here, not by loramix
    assert torch.allclose(as_dict.loss, expected, atol=1e-6)
    assert torch.allclose(as_tuple[0], expected, atol=1e-6)
    assert torch.equal(as_tuple[1], as_dict.logits)


@pytest.mark.parametrize("method", ["mor", "milora"])
def test_without_task_type_the_balance_loss_is_still_added(method):
    model = build(method, task_type=None).train()
    assert type(model) is PeftModel  # PEFT's plain wrapper, which skips the tuner's forward
    x = batch(5)
    out = model(**x, labels=x["input_ids"])
    assert out.aux_loss is not None and out.aux_loss > 0
    assert torch.allclose(out.loss, lm_loss(out.logits, x["input_ids"]) + 0.3 * out.aux_loss, atol=1e-6)


def test_without_task_type_milora_generate_routes_on_the_prompt(monkeypatch):
    model = build("milora", task_type=None).eval()
    ids, mask = left_pad([random_tokens(7, 11), random_tokens(4, 12)])
    calls = count_routes(monkeypatch)
    tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert set(calls.values()) == {1}
    assert torch.equal(tokens, greedy_without_cache(model, ids, mask, 6))


def test_milora_adapters_with_different_router_anchors_coexist(tmp_path):
    """Adapters whose routers wrap different modules: add, switch and delete in any order."""
    mlp = ["gate_proj", "up_proj", "down_proj"]
    first = build("milora", seed=0)
    second = get_peft_model(
        wide_llama(0),
        MiLoRAConfig(r=4, top_k=2, init_weights=False, lora_dropout=0.0, target_modules=mlp,
                     router_anchor="post_attention_layernorm", task_type="CAUSAL_LM"),
    )  # fmt: skip
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    x = batch(7)
    with torch.no_grad():
        expected = {"default": first(**x).logits, "b": second(**x).logits}
    for order in (["default", "b"], ["b", "default"]):
        model = PeftModel.from_pretrained(wide_llama(0), tmp_path / "a")
        model.load_adapter(tmp_path / "b", adapter_name="b")
        assert sum(isinstance(m, MiLoRARouter) for m in model.modules()) == 4  # two anchors per block
        for name in order + order:
            model.set_adapter(name)
            with torch.no_grad():
                assert torch.allclose(model(**x).logits, expected[name], atol=1e-5), (order, name)
        deleted, kept = order
        model.delete_adapter(deleted)
        model.set_adapter(kept)
        with torch.no_grad():
            assert torch.allclose(model(**x).logits, expected[kept], atol=1e-5), (order, kept)


def test_capture_routing_sees_only_routed_forwards():
    model = build("milora").eval()
    prompt = random_tokens((1, 6), 3)
    with capture_routing(model) as records:
        model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    assert len(records) == 2 and {r.adapter for r in records} == {"default"}  # one per block: decoding reuses
    assert all(r.probs.shape == (1, 7) and r.selected.sum() == 2 for r in records)


@pytest.mark.parametrize("method", ["mor", "milora"])
def test_no_session_outlives_its_forward_and_backward(method, monkeypatch):
    """Sessions (and the router tensors they hold) are freed with the step: nothing accumulates in training."""
    alive = weakref.WeakSet()
    created = []

    class Tracked(RoutingSession):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            alive.add(self)
            created.append(1)

    monkeypatch.setattr(routing_module, "RoutingSession", Tracked)
    model = build(method).train()
    x = batch(1)
    for _ in range(3):
        model(**x, labels=x["input_ids"]).loss.backward()
    model.eval().generate(**x, max_new_tokens=3)
    gc.collect()
    assert len(created) >= 4  # the patched class was used (3 training forwards and the generate's)
    assert len(alive) == 0
