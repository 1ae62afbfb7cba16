"""MiLoRAConfig defaults (the paper's) and errors that name the offending field."""

from __future__ import annotations

import pytest
from peft import get_peft_model

from loramix import MiLoRAConfig
from tests.milora.common import SEVEN, milora_model
from tests.tiny_models import tiny_llama


def test_defaults():
    config = MiLoRAConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.top_k) == (32, 64, 0.05, 3)
    assert (config.pooler, config.activation, config.rational_order) == ("attention", "rational", (6, 5))
    assert config.router_aux_loss_coef == 1e-2 and config.use_dora is False and config.init_weights is True
    assert (
        config.gate_form == "unit_mean"
    )  # not the paper's: it is silent on the scale (tests/milora/test_gate_form.py)
    assert config.peft_type == "MILORA" and config.scaling == 2.0


def test_default_targets_are_the_seven_llama_projections():
    model = get_peft_model(tiny_llama(), MiLoRAConfig(task_type="CAUSAL_LM"))
    assert model.peft_config["default"].target_modules == set(SEVEN)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(top_k=0), "top_k"),
        (dict(pooler="median"), "pooler"),
        (dict(activation="swish"), "activation"),
        (dict(rational_order=(6,)), "rational_order"),
        (dict(rational_order=(6, 0)), "rational_order"),
        (dict(r=0), "r"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
        (dict(router_anchor=""), "router_anchor"),
        (dict(normalize_gates="yes"), "normalize_gates"),
        (dict(gate_form="sum"), "gate_form"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        MiLoRAConfig(**kwargs)


def test_top_k_larger_than_the_experts_of_a_block():
    with pytest.raises(ValueError, match="`top_k`=3 .* experts \\(2\\)"):
        milora_model(top_k=3, target_modules=["q_proj", "v_proj"])


def test_a_requested_layer_without_targeted_module():
    with pytest.raises(ValueError, match="`layers_to_transform`.*\\[1\\]"):
        milora_model(target_modules=r".*layers\.0\..*(q|k|v)_proj", layers_to_transform=[0, 1])


def test_a_target_outside_any_block():
    with pytest.raises(ValueError, match="`target_modules` matches 'lm_head'"):
        milora_model(target_modules=["q_proj", "v_proj", "lm_head"])


def test_layers_to_transform_routes_only_those_blocks():
    model = milora_model(layers_to_transform=[1])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)
    assert any("input_layernorm.milora_router" in n for n in names)


def test_unknown_architecture_asks_for_targets_and_anchor():
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
        model.config.model_type = "my_model"
        return model

    with pytest.raises(ValueError, match="`target_modules`.*lm_head"):
        get_peft_model(gpt2(), MiLoRAConfig())
    with pytest.raises(ValueError, match="`router_anchor`"):
        get_peft_model(gpt2(), MiLoRAConfig(target_modules=["c_attn", "c_proj", "c_fc"], top_k=1))


def test_router_anchor_for_another_architecture():
    """GPT-2 blocks start with ``ln_1``: naming it is enough (GPT-2's Conv1D projections are not nn.Linear)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="nn.Linear"):
        get_peft_model(model, MiLoRAConfig(target_modules=["c_attn"], top_k=1, router_anchor="ln_1"))


def test_config_json_round_trip(tmp_path):
    config = MiLoRAConfig(r=8, top_k=2, rational_order=(4, 3), pooler="last", use_dora=True)
    config.save_pretrained(tmp_path)
    loaded = MiLoRAConfig.from_pretrained(tmp_path)
    assert loaded.rational_order == (4, 3) and loaded.pooler == "last" and loaded.use_dora and loaded.top_k == 2
