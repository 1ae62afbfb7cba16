"""What the vLLM plugin refuses to serve, and why: engine settings under which a loramix adapter would not be served
exactly, and ranks that do not fit. Pure checks (no vLLM import); :mod:`loramix.vllm._hooks` reads the engine's
settings and runs them at request intake and when an adapter loads. Messages name the setting and the flag to pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from .convert import UnservableAdapter


@dataclass
class EngineSettings:
    """What the refusals need to know about the engine."""

    eager: bool
    chunked_prefill: bool
    prefix_caching: bool
    max_lora_rank: int
    fully_sharded_loras: bool = False
    tensor_parallel_size: int = 1
    v2_model_runner: bool = False
    platform: str = "cpu"


def check_engine(config: dict, engine: EngineSettings, name: str) -> None:
    """Refuse an adapter the engine's settings would serve inexactly; the message says which flag to pass."""
    method = config["peft_type"]
    problems = []
    if not engine.eager:
        problems.append(
            "the engine compiles the model or captures CUDA graphs, which would freeze the per-step routing "
            "(pass --enforce-eager / enforce_eager=True)"
        )
    if engine.platform not in ("cpu", "cuda"):
        problems.append(f"the plugin is written for vLLM's CPU and CUDA LoRA paths, not {engine.platform}")
    if engine.tensor_parallel_size > 1:
        problems.append(
            "tensor parallelism splits row-parallel layers' rank buffers into partial sums, so a MoR router's "
            "softmax would see partial logits, and the plugin is tested on one device (serve with "
            "--tensor-parallel-size 1)"
        )
    if engine.v2_model_runner:
        problems.append(
            "vLLM's V2 model runner (its default on CUDA with Triton) keeps requests where the plugin does not "
            "read them (set VLLM_USE_V2_MODEL_RUNNER=0)"
        )
    if engine.fully_sharded_loras:
        problems.append(
            "--fully-sharded-loras splits the rank buffer across GPUs, so a MoR router's logits and a token's "
            "expert blocks would not be on one device (serve without it)"
        )
    if method == "MILORA" and engine.chunked_prefill:
        problems.append(
            "chunked prefill is on: MiLoRA routes on the whole prompt and applies the routing to the prompt's own "
            "tokens, so a prompt must be prefilled in one step (pass --no-enable-chunked-prefill / "
            "enable_chunked_prefill=False)"
        )
    if method == "MILORA" and engine.prefix_caching:
        problems.append(
            "prefix caching is on: a cached prefix was computed under another prompt's routing (pass "
            "--no-enable-prefix-caching / enable_prefix_caching=False)"
        )
    if problems:
        raise UnservableAdapter(
            f"loramix cannot serve the {method} adapter '{name}' on this engine: " + "; ".join(problems) + "."
        )


def _served_rank(config: dict) -> int:
    if config["peft_type"] == "MOR" and config.get("router", "softmax") != "mean" and config["num_experts"] > 1:
        return config["num_experts"] * (config["r"] + 1)
    return int(config["r"])


def check_rank(config: dict, max_lora_rank: int, name: str) -> None:
    rank = _served_rank(config)
    if rank > max_lora_rank:
        raise UnservableAdapter(
            f"The {config['peft_type']} adapter '{name}' is served as a LoRA of rank {rank}"
            + (" (num_experts·r expert ranks + num_experts router rows)" if config["peft_type"] == "MOR" else "")
            + f", above --max-lora-rank {max_lora_rank}. Start vLLM with --max-lora-rank of at least {rank} "
            "(vLLM accepts 8, 16, 32, 64, 128, 256, 320, 512)."
        )
