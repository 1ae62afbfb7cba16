"""MoRConfig: defaults from the paper, and an error naming the field for every bad value."""

from __future__ import annotations

import pytest
from peft import PeftConfig
from peft.utils.peft_types import PeftType

from loramix import MoRConfig


def test_paper_defaults():
    config = MoRConfig()
    assert (config.r, config.lora_alpha, config.num_experts, config.lora_dropout) == (8, 32, 8, 0.05)
    assert config.router == "softmax" and config.router_aux_loss_coef == 0.0 and config.bias == "none"
    assert config.peft_type is PeftType.MOR and config.peft_type.value == "MOR"
    assert config.scaling == 4.0


@pytest.mark.parametrize(
    "kwargs, error, field",
    [
        ({"r": 0}, ValueError, "r"),
        ({"r": 2.5}, TypeError, "r"),
        ({"r": True}, TypeError, "r"),
        ({"num_experts": 0}, ValueError, "num_experts"),
        ({"num_experts": "8"}, TypeError, "num_experts"),
        ({"lora_alpha": -1}, ValueError, "lora_alpha"),
        ({"lora_dropout": -0.1}, ValueError, "lora_dropout"),
        ({"lora_dropout": 1.0}, ValueError, "lora_dropout"),
        ({"lora_dropout": float("nan")}, ValueError, "lora_dropout"),
        ({"router": "top2"}, ValueError, "router"),
        ({"router_aux_loss_coef": -1e-3}, ValueError, "router_aux_loss_coef"),
        ({"router": "mean", "router_aux_loss_coef": 0.01}, ValueError, "router_aux_loss_coef"),
        ({"bias": "lora_only"}, ValueError, "bias"),
        ({"init_weights": "gaussian"}, ValueError, "init_weights"),
        ({"omega_init_std": -0.1}, ValueError, "omega_init_std"),
        ({"layers_to_transform": [0, -1]}, ValueError, "layers_to_transform"),
        ({"layers_pattern": "layers"}, ValueError, "layers_pattern"),
        ({"task_type": "NOT_A_TASK"}, ValueError, "task type"),
    ],
)
def test_invalid_values_name_the_field(kwargs, error, field):
    with pytest.raises(error, match=field):
        MoRConfig(**kwargs)


def test_unknown_field_is_rejected():
    with pytest.raises(TypeError, match="num_expert"):
        MoRConfig(num_expert=4)


def test_round_trip_through_json(tmp_path):
    config = MoRConfig(r=4, num_experts=3, target_modules=["up_proj"], router="mean", layers_to_transform=[1])
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MoRConfig)
    assert loaded.to_dict() == config.to_dict()
