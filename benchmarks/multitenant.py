"""Multi-tenant decoding: one base model, a batch of prompts spread over 1, 4 or 16 adapters, all unmerged.

The setting of MiLoRA's latency claim (paper Table 4): one base model serving many users' adapters. A
batch of 16 prompts (128 tokens) is split over ``D`` distinct adapters (row ``i`` uses adapter ``i mod D``)
and 64 new tokens are generated, greedy or with 3 beams. Contenders, interleaved per setting in one
process, float32, eval mode, SmolLM2-135M-Instruct (real weights when cached by examples/smollm2.py),
16 adapters each:

* ``PEFT LoRA mixed``    PEFT LoRA r=32 on the seven projections, ``generate(adapter_names=...)``;
* ``MiLoRA mixed``       loramix MiLoRA r=32 on the same seven projections, top-3, ``adapter_names``;
* ``MoR mixed``          loramix MoR E8R8 on the FFN (its paper default), ``adapter_names``;
* ``MiLoRA naive``       the same MiLoRA adapters without mixed batches: one ``generate`` per adapter, on
                         its rows, one after another (what a server without mixed batches must do);
* ``MiLoRA one adapter`` the same 16 prompts all with one adapter (``set_adapter``, no ``adapter_names``):
                         what the batch would cost without multi-tenancy.

Reported: decode tokens/s (returned new tokens of the batch / time of the decoding steps, timed from the
first logits-processor call, i.e. after the prefill; the naive contender sums its generates' decoding
times), speed ratios paired per round, and for one setting the peak tensor memory (weights of the base
model and of the 16 adapters, plus the peak allocated during one ``generate``).

    python benchmarks/multitenant.py [--quick] [--json out.json]
"""

from __future__ import annotations

import statistics
import sys

import torch
from peft import LoraConfig, get_peft_model

import loramix
from _common import (
    build_llama,
    interleaved,
    live_bytes,
    machine_info,
    mib,
    parser,
    print_header,
    smollm2_state,
    tensor_peak_bytes,
    write_json,
)
from _common import timed_generate as decode_timed

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA, MILORA, MOR, NAIVE, SINGLE = "PEFT LoRA mixed", "MiLoRA mixed", "MoR mixed", "MiLoRA naive", "MiLoRA one adapter"


def timed_generate(model, prompt, new_tokens: int, beams: int, pad_id: int, **kwargs) -> float:
    """Run one greedy/beam ``generate``; return the seconds of its decoding steps."""
    return decode_timed(model.generate, prompt, new_tokens, pad_id, num_beams=beams, **kwargs)[1]


def with_adapters(model, make_config, count: int):
    """``model`` with ``count`` random adapters named t0, t1, ...; every one changes the output."""
    peft_model = get_peft_model(model, make_config(), adapter_name="t0")
    for i in range(1, count):
        torch.manual_seed(i)
        peft_model.add_adapter(f"t{i}", make_config())
    return peft_model.eval()


def build(config, state, layers: int | None, tenants: int) -> dict[str, object]:
    def base():
        return build_llama(config, state, num_layers=layers)

    def lora():
        return LoraConfig(r=32, lora_alpha=64, target_modules=SEVEN, init_lora_weights=False, task_type="CAUSAL_LM")

    def milora():
        return loramix.MiLoRAConfig(r=32, lora_alpha=64, top_k=3, init_weights=False, task_type="CAUSAL_LM")

    def mor():
        return loramix.MoRConfig(r=8, num_experts=8, lora_alpha=32, init_weights=False, task_type="CAUSAL_LM")

    return {
        "lora": with_adapters(base(), lora, tenants),
        "milora": with_adapters(base(), milora, tenants),
        "mor": with_adapters(base(), mor, tenants),
    }


def contenders(models, prompt, names: list[str], new_tokens: int, beams: int, pad_id: int, decode: dict):
    """name -> zero-argument callable that runs one generate of the setting and appends its decode seconds."""

    def mixed(key: str, label: str):
        def run():
            decode[label].append(timed_generate(models[key], prompt, new_tokens, beams, pad_id, adapter_names=names))

        return run

    def naive():
        model, total = models["milora"], 0.0
        for adapter in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == adapter])
            model.set_adapter(adapter)
            total += timed_generate(model, prompt[rows], new_tokens, beams, pad_id)
        decode[NAIVE].append(total)

    def single():
        models["milora"].set_adapter(names[0])
        decode[SINGLE].append(timed_generate(models["milora"], prompt, new_tokens, beams, pad_id))

    return {
        LORA: mixed("lora", LORA),
        MILORA: mixed("milora", MILORA),
        MOR: mixed("mor", MOR),
        NAIVE: naive,
        SINGLE: single,
    }


