"""MiLoRAConfig.gate_form: the default, the deprecated `normalize_gates`, and how each form is saved and loaded.

Adapter format 1 (loramix 0.1) files hold `normalize_gates` and no `gate_form`; they must load with the gates they
were trained with (the paper's `p_i` unless `normalize_gates` was true), on every loading path. A file is written at
the oldest format that holds it, so loramix 0.1 reads what it can and refuses the rest (format 2).
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

from loramix import MiLoRAConfig, MoRConfig
from loramix._tuner.config import LoramixConfig
from tests.milora.common import milora_model, wide_llama
from tests.tiny_models import tiny_llama


def saved_config(model, directory) -> dict:
    model.save_pretrained(directory)
    return json.loads((directory / "adapter_config.json").read_text())


def test_default_is_unit_mean():
    config = MiLoRAConfig()
    assert config.gate_form == "unit_mean" and config.normalize_gates is None


@pytest.mark.parametrize("normalize, form", [(True, "normalized"), (False, "probability")])
def test_normalize_gates_is_deprecated_and_mapped(normalize, form):
    with pytest.warns(FutureWarning, match=f"`normalize_gates` is deprecated.*gate_form='{form}'"):
        config = MiLoRAConfig(normalize_gates=normalize)
    assert config.gate_form == form and config.normalize_gates is None
    with pytest.warns(FutureWarning):
        assert MiLoRAConfig(normalize_gates=normalize, gate_form=form).gate_form == form  # agreeing: accepted


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gate_form="softmax"), "`gate_form` must be one of"),
        (dict(normalize_gates="yes"), "`normalize_gates` must be one of"),
        (dict(normalize_gates=True, gate_form="unit_mean"), "`normalize_gates`=True means `gate_form`='normalized'"),
    ],
)
def test_invalid_or_conflicting_gate_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiLoRAConfig(**kwargs)


def test_top_k_one_warns_when_the_gate_is_constant():
    with pytest.warns(UserWarning, match="top_k=1 and gate_form='unit_mean'.*does not train the routers"):
        MiLoRAConfig(top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MiLoRAConfig(top_k=1, gate_form="probability")
        MiLoRAConfig(top_k=1, inference_mode=True)  # loaded for inference: nothing to train


@pytest.mark.parametrize(
    "fields, fmt, normalize_gates, gate_form",
    [
        (dict(gate_form="probability"), 1, False, None),
        (dict(gate_form="normalized"), 1, True, None),
        (dict(), 2, None, "unit_mean"),
        (dict(gate_form="probability", router_lr_ratio=5.0), 2, None, "probability"),
    ],
)
def test_saved_at_the_oldest_format_that_holds_it(tmp_path, fields, fmt, normalize_gates, gate_form):
    saved = saved_config(milora_model(**fields), tmp_path)
    assert saved["loramix_format"] == fmt
    assert saved.get("normalize_gates") is normalize_gates and saved.get("gate_form") == gate_form
    assert ("normalize_gates" in saved) == (fmt == 1) and ("gate_form" in saved) == (fmt == 2)


@pytest.mark.parametrize("ratio, fmt", [(1.0, 1), (4.0, 2)])
def test_mor_is_format_2_only_with_a_router_lr_ratio(tmp_path, ratio, fmt):
    model = get_peft_model(tiny_llama(), MoRConfig(r=4, num_experts=2, router_lr_ratio=ratio, task_type="CAUSAL_LM"))
    assert saved_config(model, tmp_path)["loramix_format"] == fmt


def _outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("normalize, form", [(False, "probability"), (True, "normalized")])
def test_a_loramix_0_1_file_loads_with_its_gates_on_every_path(tmp_path, normalize, form):
    """The config file loramix 0.1 wrote (format 1, `normalize_gates`, no `gate_form`) keeps its meaning although
    the default is now 'unit_mean'; no deprecation warning for a file the user cannot change."""
    trained = milora_model(gate_form=form).eval()
    saved = saved_config(trained, tmp_path)
    assert saved["loramix_format"] == 1 and saved["normalize_gates"] is normalize and "gate_form" not in saved
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    expected = _outputs(trained, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert MiLoRAConfig.from_pretrained(tmp_path).gate_form == form
        assert PeftConfig.from_pretrained(tmp_path).gate_form == form
        loaded = PeftModel.from_pretrained(wide_llama(), tmp_path).eval()
        assert loaded.peft_config["default"].gate_form == form
        torch.testing.assert_close(_outputs(loaded, ids), expected, rtol=1e-5, atol=1e-5)
        base = wide_llama()
        base.load_adapter(str(tmp_path))
        torch.testing.assert_close(_outputs(base, ids), expected, rtol=1e-5, atol=1e-5)
    assert not [w for w in caught if "normalize_gates" in str(w.message)]
    # the gate form matters: the same weights read as format 2 with the new default compute something else
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**{k: v for k, v in saved.items() if k != "normalize_gates"}, "loramix_format": 2}))
    other = PeftModel.from_pretrained(wide_llama(), tmp_path).eval()
    assert other.peft_config["default"].gate_form == "unit_mean"
    assert not torch.allclose(_outputs(other, ids), expected, atol=1e-3)


def test_unit_mean_round_trips(tmp_path):
    trained = milora_model().eval()
    saved_config(trained, tmp_path)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    loaded = PeftModel.from_pretrained(wide_llama(), tmp_path).eval()
    assert loaded.peft_config["default"].gate_form == "unit_mean"
    torch.testing.assert_close(_outputs(loaded, ids), _outputs(trained, ids), rtol=1e-5, atol=1e-5)


# The keys of loramix's own fields in a MiLoRA adapter_config.json written by loramix 0.1 (adapter format 1); PEFT's
# own fields come on top and change with PEFT.
LORAMIX_0_1_MILORA_KEYS = {
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "modules_to_save", "init_weights", "loramix_format", "weights_sha256", "top_k", "normalize_gates", "pooler",
    "router_input", "activation", "rational_order", "router_aux_loss_coef", "use_dora", "router_anchor",
}  # fmt: skip


@pytest.mark.parametrize("form", ["probability", "normalized"])
def test_a_format_1_file_has_exactly_loramix_0_1_keys(tmp_path, form):
    saved = saved_config(milora_model(gate_form=form), tmp_path)
    peft_keys = {f.name for f in dataclasses.fields(PeftConfig)}
    assert set(saved) - peft_keys - {"auto_mapping"} == LORAMIX_0_1_MILORA_KEYS


def test_a_format_1_file_without_normalize_gates_means_the_papers_gates(tmp_path):
    """MiLoRA adapters saved before `normalize_gates` existed name no gate form at all."""
    saved = saved_config(milora_model(gate_form="probability"), tmp_path)
    del saved["normalize_gates"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    assert PeftModel.from_pretrained(wide_llama(), tmp_path).peft_config["default"].gate_form == "probability"


@pytest.mark.parametrize("normalize, form", [(True, "normalized"), (False, "probability")])
def test_setting_normalize_gates_on_a_built_config_sets_its_gate_form(tmp_path, normalize, form):
    """loramix 0.1 code that sets the old field after construction keeps its meaning (with the deprecation)."""
    config = MiLoRAConfig()
    with pytest.warns(FutureWarning, match=f"gate_form='{form}'"):
        config.normalize_gates = normalize
    assert config.gate_form == form and config.normalize_gates is None


def test_a_loaded_config_is_of_this_installations_format(tmp_path):
    saved_config(milora_model(gate_form="probability"), tmp_path)
    loaded = MiLoRAConfig.from_pretrained(tmp_path)
    assert loaded.loramix_format == LoramixConfig.__dataclass_fields__["loramix_format"].default
    assert loaded.adapter_format() == 1
