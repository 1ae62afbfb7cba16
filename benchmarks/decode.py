"""Greedy decoding with a KV cache: 128 new tokens after a 256-token prompt, batch 1 and 8.

Contenders, interleaved in one process, float32, eval mode, on the SmolLM2-135M shape (real weights when
cached by examples/smollm2.py):

* ``base``                       the model without adapter;
* ``LoRA r=32, unmerged``        PEFT LoRA on all seven projections (q, k, v, o, gate, up, down);
* ``LoRA r=32, merged``          the same after ``merge_and_unload()`` (costs exactly the base model);
* ``MoR E8R8``                   loramix MoR on the FFN (its paper default; a routed MoR cannot merge);
* ``MiLoRA r=32, cached``        loramix MiLoRA, seven modules, top-3: routing computed on the prompt and
                                 reused by every decoding step (the library's behaviour);
* ``MiLoRA r=32, re-routing``    ablation: the same adapter, but the routers run again at every decoding
                                 step (on the new token), as peer MoE-LoRA code does. Done from the outside:
                                 a forward pre-hook removes the routing tag MiLoRA puts on the KV cache,
                                 so MiLoRA treats each step as a new prompt.

Reported: tokens/s of the whole ``generate`` call (prefill included) and of the decoding steps alone
(timed from the first logits-processor call, i.e. after the prefill), ratios, and peak tensor memory
(weights + adapter, shared weights counted for each, plus the peak allocated during one ``generate``:
KV cache, activations, logits).

    python benchmarks/decode.py [--quick] [--json out.json] [--profile]
"""

from __future__ import annotations

import statistics
import sys
from contextlib import nullcontext

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
    patched,
    print_header,
    smollm2_state,
    summarise,
    tensor_peak_bytes,
    timed_generate,
    write_json,
)

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE = "base"
LORA = "LoRA r=32, unmerged"


class Contender:
    def __init__(self, name: str, model, generate=None, reroute_on=None):
        self.name, self.model = name, model.eval()
        self._generate = generate or model.generate
        self.decode_s: list[float] = []
        self.routings = 0
        self.reroute = reroute_on is not None
        if (
            self.reroute
        ):  # the ablation: MiLoRA must not reuse the routing of its prompt (loramix.routing.session internals)
            from loramix.routing import session as routing_module

            def forget_routing(module, args, kwargs):
                generation = routing_module._GENERATION.get()
                if generation is not None:
                    generation.routing = None
                return None

            reroute_on.register_forward_pre_hook(forget_routing, with_kwargs=True, prepend=True)
        self.context = None  # counts the forwards that routed (MiLoRA: once per generate, unless re-routing)
        if any(hasattr(m, "milora_router") for m in model.modules()):
            from loramix.routing.session import subscribe

            self.context = {"routed": 0}
            subscribe(model, lambda records, outputs: self.context.__setitem__("routed", self.context["routed"] + 1))

    def generate(self, prompt: torch.Tensor, new_tokens: int, pad_id: int) -> torch.Tensor:
        routed0 = self.context["routed"] if self.context is not None else 0
        from loramix.routing import session as routing_module

        # the ablation also makes every step look like a forward without a cache, so that it routes afresh
        no_cache = patched(routing_module, "_cache_length", lambda cache: 0) if self.reroute else nullcontext()
        with no_cache:
            out, seconds = timed_generate(self._generate, prompt, new_tokens, pad_id)
        self.decode_s.append(seconds)
        if self.context is not None:
            self.routings = self.context["routed"] - routed0
        return out


