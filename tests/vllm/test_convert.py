"""The served form of an adapter (LoRA matrices + gates) against float64 references of the methods' maths."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import loramix
from loramix.mor.served import MoRGate
from loramix.vllm.convert import UnservableAdapter, convert, read_config
from loramix.vllm.gates import GateTables, PromptGate, Step, StepLayout, token_routing
from loramix.vllm.refusals import EngineSettings, check_engine, check_rank
from tests.milora.reference import router_reference
from tests.mor.reference import mor_linear_reference

from .conftest import tiny_config

PREFIX = "base_model.model."


def _saved(tmp_path, config, seed=0):
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_config())
    get_peft_model(base, config).save_pretrained(tmp_path)
    return load_file(tmp_path / "adapter_model.safetensors")


def _served_delta(served, module, x, gate=None):
    """``expand(gate(shrink(x)))`` as vLLM computes it, in float64."""
    a = served.tensors[f"{PREFIX}{module}.lora_A.weight"].double()
    b = served.tensors[f"{PREFIX}{module}.lora_B.weight"].double()
    buffer = x @ a.T
    if gate is not None:  # one slice, one slot: the plugin's gate tables, as vLLM's add_expand sees them
        tables = GateTables(1, 1, buffer.shape[1], "cpu")
        tables.set_slots([[gate]])
        tables.apply_(buffer.unsqueeze(0), torch.zeros(buffer.shape[0], dtype=torch.long))
    return buffer @ b.T


@pytest.mark.parametrize(("router", "ratio"), [("softmax", 1.0), ("mean", 1.0), ("softmax", 7.0)])
def test_mor_served_form_equals_the_mixture(tmp_path, router, ratio):
    """The served form computes the mixture of the saved tensors, the router weight being router_lr_ratio · P."""
    config = loramix.MoRConfig(
        r=4, num_experts=3, lora_alpha=8, router=router, init_weights=False, router_lr_ratio=ratio
    )  # fmt: skip
    raw = _saved(tmp_path, config)
    served = convert(str(tmp_path), tiny_config())
    module = "model.layers.1.mlp.gate_proj"
    p = {k.rsplit(".", 1)[-1]: v for k, v in raw.items() if k.startswith(f"{PREFIX}{module}.")}
    x = torch.randn(5, 64, dtype=torch.float64)
    expected = mor_linear_reference(
        x, torch.zeros(96, 64), None, p["mor_A"], p["mor_B"], p["mor_omega_A"], p["mor_omega_B"],
        None if router == "mean" else ratio * p["mor_router"], scaling=2.0,
    )  # fmt: skip
    gate = served.gates.get(module)
    assert (gate == MoRGate(3, 4)) if router == "softmax" else (gate is None)
    assert served.rank == (3 * 4 + 3 if router == "softmax" else 4)
    torch.testing.assert_close(_served_delta(served, module, x, gate), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("gate_form", "ratio"), [("probability", 1.0), ("normalized", 1.0), ("unit_mean", 1.0), ("probability", 5.0)]
)
def test_milora_routes_and_experts_equal_loramix(tmp_path, gate_form, ratio):
    config = loramix.MiLoRAConfig(
        r=4, top_k=2, lora_alpha=8, init_weights=False, gate_form=gate_form, router_lr_ratio=ratio
    )  # fmt: skip
    raw = _saved(tmp_path, config)
    served = convert(str(tmp_path), tiny_config())
    model = PeftModel.from_pretrained(LlamaForCausalLM(tiny_config()), tmp_path)
    for block, router in served.routers.items():
        loaded = model.base_model.model.model.layers[block].input_layernorm
        assert router.experts == tuple(f"model.layers.{block}.{n}" for n in loaded.expert_names["default"])
        hidden = torch.randn(1, 7, 64, dtype=torch.float64)
        r = f"{PREFIX}model.layers.{block}.input_layernorm.milora_"
        _, gates = router_reference(
            hidden, None, "attention", raw[r + "pool_query"], "rational", ratio * raw[r + "router"], 2,
            raw[r + "rational_num"], raw[r + "rational_den"], gate_form,
        )  # fmt: skip
        assert router.gate_form == gate_form
        torch.testing.assert_close(router.route(hidden[0]).double(), gates[0], rtol=1e-5, atol=1e-6)
        for column, module in enumerate(router.experts):
            assert served.gates[module] == PromptGate(block, column)
    module = "model.layers.0.self_attn.o_proj"
    x = torch.randn(3, 64, dtype=torch.float64)
    expected = 2.0 * x @ raw[f"{PREFIX}{module}.milora_A"].double().T @ raw[f"{PREFIX}{module}.milora_B"].double().T
    torch.testing.assert_close(_served_delta(served, module, x), expected)


def test_gate_tables_by_slot():
    """Slot -1 rows are zeroed, MoR rows gated by their softmax, MiLoRA rows scaled per request, LoRA rows kept."""
    torch.manual_seed(0)
    buffer = torch.randn(1, 9, 16)
    original = buffer.clone()
    layout = StepLayout(
        ("a", "b", "c", "d"), counts=(2, 3, 2, 2), computed=(0, 0, 5, 0), prompt_lengths=(2, 3, 4, 2),
        adapters=(7, 8, 9, 6),
    )  # fmt: skip
    # request 1 ("b", LoRA id 8) was routed at block 0 to w = (0, 0.25); the gate reads column 1
    routing = token_routing(Step(layout, {0: {1: torch.tensor([0.0, 0.25])}}), 0, 9, "cpu")
    assert routing[:, 1].tolist() == [0, 0, 0.25, 0.25, 0.25, 0, 0, 0, 0] and routing.shape == (9, 2)
    # slot 0: MoR (N=2, r=3), slot 1: MiLoRA, slot 2: a plain LoRA, -1: none
    slots = torch.tensor([0, 0, 1, 1, 1, -1, -1, 2, 2, 0, 0])  # longer than the buffer, as vLLM's indices are
    tables = GateTables(1, 3, 16, "cpu")
    tables.set_slots([[MoRGate(2, 3), PromptGate(0, 1), None]])
    assert tables.prompt_blocks == {0}
    tables.apply_(buffer, slots, routing)
    probs = torch.softmax(original[0, :2, 6:8], dim=-1)
    torch.testing.assert_close(buffer[0, :2, :6], original[0, :2, :6] * probs.repeat_interleave(3, dim=-1))
    assert torch.all(buffer[0, :2, 6:8] == 0)
    torch.testing.assert_close(buffer[0, :2, 8:], original[0, :2, 8:])
    torch.testing.assert_close(buffer[0, 2:5], original[0, 2:5] * 0.25)
    assert torch.all(buffer[0, 5:7] == 0)
    torch.testing.assert_close(buffer[0, 7:], original[0, 7:])
    # the adapters move: the same tensors are rewritten in place (a compiled graph keeps reading them)
    kind = tables.kind
    tables.set_slots([[None, None, MoRGate(2, 3)]])
    assert tables.kind is kind and tables.prompt_blocks == frozenset()
    buffer = original.clone()
    tables.apply_(buffer, slots)
    torch.testing.assert_close(buffer[0, :5], original[0, :5])
    probs = torch.softmax(original[0, 7:, 6:8], dim=-1)
    torch.testing.assert_close(buffer[0, 7:, :6], original[0, 7:, :6] * probs.repeat_interleave(3, dim=-1))


def test_unservable_and_foreign_adapters(tmp_path):
    (tmp_path / "dora").mkdir()
    _saved(tmp_path / "dora", loramix.MiLoRAConfig(r=4, top_k=2, use_dora=True))
    with pytest.raises(UnservableAdapter, match=r"use_dora.*MiDoRA"):
        convert(str(tmp_path / "dora"), tiny_config())
    (tmp_path / "lora").mkdir()
    from peft import LoraConfig

    _saved(tmp_path / "lora", LoraConfig(r=4, target_modules=["q_proj"]))
    assert convert(str(tmp_path / "lora"), tiny_config()) is None  # plain LoRA: vLLM's own loader


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_gate_form_of_a_loramix_0_1_file_and_refusals(tmp_path):
    """Served gates follow the file as MiLoRAConfig reads it: format 1 without gate_form = the paper's (or
    normalize_gates'); a newer format, an unknown or a conflicting gate form are refused, naming what is wrong."""
    _saved(tmp_path, loramix.MiLoRAConfig(r=4, top_k=2, init_weights=False, gate_form="normalized"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["loramix_format"] == 1
    assert {r.gate_form for r in convert(str(tmp_path), tiny_config()).routers.values()} == {"normalized"}
    _edit_config(tmp_path, normalize_gates=False)
    assert {r.gate_form for r in convert(str(tmp_path), tiny_config()).routers.values()} == {"probability"}
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "normalize_gates"}))
    assert {r.gate_form for r in convert(str(tmp_path), tiny_config()).routers.values()} == {"probability"}
    _edit_config(tmp_path, loramix_format=2, gate_form="unit_mean")
    assert {r.gate_form for r in convert(str(tmp_path), tiny_config()).routers.values()} == {"unit_mean"}
    for changes, message in [
        (dict(gate_form="softmax"), "`gate_form` must be one of"),
        (dict(gate_form="unit_mean", normalize_gates=True), "`normalize_gates`=True means"),
        (dict(loramix_format=99), "newer loramix \\(adapter format 99"),
    ]:
        _edit_config(tmp_path, **{"normalize_gates": None, "gate_form": "unit_mean", "loramix_format": 2, **changes})
        with pytest.raises(UnservableAdapter, match=message):
            convert(str(tmp_path), tiny_config())


