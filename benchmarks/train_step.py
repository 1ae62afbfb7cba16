"""One optimiser step (forward, backward, AdamW) on the SmolLM2-135M shape, every contender interleaved.

Contenders (all on the same frozen base weights, shared in memory, float32, training mode):

* ``PEFT LoRA r=8 (FFN)``       reference: PEFT's LoRA on gate/up/down_proj, alpha 32, dropout 0.05;
* ``MoR E8R8 (loramix)``        loramix MoR, 8 experts of rank 8 on the same modules, same alpha/dropout;
* ``MoR E8R8, expert loop``     the same MoR with its mixture computed by a Python loop over the experts,
                                as peer MoE-LoRA code does (benchmarks/_common.py: mor_delta_loop);
* ``MiLoRA r=8 / r=32 (7 mod.)`` loramix MiLoRA, LoRA experts on all seven projections, top-3, when
                                ``loramix.MiLoRAConfig`` exists.

Batch 8 x 256 tokens (``--quick``: 2 x 128 on 6 layers), labels = inputs. Reports median step time,
ratios to the reference (median of per-round ratios), and the peak of tensor memory during a step
(weights + adapter + optimiser state + activations, from the profiler's allocation events).

    python benchmarks/train_step.py [--quick] [--json out.json] [--profile]
"""

from __future__ import annotations

import gc
import sys

import torch
from peft import LoraConfig, get_peft_model

import loramix
import loramix.mor.functional as mor_functional
from _common import (
    build_llama,
    cpu_peak_bytes,
    interleaved,
    live_bytes,
    machine_info,
    mib,
    mor_delta_loop,
    parser,
    patched,
    print_header,
    ratio_table,
    smollm2_state,
    write_json,
)

FFN = ["gate_proj", "up_proj", "down_proj"]
REFERENCE = "PEFT LoRA r=8 (FFN)"
MOR = "MoR E8R8 (loramix)"
LOOP = "MoR E8R8, expert loop"


class Contender:
    def __init__(self, name: str, model, loop: bool = False):
        self.name, self.model, self.loop = name, model, loop
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=2e-4)

    def step(self, batch: torch.Tensor) -> float:
        if self.loop:
            with patched(mor_functional, "mor_delta", mor_delta_loop):
                loss = self.model(input_ids=batch, labels=batch).loss
                loss.backward()
        else:
            loss = self.model(input_ids=batch, labels=batch).loss
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def make_contenders(config, state, layers: int | None) -> list[Contender]:
    def base():
        return build_llama(config, state, num_layers=layers)

    contenders = [
        Contender(
            REFERENCE,
            get_peft_model(base(), LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=FFN)),
        ),
    ]
    mor = loramix.MoRConfig(r=8, num_experts=8, lora_alpha=32, lora_dropout=0.05, target_modules=FFN)
    contenders.append(Contender(MOR, get_peft_model(base(), mor)))
    if hasattr(loramix, "MiLoRAConfig"):
        for r in (8, 32):
            cfg = loramix.MiLoRAConfig(r=r, lora_alpha=2 * r, top_k=3, task_type="CAUSAL_LM")
            contenders.append(Contender(f"MiLoRA r={r} (7 modules)", get_peft_model(base(), cfg)))
    else:
        print("(loramix.MiLoRAConfig not available: MiLoRA contenders skipped)")
    return contenders


def loop_contender(config, state, layers: int | None) -> Contender:
    mor = loramix.MoRConfig(r=8, num_experts=8, lora_alpha=32, lora_dropout=0.05, target_modules=FFN)
    return Contender(LOOP, get_peft_model(build_llama(config, state, num_layers=layers), mor), loop=True)


def loop_extra_bytes(config, tokens: int, layers: int, experts: int = 8) -> int:
    """What the expert loop keeps for backward beyond LoRA: two (T, d_out) tensors per expert per FFN layer."""
    d_outs = 2 * config.intermediate_size + config.hidden_size  # gate, up -> d_ff; down -> d
    return 2 * experts * d_outs * tokens * layers * 4


