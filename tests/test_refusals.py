"""Nothing half-done: a refused operation, and a failed load through any entry point, change nothing.

Every test compares the whole state of the model before and after the refused call: every parameter and
buffer, the module tree (names and types: no tuner layer added or left behind), which parameters require
grad, training flags, the forward hooks (loramix's session hooks included), ``peft_config``, the active and
merged adapters of the model and of every tuner layer, the config's ``keys_to_ignore_at_inference``, and
the logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loramix.routing.session import session_post_hook, session_pre_hook
from tests.methods import METHODS
from tests.tiny_models import tiny_llama

METHOD_NAMES = sorted(METHODS)
MISSING = "<missing>"


def config(method: str, **overrides):
    return METHODS[method][0](**{"init_weights": False, "lora_dropout": 0.0, **overrides})


def adapted(method: str, **overrides):
    torch.manual_seed(1)
    return get_peft_model(tiny_llama(), config(method, **overrides)).eval()


def whole_state(model, input_ids) -> dict:
    peft_config = getattr(model, "peft_config", None)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "hooks": [
            (n, list(m._forward_pre_hooks.values()), list(m._forward_hooks.values())) for n, m in model.named_modules()
        ],
        "peft_config": MISSING if peft_config is None else {k: c.to_dict() for k, c in peft_config.items()},
        "active_adapters": list(model.active_adapters) if isinstance(model, PeftModel) else MISSING,
        "layers": [(n, list(m.active_adapters), list(m.merged_adapters)) for n, m in layers],
        "ignored_at_inference": getattr(model.config, "keys_to_ignore_at_inference", MISSING),
        "logits": logits,
    }


def assert_same(before: dict, after: dict) -> None:
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [k for k, v in before["tensors"].items() if not torch.equal(after["tensors"][k], v)]
    assert not changed, changed
    for key in before:
        if key not in ("tensors", "logits"):
            assert after[key] == before[key], key
    assert torch.equal(after["logits"], before["logits"])


def plain(model) -> bool:
    """No trace of an adapter: no tuner layer, no session hook, no ``peft_config``."""
    return (
        not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        and session_pre_hook not in model._forward_pre_hooks.values()
        and session_post_hook not in model._forward_hooks.values()
        and not hasattr(model, "peft_config")
    )


# ---------------------------------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=[dict(router="mean"), dict(num_experts=1)], ids=["mean-router", "one-expert"])
def mixed_mor(request):
    """A mergeable MoR adapter on the whole FFN ("mergeable") and a routed one on down_proj only ("routed"),
    both active: the modules visited first hold only the mergeable one."""
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(), config("mor", **request.param), adapter_name="mergeable").eval()
    model.add_adapter("routed", config("mor", target_modules=["down_proj"]))
    model.base_model.set_adapter(["mergeable", "routed"])
    return model


@pytest.mark.parametrize("names", [["mergeable", "routed"], ["routed", "mergeable"], None, ["mergeable", "nope"]])
def test_merge_adapter_refuses_before_merging_anything(mixed_mor, input_ids, names):
    model = mixed_mor
    before = whole_state(model, input_ids)
    with pytest.raises(ValueError, match="routed|nope"):
        model.merge_adapter(adapter_names=names)
    assert_same(before, whole_state(model, input_ids))
    # The bug this guards against: unload() after a half-done merge returned a different base model.
    with torch.no_grad():
        assert torch.equal(model.unload()(input_ids=input_ids).logits, tiny_llama()(input_ids=input_ids).logits)


@pytest.mark.parametrize("names", [["mergeable", "routed"], None])
def test_merge_and_unload_refuses_before_merging_anything(mixed_mor, input_ids, names):
    before = whole_state(mixed_mor, input_ids)
    with pytest.raises(ValueError, match="routed"):
        mixed_mor.merge_and_unload(adapter_names=names)
    assert_same(before, whole_state(mixed_mor, input_ids))


def test_a_layer_checks_every_adapter_before_changing_its_weight(mixed_mor):
    layer = mixed_mor.base_model.model.model.layers[0].mlp.down_proj
    weight = layer.get_base_layer().weight.clone()
    with pytest.raises(ValueError, match="routed"):
        layer.merge(adapter_names=["mergeable", "routed"])
    assert torch.equal(layer.get_base_layer().weight, weight) and layer.merged_adapters == []


def test_the_mergeable_adapter_alone_still_merges_exactly(mixed_mor, input_ids):
    mixed_mor.set_adapter("mergeable")
    with torch.no_grad():
        expected = mixed_mor(input_ids=input_ids).logits
        mixed_mor.merge_adapter(adapter_names=["mergeable"])
        torch.testing.assert_close(mixed_mor(input_ids=input_ids).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("operation", ["merge_and_unload", "merge_adapter"])
def test_merging_a_routed_adapter_changes_nothing(method, operation, input_ids):
    model = adapted(method)
    before = whole_state(model, input_ids)
    with pytest.raises(ValueError, match="cannot be merged|Cannot merge"):
        getattr(model, operation)()
    assert_same(before, whole_state(model, input_ids))


# ---------------------------------------------------------------------------------------------------------------
# set_adapter, delete_adapter
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=METHOD_NAMES)
def two_adapters(request):
    model = adapted(request.param)
    model.add_adapter("other", config(request.param))
    return model


@pytest.mark.parametrize("through", ["PeftModel", "tuner"])
def test_set_adapter_to_an_unknown_name_changes_nothing(two_adapters, input_ids, through):
    before = whole_state(two_adapters, input_ids)
    with pytest.raises(ValueError, match="nope.*not found"):
        if through == "PeftModel":
            two_adapters.set_adapter("nope")
        else:
            two_adapters.base_model.set_adapter(["other", "nope"])
    assert_same(before, whole_state(two_adapters, input_ids))


@pytest.mark.parametrize("through", ["PeftModel", "tuner"])
def test_delete_adapter_of_an_unknown_name_changes_nothing(two_adapters, input_ids, through):
    before = whole_state(two_adapters, input_ids)
    with pytest.raises(ValueError, match="nope does not exist"):
        (two_adapters if through == "PeftModel" else two_adapters.base_model).delete_adapter("nope")
    assert_same(before, whole_state(two_adapters, input_ids))


# ---------------------------------------------------------------------------------------------------------------
# adding and loading
# ---------------------------------------------------------------------------------------------------------------

# A target that is not an nn.Linear, met after some targets were already replaced.
HALFWAY = {"mor": ["gate_proj", "act_fn"], "milora": ["q_proj", "k_proj", "act_fn"]}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_get_peft_model_that_fails_halfway_leaves_the_base_as_it_was(method, input_ids):
    base = tiny_llama()
    before = whole_state(base, input_ids)
    with pytest.raises(TypeError, match="act_fn"):
        get_peft_model(base, config(method, target_modules=HALFWAY[method]))
    assert_same(before, whole_state(base, input_ids))
    assert plain(base)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_add_adapter_that_fails_halfway_changes_nothing(method, input_ids):
    model = adapted(method)
    before = whole_state(model, input_ids)
    with pytest.raises(TypeError, match="act_fn"):
        model.add_adapter("second", config(method, target_modules=HALFWAY[method]))
    assert_same(before, whole_state(model, input_ids))


def save_adapter(directory, method: str, base=None) -> None:
    torch.manual_seed(2)
    get_peft_model(base if base is not None else tiny_llama(), config(method)).save_pretrained(directory)


def drop_tensor(directory, method: str) -> None:
    """A checkpoint without one of its expert tensors (as a hand-made or foreign one could be)."""
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.pop(next(k for k in sorted(tensors) if f".{METHODS[method][1]}A" in k))
    save_file(tensors, path)
    unhash(directory)


def truncate(directory, method: str) -> None:
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    unhash(directory)


def unhash(directory) -> None:
    """Drop the recorded weights hash, so that the loader gets as far as reading the weights."""
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "weights_sha256": None}))


BAD = {
    # saved for a base with another FFN size: every FFN tensor has another shape
    "other-base-size": (lambda d, m: save_adapter(d, m, base=tiny_llama(intermediate_size=64)), "another shape"),
    "missing-tensor": (lambda d, m: (save_adapter(d, m), drop_tensor(d, m)), "missing"),
    # fails while PEFT reads the file, after it created the adapter's layers
    "unreadable-file": (lambda d, m: (save_adapter(d, m), truncate(d, m)), "(?i)deserializ|incomplete|invalid|header"),
}


@pytest.fixture(params=[(m, kind) for m in METHOD_NAMES for kind in BAD], ids=lambda p: f"{p[0]}-{p[1]}")
def bad_adapter(request, tmp_path):
    method, kind = request.param
    make, error = BAD[kind]
    make(tmp_path, method)
    return method, tmp_path, error


def test_peft_from_pretrained_that_fails_leaves_the_base_as_it_was(bad_adapter, input_ids, tmp_path_factory):
    method, directory, error = bad_adapter
    base = tiny_llama()
    before = whole_state(base, input_ids)
    with pytest.raises(Exception, match=error):
        PeftModel.from_pretrained(base, directory)
    assert_same(before, whole_state(base, input_ids))
    assert plain(base)
    # ... and the base takes a good adapter afterwards as if nothing had happened.
    good = tmp_path_factory.mktemp("good")
    save_adapter(good, method)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(tiny_llama(), good)(input_ids=input_ids).logits
        assert torch.equal(PeftModel.from_pretrained(base, good)(input_ids=input_ids).logits, expected)


@pytest.mark.parametrize("name", ["second", "other"], ids=["new-name", "existing-name"])
def test_load_adapter_into_a_model_in_use_that_fails_changes_nothing(bad_adapter, input_ids, name):
    """A new adapter is removed again; reloading the weights of an existing adapter keeps that adapter."""
    method, directory, error = bad_adapter
    model = adapted(method)
    model.add_adapter("other", config(method, init_weights=False))
    before = whole_state(model, input_ids)
    with pytest.raises(Exception, match=error):
        model.load_adapter(directory, adapter_name=name)
    assert_same(before, whole_state(model, input_ids))


def test_transformers_load_adapter_that_fails_leaves_the_base_as_it_was(bad_adapter, input_ids):
    method, directory, error = bad_adapter
    # transformers 5 reports these itself after loading; 4.x goes through PEFT's load hook (loramix's check)
    error = {"another shape": "size mismatch|mismatched|another shape", "missing": "(was not|nothing was) loaded"}.get(
        error, error
    )
    base = tiny_llama()
    before = whole_state(base, input_ids)
    with pytest.raises(Exception, match=error):
        base.load_adapter(str(directory))
    assert_same(before, whole_state(base, input_ids))
    assert plain(base) and not base._hf_peft_config_loaded


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_auto_peft_model_that_fails_leaves_its_base_as_it_was(tmp_path, method, input_ids, monkeypatch):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    save_adapter(adapter_dir, method, base=AutoModelForCausalLM.from_pretrained(base_dir))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    drop_tensor(adapter_dir, method)

    loaded = []

    class Spy:  # AutoPeftModelForCausalLM's base model class, keeping the base model it loads
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            loaded.append(AutoModelForCausalLM.from_pretrained(*args, **kwargs))
            return loaded[-1]

    monkeypatch.setattr(AutoPeftModelForCausalLM, "_target_class", Spy)
    with pytest.raises(ValueError, match="missing"):
        AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert len(loaded) == 1 and plain(loaded[0])
    assert_same(
        whole_state(AutoModelForCausalLM.from_pretrained(base_dir), input_ids), whole_state(loaded[0], input_ids)
    )