def make_contenders(config, state, layers: int | None) -> list[Contender]:
    def base(own_weights: bool = False):
        weights = {k: v.clone() for k, v in state.items()} if (own_weights and state is not None) else state
        return build_llama(config, weights, num_layers=layers)

    def lora_config():
        return LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=SEVEN, init_lora_weights=False)

    contenders = [Contender(BASE, base())]
    contenders.append(Contender(LORA, get_peft_model(base(), lora_config())))
    # merging writes into the base weights: this one gets its own copy
    contenders.append(Contender("LoRA r=32, merged", get_peft_model(base(True), lora_config()).merge_and_unload()))
    mor = loramix.MoRConfig(r=8, num_experts=8, lora_alpha=32, lora_dropout=0.05, init_weights=False)
    contenders.append(Contender("MoR E8R8 (FFN)", get_peft_model(base(), mor)))
    if hasattr(loramix, "MiLoRAConfig"):

        def milora():
            cfg = loramix.MiLoRAConfig(r=32, lora_alpha=64, top_k=3, init_weights=False, task_type="CAUSAL_LM")
            return get_peft_model(base(), cfg)

        contenders.append(Contender("MiLoRA r=32, cached", milora()))
        model = milora()
        contenders.append(Contender("MiLoRA r=32, re-routing", model, reroute_on=model.base_model.model))
    else:
        print("(loramix.MiLoRAConfig not available: MiLoRA contenders skipped)")
    return contenders


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 256, quick 64)")
    p.add_argument("--new", type=int, default=None, help="generated tokens (default 128, quick 32)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default all, quick 6)")
    p.add_argument("--profile", action="store_true", help="profile one batch-1 generate per contender")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prompt_len = args.prompt or (64 if args.quick else 256)
    new_tokens = args.new or (32 if args.quick else 128)
    layers = args.layers or (6 if args.quick else None)
    rounds = args.rounds or (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else 1

    info = machine_info()
    print_header("Greedy decoding with KV cache (CPU, float32)", info)
    config, state, source = smollm2_state()
    print(f"model: {source}; {layers or config.num_hidden_layers} of {config.num_hidden_layers} blocks")
    print(f"prompt {prompt_len} tokens, {new_tokens} new tokens; {rounds} rounds after {warmup} warm-up, interleaved")
    sys.stdout.flush()
    contenders = make_contenders(config, state, layers)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0

    payload = {"benchmark": "decode", "machine": info, "model": source, "prompt": prompt_len, "new": new_tokens}
    payload["batches"] = {}
    for batch_size in args.batches:
        torch.manual_seed(batch_size)
        prompt = torch.randint(3, config.vocab_size, (batch_size, prompt_len))
        for c in contenders:
            c.decode_s = []
        results = interleaved(
            {c.name: (lambda c=c, prompt=prompt: c.generate(prompt, new_tokens, pad_id)) for c in contenders},
            rounds=rounds,
            warmup=warmup,
        )
        for c in contenders:
            results[c.name]["decode_samples_s"] = c.decode_s[warmup:]
        summarise(results, BASE)
        steps = new_tokens - 1  # the first new token comes out of the prefill
        print(f"\n### batch {batch_size}\n")
        print(
            "| contender | generate tok/s | decode tok/s | decode vs base | decode vs LoRA unmerged "
            "| generate vs base | routings per generate |"
        )
        print("|---|---|---|---|---|---|---|")
        dec_ref = {name: results[name]["decode_samples_s"] for name in (BASE, LORA)}
        for c in contenders:
            r = results[c.name]
            gen_tps = batch_size * new_tokens / r["median_s"]
            dec = r["decode_samples_s"]
            dec_tps = batch_size * steps / statistics.median(dec)
            # speed ratios (higher is faster) from per-round time ratios
            vs_base = statistics.median(b / a for a, b in zip(dec, dec_ref[BASE], strict=True))
            vs_lora = statistics.median(b / a for a, b in zip(dec, dec_ref[LORA], strict=True))
            r.update(
                generate_tokens_per_s=gen_tps,
                decode_tokens_per_s=dec_tps,
                decode_speed_vs_base=vs_base,
                decode_speed_vs_lora_unmerged=vs_lora,
                generate_speed_vs_base=1.0 / r["ratio"],
                routings_per_generate=c.routings,
            )
            print(
                f"| {c.name} | {gen_tps:.1f} | {dec_tps:.1f} | {vs_base:.3f}× | {vs_lora:.3f}× "
                f"| {1.0 / r['ratio']:.3f}× | {c.routings if c.context is not None else '–'} |"
            )
        if not args.no_memory:  # one more generate per contender, its tensor allocations tracked
            print("\n| contender | weights + adapter | peak during generate | total | vs base |\n|---|---|---|---|---|")
            totals = {}
            for c in contenders:
                live = live_bytes(c.model, prompt)
                during = tensor_peak_bytes(lambda c=c, prompt=prompt: c.generate(prompt, new_tokens, pad_id))
                totals[c.name] = live + during
                results[c.name].update(live_bytes=live, generate_peak_bytes=during, peak_bytes=live + during)
            for c in contenders:
                r = results[c.name]
                print(
                    f"| {c.name} | {mib(r['live_bytes'])} | {mib(r['generate_peak_bytes'])} | {mib(r['peak_bytes'])} "
                    f"| {r['peak_bytes'] / totals[BASE]:.3f}× |"
                )
        sys.stdout.flush()
        payload["batches"][batch_size] = results
        for name in ("MiLoRA r=32, cached",):
            if name in results:
                r = results[name]
                print(
                    f"\ntarget (batch {batch_size}): MiLoRA decode >= 1.2x LoRA unmerged -> "
                    f"{r['decode_speed_vs_lora_unmerged']:.3f}x; >= 0.95x base -> {r['decode_speed_vs_base']:.3f}x"
                )
    print(f"\nload average at the end: {machine_info()['load_average']}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        prompt = torch.randint(3, config.vocab_size, (1, prompt_len))
        for c in contenders:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                c.generate(prompt, new_tokens, pad_id)
            print(f"\n## profile: {c.name} (batch 1)\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
