"""PEFT's own expectations of a tuner, for every loramix method.

Ported, in this project's words, from the parts of PEFT's ``tests/testing_common.py``
(``PeftCommonTester``, Apache-2.0, (c) the HuggingFace team) that apply to routed mixtures. What does
not apply, and why, is listed in the README ("Guarantees"): merging a routed mixture,
``add_weighted_adapter``, and prompt-learning-only checks. Mixed-adapter batches (``adapter_names``) have
their own file, ``tests/test_mixed_batch.py``.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer

from tests.integration.helpers import enable_activation_checkpointing
from tests.methods import METHODS
from tests.tiny_models import tiny_llama


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return request.param


def make(method, adapter_name="default", base=None, **config_kwargs):
    factory, _ = METHODS[method]
    config_kwargs.setdefault("init_weights", False)
    return get_peft_model(base or tiny_llama(), factory(**config_kwargs), adapter_name=adapter_name)


def adapter_params(model, method):
    prefix = METHODS[method][1]
    return {n: p for n, p in model.named_parameters() if f".{prefix}" in n}


def out(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def test_model_attributes_and_adapter_name(method):
    model = make(method, adapter_name="test-adapter")
    for attr in ("save_pretrained", "from_pretrained", "push_to_hub"):
        assert hasattr(model, attr)
    names = list(adapter_params(model, method))
    assert names and all(n.endswith(".test-adapter") or ".test-adapter." in n for n in names)


def test_prepare_for_kbit_training_then_input_grads(method, input_ids):
    base = prepare_model_for_kbit_training(tiny_llama())
    assert not any(p.requires_grad for p in base.parameters())
    model = make(method, base=base)
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(input_ids).requires_grad


def test_save_pretrained_files_and_state(method, tmp_path, input_ids):
    model = make(method).eval()
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= names
    assert not names & {"model.safetensors", "config.json", "adapter_model.bin"}
    readme = (tmp_path / "README.md").read_text()
    assert re.search(r"library_name: peft", readme)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert not any("missing adapter keys" in str(w.message) for w in caught)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_save_selected_adapters(method, tmp_path):
    model = make(method)
    model.add_adapter("other", METHODS[method][0](init_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "other" / "adapter_config.json").exists()
    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["other"])
    assert (only / "other" / "adapter_model.safetensors").exists() and not (only / "adapter_model.safetensors").exists()


def test_from_pretrained_with_config_object(method, tmp_path, input_ids):
    model = make(method).eval()
    model.save_pretrained(tmp_path)
    config = type(model.peft_config["default"]).from_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config)
    assert torch.equal(out(loaded.eval(), input_ids), out(model, input_ids))


def test_low_cpu_mem_usage_loading(method, tmp_path, input_ids):
    model = make(method).eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert torch.equal(out(loaded.eval(), input_ids), out(model, input_ids))
    bare = tiny_llama()
    inject_adapter_in_model(METHODS[method][0](), bare, low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in bare.parameters()}


def test_generate_with_keyword_and_positional_inputs(method, input_ids):
    model = make(method).eval()
    mask = torch.ones_like(input_ids)
    by_kw = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    by_pos = model.generate(input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert by_kw.shape == (2, input_ids.shape[1] + 4) and torch.equal(by_kw, by_pos)


def test_generate_in_half_precision(method, input_ids):
    model = make(method, base=tiny_llama().to(torch.bfloat16)).eval()
    tokens = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=3)
    assert tokens.shape[1] == input_ids.shape[1] + 3


def test_adapter_dtype_autocast(method):
    model = make(method, base=tiny_llama().to(torch.bfloat16))
    assert {p.dtype for p in adapter_params(model, method).values()} == {torch.float32}
    factory, _ = METHODS[method]
    kept = get_peft_model(tiny_llama().to(torch.bfloat16), factory(), autocast_adapter_dtype=False)
    assert {p.dtype for p in adapter_params(kept, method).values()} == {torch.bfloat16}


def test_training_touches_only_adapter_parameters(method, input_ids):
    model = make(method).train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= set(adapter_params(model, method))
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in adapter_params(model, method))


def test_layer_wise_training(method, input_ids):
    model = make(method, layers_to_transform=[0]).train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all(".layers.0." in n for n in with_grad)


def test_gradient_checkpointing_training(method, input_ids):
    model = make(method)
    enable_activation_checkpointing(model, use_reentrant=False)
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    grads = [p.grad for p in adapter_params(model, method).values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_inputs_embeds(method, input_ids):
    model = make(method).eval()
    embeds = model.get_input_embeddings()(input_ids)
    with torch.no_grad():
        from_embeds = model(inputs_embeds=embeds).logits
    assert torch.allclose(from_embeds, out(model, input_ids), atol=1e-6)


def test_delete_active_and_inactive_adapters(method):
    model = make(method)
    model.add_adapter("other", METHODS[method][0]())
    model.delete_adapter("other")  # inactive
    assert set(model.peft_config) == {"default"} and not any(".other" in n for n in model.state_dict())
    model.add_adapter("other", METHODS[method][0]())
    model.set_adapter("other")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.delete_adapter("other")  # active
    assert model.active_adapters == ["default"] and not any(".other" in n for n in model.state_dict())


def test_unload_and_disable(method, input_ids):
    expected = out(tiny_llama(), input_ids)
    model = make(method).eval()
    assert not torch.equal(out(model, input_ids), expected)
    with model.disable_adapter():
        assert torch.equal(out(model, input_ids), expected)
    base = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert torch.equal(out(base, input_ids), expected)


def test_modules_to_save(method, tmp_path, input_ids):
    model = make(method, modules_to_save=["lm_head"]).train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    lm_head = model.base_model.model.lm_head
    assert lm_head.modules_to_save["default"].weight.grad is not None
    assert lm_head.original_module.weight.grad is None
    with torch.no_grad():
        lm_head.modules_to_save["default"].weight.add_(0.5)
    model.eval().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(out(loaded, input_ids), out(model, input_ids))


def test_add_weighted_adapter_is_not_offered(method):
    assert not hasattr(type(make(method).base_model), "add_weighted_adapter")
