"""MoR's gates reach a compiled LoRA layer through persistent tables; what no engine here can show.

vLLM's CPU engine turns compilation off whenever LoRA is enabled (``vllm/platforms/cpu.py``: ``if
vllm_config.lora_config is not None: compilation_config.mode = CompilationMode.NONE``), so no engine on this
machine compiles a model with LoRA, and CUDA graphs need a GPU. What can be run is asserted here:

* that upstream fact, as exactly that (an engine asked not to be eager still runs eager with LoRA on CPU), with
  the tokens it serves (on CUDA the same test runs compiled, with CUDA graphs);
* a real vLLM LoRA layer (``ReplicatedLinearWithLoRA`` on a ``PunicaWrapperCPU``, the plugin's hooks installed)
  compiled with ``torch.compile(fullgraph=True)``: traced once without a graph break, it serves MoR, plain LoRA
  and no-adapter tokens as a hand-computed reference; then the adapters change slots and tokens change
  adapters, the tables and vLLM's indices are rewritten in place, and the same compiled graph (recompiling is
  made an error) gives the new reference.
"""

from __future__ import annotations

import socket

import pytest
import torch
from vllm.exceptions import VLLMValidationError

from loramix.mor.served import MoRGate
from loramix.vllm import _hooks, register
from loramix.vllm.convert import ServedAdapter

from .conftest import engine, reference_tokens, served_tokens

MOR, PLAIN = 7, 3
BACKEND = "inductor"  # what vLLM compiles with
N, R, D_IN, D_OUT, RANK = 2, 3, 16, 12, 8  # MoR: 2 experts of rank 3, served at rank 2·3 + 2 = 8


def test_a_non_eager_engine_serves_mor_lora_and_base(models, monkeypatch):
    """``enforce_eager=False`` with LORAMIX_VLLM_GRAPHS=1. On CPU vLLM still runs eager (it turns compilation off
    with LoRA; asserted as exactly that), so MiLoRA is served too; on CUDA the same test runs compiled with vLLM's
    CUDA graphs, where MiLoRA is refused (``benchmarks/gpu_check.py --vllm``; not run yet)."""
    from vllm.platforms import current_platform

    monkeypatch.setenv("LORAMIX_VLLM_GRAPHS", "1")
    llm = engine(models, enforce_eager=False)
    config = llm.llm_engine.vllm_config
    mode = int(getattr(config.compilation_config.mode, "value", config.compilation_config.mode))
    assert not config.model_config.enforce_eager
    assert (mode == 0) if current_platform.is_cpu() else (mode > 0)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33], [40, 41, 42]]
    adapters = ["mor", "lora", None, "mor_attention", "mor_mean"]
    expected = [reference_tokens(models, a, p, 8) for p, a in zip(prompts, adapters, strict=True)]
    assert served_tokens(llm, models, prompts, adapters, 8) == expected
    if mode == 0:  # the engine runs eager after all: MiLoRA is served
        assert served_tokens(llm, models, [[5, 6, 7]], ["milora"], 2) == [
            reference_tokens(models, "milora", [5, 6, 7], 2)
        ]
    else:
        with pytest.raises(VLLMValidationError, match=r"MiLoRA routes each request on its prompt in Python"):
            served_tokens(llm, models, [[5, 6, 7]], ["milora"], 2)