def test_tampered_weights_are_refused(tmp_path):
    _saved(tmp_path, loramix.MoRConfig(r=4, num_experts=2))
    weights = tmp_path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        convert(str(tmp_path), tiny_config())


def test_slices_without_gates_only_lose_their_no_adapter_rows():
    """A fused layer whose slices vLLM does not name gets no gates (adapters targeting it are refused at load);
    its buffers still have the rows of no adapter zeroed, in every slice."""
    buffers = tuple(torch.randn(4, 8) for _ in range(3))
    originals = [b.clone() for b in buffers]
    tables = GateTables(3, 2, 8, "cpu")
    tables.set_slots([])  # no slice named: no gates
    tables.apply_(buffers, torch.tensor([1, -1, 0, -1]))
    for buffer, original in zip(buffers, originals, strict=True):
        torch.testing.assert_close(buffer[[0, 2]], original[[0, 2]])
        assert torch.all(buffer[[1, 3]] == 0)


def test_a_registered_method_is_served_through_its_served_form(monkeypatch, tmp_path):
    """The plugin knows methods only through the registry: a third method's adapter is recognised by its
    ``peft_type`` and checked by the served form its ``Method`` names (here MiLoRA's, under another name)."""
    from loramix import method as registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # restored after the test
    config_cls = type("FakeConfig", (), {"PEFT_TYPE_NAME": "FAKE"})
    registry.register_method(registry.Method("fake", "Fake", config_cls, object, served_form="loramix.milora.served"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "FAKE", "r": 32, "pooler": "mean"}))
    config = read_config(str(tmp_path))
    assert config is not None
    settings = EngineSettings(eager=True, chunked_prefill=True, prefix_caching=False, max_lora_rank=16)
    with pytest.raises(UnservableAdapter, match=r"the FAKE adapter 'a' .*Fake routes on the whole prompt"):
        check_engine(config, settings, "a")
    with pytest.raises(UnservableAdapter, match=r"rank 32, above --max-lora-rank 16"):
        check_rank(config, 16, "a")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "FAKE", "r": 4, "use_dora": True}))
    with pytest.raises(UnservableAdapter, match=r"This FAKE adapter .*MiDoRA"):
        convert(str(tmp_path), tiny_config())
