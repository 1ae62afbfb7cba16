"""What the vLLM plugin refuses to serve, and why: engine settings under which a loramix adapter would not be served
exactly, and ranks that do not fit. Pure checks (no vLLM import); :mod:`loramix.vllm._hooks` reads the engine's
settings and runs them at request intake and when an adapter loads. Messages name the setting and the flag to pass.

What depends on the method comes from its served form (:func:`loramix.vllm.convert.served_form`): whether it routes
on the whole prompt (``ROUTES_ON_PROMPT``: then a prompt must be prefilled in one step and never come from the
prefix cache) and the rank it is served at (``served_rank``).
"""

from __future__ import annotations

from dataclasses import dataclass

from loramix.method import method_of
from loramix.vllm.convert import UnservableAdapter, served_form


@dataclass
class EngineSettings:
    """What the refusals need to know about the engine."""

    eager: bool
    chunked_prefill: bool
    prefix_caching: bool
    max_lora_rank: int
    fully_sharded_loras: bool = False
    tensor_parallel_size: int = 1
    runner: str = "v1"  # the model runner: "v1", "v2" or "v2-standalone-cpu" (loramix.vllm._hooks.model_runner)
    graphs_opt_in: bool = False  # LORAMIX_VLLM_GRAPHS=1: serve token-gated adapters compiled / under CUDA graphs
    lora_dual_stream: bool = False  # VLLM_LORA_ENABLE_DUAL_STREAM=1: vLLM runs the LoRA in an opaque custom op
    platform: str = "cpu"


def check_engine(config: dict, engine: EngineSettings, name: str) -> None:
    """Refuse an adapter the engine's settings would serve inexactly; the message says which flag to pass."""
    method = config["peft_type"]
    routes_on_prompt = served_form(config).ROUTES_ON_PROMPT
    problems = []
    if routes_on_prompt and not engine.eager:
        problems.append(
            f"the engine compiles the model or captures CUDA graphs, and {method_of(method).display_name} routes "
            "each request on its prompt in Python inside the forward, which a compiled graph would freeze (pass "
            "--enforce-eager / enforce_eager=True)"
        )
    elif not engine.eager and engine.lora_dual_stream:
        problems.append(
            "VLLM_LORA_ENABLE_DUAL_STREAM=1 runs the LoRA inside a custom op that a compiled graph does not trace, "
            "so the gates would not reach it (unset it, or pass --enforce-eager)"
        )
    elif not engine.eager and not engine.graphs_opt_in:
        problems.append(
            "the engine compiles the model or captures CUDA graphs: the gates are read from persistent tables "
            "there, tested on a compiled vLLM LoRA layer but never yet in a compiled engine or under CUDA graphs "
            "(pass --enforce-eager / enforce_eager=True, or set LORAMIX_VLLM_GRAPHS=1 to serve it untested)"
        )
    if engine.platform not in ("cpu", "cuda"):
        problems.append(f"the plugin is written for vLLM's CPU and CUDA LoRA paths, not {engine.platform}")
    if engine.tensor_parallel_size > 1:
        problems.append(
            "tensor parallelism splits row-parallel layers' rank buffers into partial sums, so a MoR router's "
            "softmax would see partial logits, and the plugin is tested on one device (serve with "
            "--tensor-parallel-size 1)"
        )
    if engine.runner not in ("v1", "v2"):
        problems.append(
            f"vLLM's {engine.runner} model runner (vLLM 0.34's runner for non-x86 CPUs without Triton) keeps "
            "requests in classes the plugin does not hook (serve on x86 or with Triton installed)"
        )
    if engine.fully_sharded_loras:
        problems.append(
            "--fully-sharded-loras splits the rank buffer across GPUs, so a MoR router's logits and a token's "
            "expert blocks would not be on one device (serve without it)"
        )
    if routes_on_prompt and engine.chunked_prefill:
        problems.append(
            f"chunked prefill is on: {method_of(method).display_name} routes on the whole prompt and applies the "
            "routing to the prompt's own tokens, so a prompt must be prefilled in one step (pass "
            "--no-enable-chunked-prefill / enable_chunked_prefill=False)"
        )
    if routes_on_prompt and engine.prefix_caching:
        problems.append(
            "prefix caching is on: a cached prefix was computed under another prompt's routing (pass "
            "--no-enable-prefix-caching / enable_prefix_caching=False)"
        )
    if problems:
        raise UnservableAdapter(
            f"loramix cannot serve the {method} adapter '{name}' on this engine: " + "; ".join(problems) + "."
        )


def check_rank(config: dict, max_lora_rank: int, name: str) -> None:
    """Refuse an adapter whose served rank (its method's ``served_rank``) is above the engine's ``--max-lora-rank``."""
    rank, made_of = served_form(config).served_rank(config)
    if rank > max_lora_rank:
        raise UnservableAdapter(
            f"The {config['peft_type']} adapter '{name}' is served as a LoRA of rank {rank}"
            + (f" ({made_of})" if made_of else "")
            + f", above --max-lora-rank {max_lora_rank}. Start vLLM with --max-lora-rank of at least {rank} "
            "(vLLM accepts 8, 16, 32, 64, 128, 256, 320, 512)."
        )
