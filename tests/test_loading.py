"""Loading refuses, with a clear error, anything but the adapter that was saved (issue: nothing silent)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from loramix import MoRConfig
from loramix._tuner.config import LORAMIX_FORMAT
from tests.methods import METHODS
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


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_damaged_weights_file_without_a_hash_is_named_on_every_loading_path(tmp_path, damage, fmt, input_ids):
    """A config with no ``weights_sha256`` (written by hand or by another tool): the damaged file is named in the
    error, before anything is loaded, and the model is as before the call."""
    model = get_peft_model(tiny_llama(), MoRConfig(r=4, num_experts=3, init_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path, safe_serialization=fmt == "safetensors")
    edit_config(tmp_path, weights_sha256=None)
    path = tmp_path / f"adapter_model.{fmt}"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-100], "garbage": b"\x13" * 64 + data[64:], "empty": b""}[damage])
    base = tiny_llama()
    with torch.no_grad():
        before = base(input_ids=input_ids).logits
    message = rf"adapter weights file .*adapter_model\.{fmt} is damaged"
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    with pytest.raises(ValueError, match=message):
        base.load_adapter(str(tmp_path))
    assert not hasattr(base, "peft_config") or not base.peft_config
    with torch.no_grad():
        assert torch.equal(base(input_ids=input_ids).logits, before)


def test_missing_weights_file(adapter_dir):
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(Exception, match="adapter_model"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


class RunsCode:
    """Unpickling this calls ``os.mkdir(path)``: stands for a pickle that runs arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("method", list(METHODS))
def test_bin_adapter_round_trip(tmp_path, method, input_ids):
    """save_pretrained(safe_serialization=False) writes adapter_model.bin; every load path reads it back."""
    config, _ = METHODS[method]
    model = get_peft_model(tiny_llama(), config(init_weights=False)).eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["weights_sha256"] is not None
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)
        base = tiny_llama()
        base.load_adapter(str(tmp_path))
        assert torch.equal(base(input_ids=input_ids).logits, expected)


def test_bin_adapter_is_checked_like_safetensors(tmp_path):
    model = get_peft_model(tiny_llama(), MoRConfig(r=4, num_experts=3, init_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path, safe_serialization=False)
    edit_config(tmp_path, num_experts=5)
    with pytest.raises(ValueError, match=r"another shape.*mor_omega_A.*checkpoint \(3, 4\) vs model \(5, 4\)"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_truncated_bin_is_refused(tmp_path):
    """A .bin save killed while torch.save overwrote the file cannot be rolled back, but is never loaded."""
    model = get_peft_model(tiny_llama(), MoRConfig(r=4, num_experts=3, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path, safe_serialization=False)
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="adapter_model.bin does not belong"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_pickle_that_runs_code_is_never_unpickled(tmp_path):
    model = get_peft_model(tiny_llama(), MoRConfig(r=4, num_experts=3, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path, safe_serialization=False)
    marker = tmp_path / "code-ran"
    torch.save({"base_model.model.lm_head.weight": RunsCode(marker)}, tmp_path / "adapter_model.bin")

    # The config's hash does not match: refused before the file is opened.
    with pytest.raises(ValueError, match="adapter_model.bin does not belong"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    base = tiny_llama()
    with pytest.raises(ValueError, match="adapter_model.bin does not belong"):
        base.load_adapter(str(tmp_path))
    assert not getattr(base, "peft_config", {})

    # Without a hash (a hand-made or foreign adapter): torch.load(weights_only=True) refuses to call os.mkdir.
    edit_config(tmp_path, weights_sha256=None)
    with pytest.raises(Exception, match="(?i)weights.only"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    base = tiny_llama()
    with pytest.raises(Exception, match="(?i)weights.only"):
        base.load_adapter(str(tmp_path))
    assert not getattr(base, "peft_config", {}) and not any(".mor_" in name for name in base.state_dict())
    assert not marker.exists()

    torch.load(tmp_path / "adapter_model.bin", weights_only=False)  # the file does run code when unpickled
    assert marker.is_dir()


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
    # transformers 5 reports the missing tensor after loading; 4.x goes through PEFT's hook (loramix's own check)
    with pytest.raises(ValueError, match=r"(was not|nothing was) loaded.*layers\.0\.mlp\.gate_proj\.mor_A"):
        model.load_adapter(str(adapter_dir))
    assert not getattr(model, "peft_config", {})
    assert not any(".mor_" in name for name in model.state_dict())
    assert torch.equal(model(input_ids=input_ids).logits, expected)


def test_transformers_load_adapter_shape_mismatch_leaves_no_adapter(adapter_dir):
    model = tiny_llama(intermediate_size=64)
    # transformers 5: its own size-mismatch error; 4.x: loramix's check in PEFT's load hook
    with pytest.raises((RuntimeError, ValueError), match="size mismatch|mismatched|another shape"):
        model.load_adapter(str(adapter_dir))
    assert not getattr(model, "peft_config", {}) and not any(".mor_" in n for n in model.state_dict())


def test_transformers_load_adapter_checks_the_weights_hash(adapter_dir):
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, adapter_dir / "adapter_model.safetensors")
    model = tiny_llama()
    with pytest.raises(ValueError, match="adapter_model.safetensors does not belong"):
        model.load_adapter(str(adapter_dir))
    assert not getattr(model, "peft_config", {})


def _peft_older_than_transformers_requires() -> str | None:
    """transformers' minimum peft for its adapter methods, if the installed peft is older (else None)."""
    import importlib.metadata
    import re

    from packaging.version import Version
    from transformers.integrations import peft as transformers_peft

    required = getattr(transformers_peft, "MIN_PEFT_VERSION", "0")
    installed = re.sub(r"[^0-9.].*$", "", importlib.metadata.version("peft"))
    return required if Version(installed) < Version(required) else None


def test_transformers_adapter_methods_with_an_older_peft_fail_upstream_exactly(adapter_dir, input_ids):
    """transformers >= 5.24 gates set_adapter & co. behind peft >= 0.22 for every PEFT method (README,
    "Supported versions"); elsewhere they work on a loramix adapter. PeftModel.from_pretrained always works."""
    model = tiny_llama()
    model.load_adapter(str(adapter_dir))  # loads (and is checked strictly) on every supported version
    required = _peft_older_than_transformers_requires()
    if required is not None:
        import re

        with pytest.raises(ValueError, match=re.escape(f"please use a version >= {required}")):
            model.active_adapters()
        with pytest.raises(ValueError, match=re.escape(f"please use a version >= {required}")):
            model.set_adapter("default")
    else:
        assert model.active_adapters() == ["default"]
        model.set_adapter("default")
    expected = PeftModel.from_pretrained(tiny_llama(), adapter_dir)(input_ids=input_ids).logits  # the way out
    assert torch.equal(model(input_ids=input_ids).logits, expected)
