"""vLLM throughput with loramix adapters: base, LoRA, MoR and MiLoRA requests, and a 4-tenant mix, as ratios to base.

One offline vLLM engine (``LLM``, eager mode, chunked prefill and prefix caching off as MiLoRA needs) on
SmolLM2-135M-Instruct serves, in interleaved rounds, batches of ``n`` requests (random prompts of ``P`` tokens,
``G`` new tokens each, ``ignore_eos``) where every request uses:

* ``base``    no adapter;
* ``LoRA``    a PEFT LoRA r=8 on the seven projections (vLLM's own LoRA path: the plugin leaves it untouched);
* ``MoR``     a loramix MoR E8R8 on the FFN (its paper default), served as a rank-72 gated LoRA;
* ``MiLoRA``  a loramix MiLoRA r=8 on the seven projections, top-3, routed once per request;
* ``mix``     the four above in turn (request ``i`` uses tenant ``i mod 4``), in the same continuous batches.

Reported: generated tokens/s and the time ratio to ``base`` paired per round (lower is better; 1.0 = as fast as
the base model), and to ``LoRA``. On CPU, vLLM's LoRA ops (``vllm/lora/ops/torch_ops``) gather each token's
full adapter matrices (rank ``--max-lora-rank``, here 128 for MoR E8R8), so every adapted request, plain LoRA
included, costs far more than the base model there; the MoR and MiLoRA ratios to LoRA are what the plugin adds. Needs the vLLM venv (``make install-vllm``) and the converted SmolLM2 checkpoint
(``python examples/smollm2.py`` in the main venv caches it). On CUDA the engine runs in bfloat16.

    .venv-vllm/bin/python benchmarks/vllm_serve.py [--quick] [--json out.json]
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import loramix  # noqa: E402
from _common import (  # noqa: E402
    SMOLLM2_SUBDIR,
    interleaved,
    machine_info,
    paired_ratio,
    parser,
    print_header,
    ratio_table,
    summarise,
    write_json,
)

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TENANTS = {
    "LoRA": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=SEVEN, init_lora_weights=False),
    "MoR": lambda: loramix.MoRConfig(r=8, num_experts=8, init_weights=False),
    "MiLoRA": lambda: loramix.MiLoRAConfig(r=8, top_k=3, init_weights=False),
}


def save_adapters(model_dir: Path, out: Path) -> dict[str, str]:
    paths = {}
    for i, (name, make) in enumerate(TENANTS.items()):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        get_peft_model(base, make()).save_pretrained(out / name)
        paths[name] = str(out / name)
    return paths


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path.home() / ".cache" / "loramix" / SMOLLM2_SUBDIR)
    args = p.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"No model at {args.model}: run `python examples/smollm2.py` in the main venv first, or pass --model.")
    requests, prompt_len, new_tokens = (8, 32, 32) if args.quick else (16, 64, 64)
    rounds = args.rounds or (2 if args.quick else 4)
    warmup = args.warmup if args.warmup is not None else 1

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    cuda = torch.cuda.is_available()
    info = machine_info(torch.device("cuda") if cuda else None)
    info["vllm"] = __import__("vllm").__version__
    print_header("vLLM serving throughput with loramix adapters", info)
    print(f"vllm: {info['vllm']}; {requests} requests x ({prompt_len} prompt + {new_tokens} new tokens)")

    with tempfile.TemporaryDirectory() as tmp:
        paths = save_adapters(args.model, Path(tmp))
        llm = LLM(
            model=str(args.model),
            dtype="bfloat16" if cuda else "float32",
            enable_lora=True,
            max_lora_rank=128,  # MoR E8R8 is served at rank 8·8 + 8 = 72
            max_loras=4,
            max_num_seqs=requests,
            max_model_len=prompt_len + new_tokens + 16,
            enforce_eager=True,
            enable_chunked_prefill=False,
            enable_prefix_caching=False,
            seed=0,
        )
        lora = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(paths.items())}
        rng = random.Random(0)
        vocab = llm.llm_engine.model_config.get_vocab_size()
        prompts = [
            TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(prompt_len)]) for _ in range(requests)
        ]
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        mix = [lora["LoRA"], lora["MoR"], lora["MiLoRA"], None]
        workloads = {
            "base": [None] * requests,
            "LoRA": [lora["LoRA"]] * requests,
            "MoR": [lora["MoR"]] * requests,
            "MiLoRA": [lora["MiLoRA"]] * requests,
            "mix (LoRA, MoR, MiLoRA, base)": [mix[i % 4] for i in range(requests)],
        }
        generated = {}

        def run(name):
            outputs = llm.generate(prompts, params, lora_request=workloads[name], use_tqdm=False)
            generated[name] = sum(len(o.outputs[0].token_ids) for o in outputs)

        results = interleaved({name: (lambda n=name: run(n)) for name in workloads}, rounds, warmup)
    summarise(results, "base")
    extra = {name: {"tokens/s": f"{generated[name] / r['median_s']:.1f}"} for name, r in results.items()}
    print()
    print(ratio_table(results, "base", extra))
    print()
    print("ratios to LoRA (paired per round):")
    for name in workloads:
        print(f"  {name}: {paired_ratio(results, name, 'LoRA'):.3f}x")
    if args.json:
        write_json(args.json, {"info": info, "results": results, "generated": generated})


if __name__ == "__main__":
    main()