def paired(a: list[float], b: list[float]) -> float:
    """Speed of ``a`` relative to ``b`` (time b / time a), median over rounds."""
    return statistics.median(y / x for x, y in zip(a, b, strict=True))


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128, quick 32)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 64, quick 16)")
    p.add_argument("--batch", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--tenants", type=int, nargs="+", default=[1, 4, 16], help="distinct adapters (default 1 4 16)")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3], help="beam sizes (default 1 3)")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default all, quick 6)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prompt_len = args.prompt or (32 if args.quick else 128)
    new_tokens = args.new or (16 if args.quick else 64)
    layers = args.layers or (6 if args.quick else None)
    rounds = args.rounds or (1 if args.quick else 2)
    warmup = args.warmup if args.warmup is not None else 0

    info = machine_info()
    print_header("Multi-tenant decoding, mixed-adapter batches (CPU, float32)", info)
    config, state, source = smollm2_state()
    print(f"model: {source}; {layers or config.num_hidden_layers} of {config.num_hidden_layers} blocks")
    print(
        f"batch {args.batch}, prompt {prompt_len} tokens, {new_tokens} new tokens; {rounds} rounds after {warmup} "
        "warm-up rounds (and one 2-token generate per model), interleaved"
    )
    sys.stdout.flush()
    models = build(config, state, layers, max(args.tenants))
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    torch.manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (args.batch, prompt_len))

    for model in models.values():  # first calls (lazy initialisation) are not timed: 2 tokens each way
        timed_generate(model, prompt[:4], 2, 1, pad_id)
        timed_generate(model, prompt[:4], 2, 1, pad_id, adapter_names=["t0", "t1", "t0", "__base__"])
    payload = {"benchmark": "multitenant", "machine": info, "model": source, "prompt": prompt_len, "new": new_tokens}
    payload["settings"] = []
    print(
        "\n| adapters | beams | contender | decode tok/s | vs PEFT LoRA mixed | vs MiLoRA one adapter |"
        "\n|---|---|---|---|---|---|"
    )
    for beams in args.beams:
        for tenants in args.tenants:
            names = [f"t{i % tenants}" for i in range(args.batch)]
            decode = {name: [] for name in (LORA, MILORA, MOR, NAIVE, SINGLE)}
            runs = contenders(models, prompt, names, new_tokens, beams, pad_id, decode)
            interleaved(runs, rounds=rounds, warmup=warmup)
            setting = {"tenants": tenants, "beams": beams, "results": {}}
            for name, samples in decode.items():
                samples = samples[warmup:]
                tps = args.batch * new_tokens / statistics.median(samples)
                vs_lora = paired(samples, decode[LORA][warmup:])
                vs_single = paired(samples, decode[SINGLE][warmup:])
                setting["results"][name] = {"decode_s": samples, "decode_tok_s": tps, "vs_lora": vs_lora,
                                            "vs_single": vs_single}  # fmt: skip
                print(f"| {tenants} | {beams} | {name} | {tps:.1f} | {vs_lora:.3f}× | {vs_single:.3f}× |", flush=True)
            payload["settings"].append(setting)
            r = setting["results"][MILORA]
            print(
                f"<!-- target ({tenants} adapters, {beams} beams): MiLoRA mixed >= 1.2x PEFT LoRA mixed -> "
                f"{r['vs_lora']:.3f}x; >= 0.8x one adapter -> {r['vs_single']:.3f}x -->",
                flush=True,
            )
    if not args.no_memory:
        tenants = max(args.tenants)
        names = [f"t{i % tenants}" for i in range(args.batch)]
        print(f"\nPeak tensor memory, {tenants} adapters, greedy:\n")
        print("| contender | weights + 16 adapters | peak during generate | total |\n|---|---|---|---|")
        scratch = {name: [] for name in (LORA, MILORA, MOR, NAIVE, SINGLE)}
        runs = contenders(models, prompt, names, new_tokens, 1, pad_id, scratch)
        payload["memory"] = {}
        for name, key in ((LORA, "lora"), (MILORA, "milora"), (MOR, "mor"), (NAIVE, "milora"), (SINGLE, "milora")):
            live = live_bytes(models[key], prompt)
            during = tensor_peak_bytes(runs[name])
            payload["memory"][name] = {"live_bytes": live, "generate_peak_bytes": during}
            print(f"| {name} | {mib(live)} | {mib(during)} | {mib(live + during)} |", flush=True)
    print(f"\nload average at the end: {machine_info()['load_average']}")
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