def mem_available() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def profile_step(contender: Contender, batch: torch.Tensor, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        contender.step(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def measure_memory(contenders: list[Contender], batch: torch.Tensor) -> dict[str, dict]:
    memory = {}
    for c in contenders:
        gc.collect()
        before = live_bytes(batch, c.model, c.optimizer)
        peak = cpu_peak_bytes(lambda c=c: c.step(batch))
        memory[c.name] = {"live_before_bytes": before, "step_peak_bytes": peak, "peak_bytes": before + peak}
    return memory


def memory_columns(contenders: list[Contender], memory: dict[str, dict]) -> dict[str, dict[str, str]]:
    ref = memory.get(REFERENCE)
    extra = {}
    for c in contenders:
        row = {"trainable params": f"{c.trainable / 1e6:.2f} M"}
        if c.name in memory and ref:
            m = memory[c.name]
            row["peak memory"] = mib(m["peak_bytes"])
            row["memory ratio"] = f"{m['peak_bytes'] / ref['peak_bytes']:.3f}×"
            row["activation peak ratio"] = f"{m['step_peak_bytes'] / ref['step_peak_bytes']:.3f}×"
        extra[c.name] = row
    return extra


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8, quick 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256, quick 128)")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default all 30, quick 6)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per contender")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--loop-batch", type=int, default=None, help="batch for the expert-loop group (default: fits)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batch_size = args.batch or (2 if args.quick else 8)
    seq = args.seq or (128 if args.quick else 256)
    layers = args.layers or (6 if args.quick else None)
    rounds = args.rounds or (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else 1

    info = machine_info()
    print_header("Training step: forward + backward + AdamW (CPU, float32)", info)
    config, state, source = smollm2_state()
    n_layers = layers or config.num_hidden_layers
    print(f"model: {source}; {n_layers} of {config.num_hidden_layers} blocks")
    print(f"batch: {batch_size} x {seq} tokens; {rounds} rounds after {warmup} warm-up, interleaved")
    sys.stdout.flush()

    contenders = make_contenders(config, state, layers)
    torch.manual_seed(0)
    batch = torch.randint(3, config.vocab_size, (batch_size, seq))
    results = interleaved({c.name: (lambda c=c: c.step(batch)) for c in contenders}, rounds=rounds, warmup=warmup)
    memory = {} if args.no_memory else measure_memory(contenders, batch)
    print()
    print(ratio_table(results, REFERENCE, memory_columns(contenders, memory)))
    print()
    print(
        "peak memory = tensors live before the step (shared frozen weights, adapter, AdamW state, batch) + the "
        "largest excess allocated during the step; 'activation peak' is that excess alone."
    )
    mor, ref_mem, mor_mem = results[MOR], memory.get(REFERENCE), memory.get(MOR)
    print(
        f"target: MoR E8R8 <= 1.10x PEFT LoRA r=8 -> {mor['ratio']:.3f}x (ratio of minima {mor['ratio_of_min']:.3f}x)"
        + (f"; peak memory <= 1.05x -> {mor_mem['peak_bytes'] / ref_mem['peak_bytes']:.3f}x" if mor_mem else "")
    )
    sys.stdout.flush()

    # The expert loop keeps two (T, d_out) tensors per expert per layer for backward: at 8 x 256 tokens on
    # 30 blocks that is ~14 GB more than LoRA, beyond this machine. It runs at the largest batch that fits,
    # in its own interleaved group with the reference and MoR.
    loop_batch = args.loop_batch
    if loop_batch is None:
        budget = 0.6 * mem_available()
        base_need = ref_mem["step_peak_bytes"] / batch_size if ref_mem else 0
        loop_batch = next(
            (
                b
                for b in (batch_size, 4, 2, 1)
                if b <= batch_size and b * base_need + loop_extra_bytes(config, b * seq, n_layers) < budget
            ),
            0,
        )
    loop_payload = None
    if loop_batch > 0:
        print(f"\n### expert loop, batch {loop_batch} x {seq} (own group: reference, MoR, loop)\n")
        sys.stdout.flush()
        small = batch[:loop_batch]
        group = [c for c in contenders if c.name in (REFERENCE, MOR)] + [loop_contender(config, state, layers)]
        loop_results = interleaved({c.name: (lambda c=c: c.step(small)) for c in group}, rounds=rounds, warmup=warmup)
        loop_memory = {} if args.no_memory else measure_memory(group, small)
        print(ratio_table(loop_results, REFERENCE, memory_columns(group, loop_memory)))
        loop_payload = {"batch": [loop_batch, seq], "results": loop_results, "memory": loop_memory}
        contenders = contenders + group[-1:]
    else:
        print("\n(expert loop skipped: not enough memory even at batch 1)")
    print(f"\nload average at the end: {machine_info()['load_average']}")
    if args.profile:
        for c in contenders:
            print(f"\n## profile: {c.name}\n")
            print(profile_step(c, batch if c.name != LOOP else batch[:loop_batch]))
    write_json(
        args.json,
        {
            "benchmark": "train_step",
            "machine": info,
            "model": source,
            "layers": n_layers,
            "batch": [batch_size, seq],
            "rounds": rounds,
            "results": results,
            "memory": memory,
            "loop_group": loop_payload,
            "trainable": {c.name: c.trainable for c in contenders},
        },
    )


if __name__ == "__main__":
    main()
