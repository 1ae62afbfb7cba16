"""Loading refuses, with a clear error, anything but the adapter that was saved (issue: nothing silent)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from loramix import MoRConfig
from loramix._config_base import LORAMIX_FORMAT
from tests.tiny_models import tiny_llama


@pytest.fixture
def adapter_dir(tmp_path):
    model = get_peft_model(tiny_llama(), MoRConfig(r=4, num_experts=3, init_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    return tmp_path


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def rewrite_weights(directory, edit):
    """Change the saved tensors and drop the recorded hash (as a hand-made or foreign checkpoint would)."""
    tensors = load_file(directory / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "adapter_model.safetensors")
    edit_config(directory, weights_sha256=None)


def test_adapter_for_another_base_shape(adapter_dir):
    other_base = tiny_llama(intermediate_size=64)
    with pytest.raises(ValueError, match=r"another shape.*mlp\.(down|gate|up)_proj\.mor_.*\(3, 64\)"):
        PeftModel.from_pretrained(other_base, adapter_dir)


def test_config_that_does_not_match_the_weights(adapter_dir):
    edit_config(adapter_dir, num_experts=5)
    with pytest.raises(ValueError, match=r"another shape.*mor_omega_A.*checkpoint \(3, 4\) vs model \(5, 4\)"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_missing_keys(adapter_dir):
    rewrite_weights(adapter_dir, lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.mor_router"))
    with pytest.raises(ValueError, match=r"1 adapter tensor\(s\) missing.*layers\.1\.mlp\.up_proj\.mor_router"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_unexpected_keys(adapter_dir):
    def add(tensors):
        tensors["base_model.model.model.layers.0.self_attn.q_proj.mor_A"] = torch.zeros(4, 32)

    rewrite_weights(adapter_dir, add)
    with pytest.raises(ValueError, match=r"no place for.*self_attn\.q_proj\.mor_A"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_weights_changed_after_saving(adapter_dir):
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors does not belong to .*adapter_config.json"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_truncated_weights(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="adapter_model.safetensors does not belong"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    edit_config(adapter_dir, weights_sha256=None)  # even without the hash, safetensors refuses the file
    with pytest.raises(Exception, match="(?i)deserializ|incomplete|invalid|header"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_missing_weights_file(adapter_dir):
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(Exception, match="adapter_model"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_pickled_weights_are_never_loaded(adapter_dir):
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    torch.save(tensors, adapter_dir / "adapter_model.bin")
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors only"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_config_from_a_newer_loramix(adapter_dir):
    edit_config(adapter_dir, loramix_format=LORAMIX_FORMAT + 1)
    for load in (MoRConfig.from_pretrained, PeftConfig.from_pretrained):
        with pytest.raises(ValueError, match="newer loramix"):
            load(adapter_dir)
    with pytest.raises(ValueError, match="newer loramix"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_unknown_config_keys(adapter_dir):
    edit_config(adapter_dir, expert_temperature=0.5)
    with pytest.raises(ValueError, match="expert_temperature"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_config_of_another_method(adapter_dir):
    edit_config(adapter_dir, peft_type="LORA")
    with pytest.raises(ValueError, match="LORA adapter, not MOR"):
        MoRConfig.from_pretrained(adapter_dir)


def test_a_failed_load_leaves_the_model_untouched(adapter_dir, input_ids):
    model = get_peft_model(tiny_llama(), MoRConfig(r=4, num_experts=3, init_weights=False, task_type="CAUSAL_LM"))
    model.eval()
    before = model(input_ids=input_ids).logits
    edit_config(adapter_dir, num_experts=5)
    with pytest.raises(ValueError):
        model.load_adapter(adapter_dir, adapter_name="second")
    assert torch.equal(model(input_ids=input_ids).logits, before)


def test_a_config_saved_alone_still_loads(tmp_path):
    MoRConfig(r=2, num_experts=2).save_pretrained(tmp_path)
    assert MoRConfig.from_pretrained(tmp_path).num_experts == 2


def test_transformers_load_adapter_is_strict_too(adapter_dir, input_ids):
    """transformers' own loader only prints a report for missing tensors; for loramix adapters it raises."""
    rewrite_weights(adapter_dir, lambda t: t.pop("base_model.model.model.layers.0.mlp.gate_proj.mor_A"))
    model = tiny_llama()
    expected = model(input_ids=input_ids).logits
    with pytest.raises(ValueError, match=r"was not loaded.*layers\.0\.mlp\.gate_proj\.mor_A"):
        model.load_adapter(str(adapter_dir))
    assert not getattr(model, "peft_config", {})
    assert not any(".mor_" in name for name in model.state_dict())
    assert torch.equal(model(input_ids=input_ids).logits, expected)


def test_transformers_load_adapter_shape_mismatch_leaves_no_adapter(adapter_dir):
    model = tiny_llama(intermediate_size=64)
    with pytest.raises(RuntimeError, match="size mismatch|mismatched"):
        model.load_adapter(str(adapter_dir))
    assert not getattr(model, "peft_config", {}) and not any(".mor_" in n for n in model.state_dict())