@pytest.fixture(scope="module")
def vllm_layer():
    """A vLLM ``ReplicatedLinearWithLoRA`` (2 slots, max rank 8) on a ``PunicaWrapperCPU``, with random weights."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config.lora import LoRAConfig
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.lora.layers import ReplicatedLinearWithLoRA
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.model_executor.layers.linear import ReplicatedLinear

    register()
    torch.manual_seed(0)
    with set_current_vllm_config(VllmConfig()):
        if not model_parallel_is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, "gloo")
            initialize_model_parallel(1, 1)
        base = ReplicatedLinear(D_IN, D_OUT, bias=False)
        base.weight.data.normal_()
        base_weight = base.weight.detach().clone()  # the CPU gemm may repack it
        base.quant_method.process_weights_after_loading(base)  # as the loader does (sets the CPU gemm)
        layer = ReplicatedLinearWithLoRA(base)
        layer.create_lora_weights(2, LoRAConfig(max_lora_rank=RANK, max_loras=2, lora_dtype=torch.float32))
        layer.set_mapping(PunicaWrapperCPU(64, 8, "cpu"))
    weights = {MOR: (torch.randn(RANK, D_IN), torch.randn(D_OUT, RANK)), PLAIN: (torch.randn(4, D_IN), None)}
    weights[PLAIN] = (weights[PLAIN][0], torch.randn(D_OUT, 4))
    weights["base"] = base_weight
    return layer, weights


def place(layer, weights, slot_ids):
    """vLLM's part of a step: the adapters' weights in their slots (``set_lora``), then the hooked
    ``update_metadata`` (done by the caller) rewrites the tables."""
    for slot, lora_id in enumerate(slot_ids):
        a, b = weights[lora_id]
        layer.reset_lora(slot)
        layer.set_lora(slot, a, b)


def activate(layer, token_ids, slot_ids):
    from vllm.lora.layers import LoRAMapping

    mapping = LoRAMapping(tuple(token_ids), tuple(token_ids), is_prefill=True)
    layer.punica_wrapper.update_metadata(mapping, list(slot_ids), len(slot_ids) + 1, 256)


def reference(layer, weights, x, token_ids):
    """By hand, float64: base, plus per token its adapter's ``B gate(A x)``; MoR's gate: expert column block i
    times softmax(logit columns)_i, logit columns to 0."""
    x64 = x.double()
    out = x64 @ weights["base"].double().T
    for t, lora_id in enumerate(token_ids):
        if lora_id == 0:
            continue
        a, b = (w.double() for w in weights[lora_id])
        h = a @ x64[t]
        if lora_id == MOR:
            probs = torch.softmax(h[N * R :], dim=0)
            h = torch.cat([h[: N * R] * probs.repeat_interleave(R), torch.zeros(N)])
        out[t] += b @ h
    return out


def test_a_compiled_lora_layer_reads_the_gates_from_persistent_tables(vllm_layer, monkeypatch):
    import torch._dynamo

    layer, weights = vllm_layer
    served = _hooks.Served(adapters={MOR: ServedAdapter("MOR", RANK, {}, gates={"layer": MoRGate(N, R)})})
    monkeypatch.setattr(_hooks, "SERVED", served)
    _hooks.attach(layer, _hooks.LayerInfo("layer", ("layer",), None))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: layer(x)[0], fullgraph=True, backend=BACKEND, dynamic=False)
    x = torch.randn(6, D_IN)

    slots = (MOR, PLAIN)
    tokens = [MOR, MOR, PLAIN, 0, MOR, 0]
    place(layer, weights, slots)
    activate(layer, tokens, slots)
    expected = reference(layer, weights, x, tokens)
    torch.testing.assert_close(layer(x)[0].double(), expected, rtol=1e-5, atol=1e-4)  # eager, the same tables
    torch.testing.assert_close(compiled(x).double(), expected, rtol=1e-5, atol=1e-4)

    # the adapters swap slots, the tokens change adapters: rewritten in place, the compiled graph is replayed
    slots = (PLAIN, MOR)
    tokens = [0, PLAIN, MOR, MOR, 0, MOR]
    place(layer, weights, slots)
    activate(layer, tokens, slots)
    assert served.tables_for[layer.punica_wrapper][0] == slots
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(x)
    torch.testing.assert_close(out.double(), reference(layer, weights, x, tokens), rtol=1e-5, atol=1e-4)


def test_without_the_tables_the_compiled_layer_would_be_wrong(vllm_layer, monkeypatch):
    """Guard of the test above: with the MoR gate removed from the tables, the same compiled layer gives plain
    LoRA maths for the MoR tokens, which differ from MoR's (so the comparison above can fail)."""
    layer, weights = vllm_layer
    served = _hooks.Served(adapters={MOR: ServedAdapter("MOR", RANK, {}, gates={})})
    monkeypatch.setattr(_hooks, "SERVED", served)
    _hooks.attach(layer, _hooks.LayerInfo("layer", ("layer",), None))
    slots, tokens = (MOR, PLAIN), [MOR, PLAIN, 0, MOR, MOR, 0]
    place(layer, weights, slots)
    activate(layer, tokens, slots)
    torch._dynamo.reset()
    out = torch.compile(lambda x: layer(x)[0], fullgraph=True, backend="eager", dynamic=False)(torch.ones(6, D_IN))
    expected = reference(layer, weights, torch.ones(6, D_IN), tokens)
    assert not torch.allclose(out.double()[[0, 3, 4]], expected[[0, 3, 4]], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.double()[[1, 2, 5]], expected[[1, 2, 5]], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("opt_in", [False, True])
def test_a_compiled_engine_without_the_opt_in_leaves_plain_lora_to_vllm(vllm_layer, monkeypatch, opt_in):
    """On an engine that compiles or captures graphs, loramix adapters are refused unless LORAMIX_VLLM_GRAPHS=1;
    without it the plugin must not enter the traced forward of plain-LoRA layers either (the tables are not
    applied: vLLM's own computation runs); with it, the tables are applied on every token."""
    from loramix.vllm.refusals import EngineSettings

    layer, weights = vllm_layer
    engine = EngineSettings(eager=False, chunked_prefill=True, prefix_caching=True, max_lora_rank=RANK,
                            graphs_opt_in=opt_in)  # fmt: skip
    served = _hooks.Served(
        adapters={MOR: ServedAdapter("MOR", RANK, {}, gates={"layer": MoRGate(N, R)})}, engine=engine
    )
    monkeypatch.setattr(_hooks, "SERVED", served)
    _hooks.attach(layer, _hooks.LayerInfo("layer", ("layer",), None))
    slots, tokens = (PLAIN, MOR), [PLAIN, PLAIN, 0, PLAIN, 0, PLAIN]
    place(layer, weights, slots)
    activate(layer, tokens, slots)
    gated = []
    gate = served.handoff.gate_

    def spy(*args):
        gated.append(served.handoff.tables is not None)
        gate(*args)

    monkeypatch.setattr(served.handoff, "gate_", spy)
    layer(torch.ones(6, D_IN))
    assert gated, "add_expand was not reached"
    assert any(gated) == opt_in


def test_an_apply_that_does_not_reach_add_expand_is_refused(vllm_layer, monkeypatch):
    """If a vLLM's layer stopped calling the Punica wrapper's add_expand (signatures unchanged, call path changed),
    the gates would silently not apply: the wrapped apply raises instead."""
    layer, weights = vllm_layer
    served = _hooks.Served(adapters={MOR: ServedAdapter("MOR", RANK, {}, gates={"layer": MoRGate(N, R)})})
    monkeypatch.setattr(_hooks, "SERVED", served)
    _hooks.attach(layer, _hooks.LayerInfo("layer", ("layer",), None))
    slots, tokens = (MOR, PLAIN), [MOR, PLAIN, 0, MOR, MOR, 0]
    place(layer, weights, slots)
    activate(layer, tokens, slots)
    monkeypatch.setattr(served.handoff, "gate_", lambda *args: None)  # add_expand's gating never happens
    with pytest.raises(RuntimeError, match="did not reach the Punica wrapper's add_expand"):
        layer(torch.ones(6, D_IN))
