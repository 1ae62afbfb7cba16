"""The MoR linear alone, forward + backward, against the per-expert loop and a LoRA of rank N·r.

For each (N experts, rank r) the contenders run interleaved in one process on the SmolLM2-135M FFN
shape (576 -> 1536), frozen base weight, input that needs a gradient (as inside a network), adapter
dropout off:

* ``base``      the frozen nn.Linear alone (the floor every adapter adds to);
* ``LoRA r``    PEFT LoRA of rank r;
* ``MoR``       loramix's MoR layer (rank-N·r efficient form);
* ``loop``      the same MoR layer with its mixture computed by a Python loop over experts;
* ``LoRA N·r``  PEFT LoRA of rank N·r (the arithmetic twin of the efficient form).

The FLOP count of each contender is printed next to its time so the floor is visible, and the peak of
the memory allocated during one forward + backward (activations and gradients; the weights, allocated
before, are not counted). Ratios are
medians over rounds of the per-round ratio (both measured in the same round).

    python benchmarks/layer.py            # full: 2048 tokens, 15 rounds
    python benchmarks/layer.py --quick    # 512 tokens, 5 rounds
"""

from __future__ import annotations

import sys

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import loramix
import loramix.mor.functional as mor_functional
from _common import (
    cpu_peak_bytes,
    fmt_time,
    interleaved,
    machine_info,
    mor_delta_loop,
    paired_ratio,
    parser,
    patched,
    print_header,
    summarise,
    write_json,
)

D_IN, D_OUT = 576, 1536
EXPERTS = (1, 2, 4, 8, 16)
RANKS = (8, 16, 64)


class Holder(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.proj = base


def frozen_base(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT, bias=False)
    base.weight.requires_grad_(False)
    return base


def lora_layer(rank: int) -> nn.Module:
    model = get_peft_model(Holder(frozen_base()), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():  # non-zero B so nothing is skipped or trivially zero
        layer.lora_B["default"].weight.normal_(std=0.01)
    return layer


def mor_layer_of(n: int, r: int) -> nn.Module:
    config = loramix.MoRConfig(r=r, num_experts=n, lora_alpha=4 * r, lora_dropout=0.0, target_modules=["proj"])
    config.init_weights = False
    return get_peft_model(Holder(frozen_base()), config).base_model.model.proj


# FLOPs of one forward + backward per token (multiply-add = 2), base frozen, x needs its gradient.
def flops_base() -> float:
    return 4 * D_IN * D_OUT  # forward W x, backward dx = g W


def flops_lora(q: int) -> float:
    return flops_base() + 6 * q * (D_IN + D_OUT)  # fwd A, B; bwd dB, dz, dA, dx


def flops_mor(n: int, r: int) -> float:
    # [A; W_r] x: 2(r+N)d_in fwd, 4(r+N)d_in bwd; Y B_eff: 2Nr d_out fwd, 4Nr d_out bwd (elementwise terms omitted)
    return flops_base() + 6 * (r + n) * D_IN + 6 * n * r * D_OUT


def flops_loop(n: int, r: int) -> float:
    # the same products, plus ~3 elementwise passes over (T, d_out) per expert forward, ~6 backward
    return flops_mor(n, r) + 9 * n * D_OUT


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=None, help="tokens per call (default 2048, quick 512)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tokens = args.tokens or (512 if args.quick else 2048)
    rounds = args.rounds or (5 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    info = machine_info()
    print_header("MoR layer forward + backward (CPU, float32)", info)
    print(f"shape: {D_IN} -> {D_OUT}, {tokens} tokens; {rounds} rounds after {warmup} warm-up, interleaved")
    print()

    torch.manual_seed(0)
    x = torch.randn(tokens, D_IN)
    grad = torch.randn(tokens, D_OUT)

    def call(layer: nn.Module, loop: bool = False):
        def run():
            xi = x.detach().requires_grad_(True)
            for param in layer.parameters():
                param.grad = None
            if loop:
                with patched(mor_functional, "mor_delta", mor_delta_loop):
                    out = layer(xi)
            else:
                out = layer(xi)
            out.backward(grad)

        return run

    base = frozen_base()
    rows = []
    print(
        "| N | r | base | LoRA r | MoR | loop | LoRA N·r | loop / MoR | MoR / LoRA N·r | MoR / base | LoRA r / base "
        "| peak MiB: LoRA r / MoR / loop / LoRA N·r |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in RANKS:
        lora_r = lora_layer(r)
        for n in EXPERTS:
            mor = mor_layer_of(n, r)
            contenders = {
                "base": call(base),
                "LoRA r": call(lora_r),
                "MoR": call(mor),
                "loop": call(mor, loop=True),
                "LoRA N·r": call(lora_layer(n * r)),
            }
            res = summarise(interleaved(contenders, rounds=rounds, warmup=warmup, progress=False), "base")
            peak = {k: cpu_peak_bytes(fn) for k, fn in contenders.items()}  # allocated during one fwd+bwd
            flops = {
                "base": flops_base(),
                "LoRA r": flops_lora(r),
                "MoR": flops_mor(n, r),
                "loop": flops_loop(n, r),
                "LoRA N·r": flops_lora(n * r),
            }
            row = {
                "N": n,
                "r": r,
                "tokens": tokens,
                "median_s": {k: v["median_s"] for k, v in res.items()},
                "min_s": {k: v["min_s"] for k, v in res.items()},
                "samples_s": {k: v["samples_s"] for k, v in res.items()},
                "gflop": {k: f * tokens / 1e9 for k, f in flops.items()},
                "loop_over_mor": paired_ratio(res, "loop", "MoR"),
                "mor_over_lora_nr": paired_ratio(res, "MoR", "LoRA N·r"),
                "mor_over_base": res["MoR"]["ratio"],
                "lora_r_over_base": res["LoRA r"]["ratio"],
                "peak_bytes": peak,
            }
            rows.append(row)
            cells = [
                f"{fmt_time(res[k]['median_s'])} ({flops[k] * tokens / 1e9:.2f} GF)"
                for k in ("base", "LoRA r", "MoR", "loop", "LoRA N·r")
            ]
            ratios = [row[k] for k in ("loop_over_mor", "mor_over_lora_nr", "mor_over_base", "lora_r_over_base")]
            mem = " / ".join(f"{peak[k] / 2**20:.1f}" for k in ("LoRA r", "MoR", "loop", "LoRA N·r"))
            print(
                f"| {n} | {r} | " + " | ".join(cells) + " | " + " | ".join(f"{v:.2f}×" for v in ratios) + f" | {mem} |"
            )
            sys.stdout.flush()

    at8 = [row for row in rows if row["N"] == 8]
    print()
    print(
        "target (N=8): MoR >= 3x faster than the loop -> "
        + ", ".join(f"r={row['r']}: {row['loop_over_mor']:.2f}x" for row in at8)
    )
    write_json(args.json, {"benchmark": "layer", "machine": info, "tokens": tokens, "rounds": rounds, "rows": rows})


if __name__ == "__main__":
    main()
