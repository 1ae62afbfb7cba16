"""MiLoRA through PEFT on a tiny LlamaForCausalLM: structure, save/load, adapters, dtype, merge, unload."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_layer_status, get_peft_model
from safetensors.torch import load_file

from loramix import MiLoRAConfig
from loramix.milora.layer import Linear, MiLoRARouter
from loramix.routing.session import session_post_hook, session_pre_hook
from tests.milora.common import SEVEN, experts, left_pad, logits, milora_model, random_tokens, routers, wide_llama


def inputs():
    ids, mask = left_pad([random_tokens(8, 1), random_tokens(5, 2)])
    return {"input_ids": ids, "attention_mask": mask}


def test_structure_seven_experts_and_one_router_per_block():
    model = milora_model(init_weights=True)
    names = {n.rsplit(".", 1)[-1] for n in experts(model)}
    assert names == set(SEVEN) and len(experts(model)) == 2 * 7
    assert sorted(routers(model)) == [f"base_model.model.model.layers.{i}.input_layernorm" for i in range(2)]
    router = next(iter(routers(model).values()))
    assert router.expert_names["default"] == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
    assert router.milora_router["default"].shape == (7, 32)
    config = model.peft_config["default"]
    assert config.router_anchor == "input_layernorm" and config.target_modules == set(SEVEN)


@pytest.mark.parametrize("use_dora", [False, True])
def test_fresh_adapter_leaves_the_model_unchanged(use_dora):
    expected = logits(wide_llama(), **inputs())
    model = get_peft_model(wide_llama(), MiLoRAConfig(use_dora=use_dora, task_type="CAUSAL_LM")).eval()
    assert torch.allclose(logits(model, **inputs()), expected, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_save_load_round_trip_is_exact(tmp_path, adapter_name, use_dora):
    model = milora_model(use_dora=use_dora).eval()
    expected = logits(model, **inputs())
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".milora_" in key and not key.endswith(".default") for key in saved)
    assert "base_model.model.model.layers.0.input_layernorm.milora_rational_num" in saved
    assert any(key.endswith("milora_magnitude") for key in saved) == use_dora
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MILORA" and config["rational_order"] == [6, 5]
    loaded = PeftModel.from_pretrained(wide_llama(), tmp_path, adapter_name=adapter_name).eval()
    assert loaded.active_adapter == adapter_name
    assert torch.equal(logits(loaded, **inputs()), expected)
    for router in routers(loaded).values():
        assert set(router.milora_router) == {adapter_name}


def test_second_adapter_set_delete_disable_and_status(tmp_path):
    base_logits = logits(wide_llama(), **inputs())
    first = milora_model(seed=0).eval()
    first_logits = logits(first, **inputs())
    second = milora_model(seed=0, base=wide_llama(), pooler="mean", activation="gelu", top_k=3)
    torch.manual_seed(7)
    for module in second.modules():
        if isinstance(module, Linear):
            module.reset_expert_parameters("default", init_weights=False)
        if isinstance(module, MiLoRARouter):
            module.reset_router_parameters("default", init_weights=False)
    second_logits = logits(second.eval(), **inputs())
    second.save_pretrained(tmp_path)

    first.load_adapter(tmp_path, adapter_name="second")
    assert first.active_adapter == "default"
    assert torch.equal(logits(first, **inputs()), first_logits)
    first.set_adapter("second")
    assert torch.equal(logits(first, **inputs()), second_logits)
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".second") for n in trainable)
    assert any(".input_layernorm.milora_router.second" in n for n in trainable)  # routers follow set_adapter

    with first.disable_adapter():
        assert torch.equal(logits(first, **inputs()), base_logits)
    assert torch.equal(logits(first, **inputs()), second_logits)

    status = get_layer_status(first)
    assert len(status) == 2 * 7 + 2  # experts and routers
    assert all(set(s.available_adapters) == {"default", "second"} and s.active_adapters == ["second"] for s in status)

    first.set_adapter("default")
    first.delete_adapter("second")
    assert set(first.peft_config) == {"default"}
    assert all("second" not in n for n, _ in first.named_parameters())
    assert torch.equal(logits(first, **inputs()), first_logits)


def test_print_trainable_parameters_and_frozen_base(capsys):
    model = milora_model()
    model.print_trainable_parameters()
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable params: {expected:,}" in capsys.readouterr().out
    assert all(".milora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_routers_follow_dtype_and_device_moves():
    model = milora_model().eval()
    expected = logits(model, **inputs())
    model = model.to(torch.float64)
    assert {p.dtype for r in routers(model).values() for p in r.parameters()} == {torch.float64}
    assert torch.allclose(logits(model, **inputs()).float(), expected, atol=1e-4)


def test_merging_is_refused_and_changes_nothing():
    model = milora_model().eval()
    expected = logits(model, **inputs())
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(ValueError, match="cannot be merged.*per prompt"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, weight)
    assert torch.equal(logits(model, **inputs()), expected)


def test_unload_gives_the_base_model_back_without_hooks():
    expected = logits(wide_llama(), **inputs())
    base = milora_model().unload()
    assert not any(isinstance(m, (Linear, MiLoRARouter)) for m in base.modules())
    hooks = list(base._forward_pre_hooks.values()) + list(base._forward_hooks.values())
    assert session_pre_hook not in hooks and session_post_hook not in hooks
    assert torch.equal(logits(base, **inputs()), expected)


def test_transformers_load_adapter_routes_with_padding(tmp_path):
    """transformers' load_adapter keeps no tuner object: routing must live in the model itself."""
    model = milora_model().eval()
    expected = logits(model, **inputs())
    model.save_pretrained(tmp_path)
    plain = wide_llama()
    plain.load_adapter(str(tmp_path))
    assert torch.equal(logits(plain, **inputs()), expected)
    tokens = plain.generate(**inputs(), max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, model.generate(**inputs(), max_new_tokens=5, do_sample=False))


def test_deepcopy_keeps_routing_consistent():
    import copy

    model = milora_model().eval()
    expected = logits(model, **inputs())
    clone = copy.deepcopy(model)
    for router in routers(model).values():  # the original's routers must not be what the clone's experts use
        router.milora_router["default"].data.normal_()
    assert torch.equal(logits(clone, **inputs()), expected)
    assert not torch.equal(logits(model, **inputs()), expected)
