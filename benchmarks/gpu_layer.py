"""MoR layer forward + backward on a CUDA GPU, LLaMA-2-7B FFN shape, bfloat16 (needs CUDA and Triton).

For each FFN direction (up/gate: 4096 -> 11008, down: 11008 -> 4096) and 8192 tokens, interleaved:

* ``base``            the frozen nn.Linear alone;
* ``LoRA r=8``        PEFT LoRA r=8 layer (PEFT's own implementation);
* ``MoR Triton``      loramix MoR E8R8 layer with the fused Triton kernels (``loramix.kernels``);
* ``MoR PyTorch``     the same layer on the PyTorch path (``LORAMIX_KERNELS=torch``);
* ``MoR loop``        the same layer with a Python loop over experts (peer-style).

Reported: median times, each relative to the base layer, **what MoR adds over the base relative to what
LoRA r=8 adds** (goal <= 1.5x), and the achieved bandwidth of the fused MoR adapter alone (forward +
backward, minimal bytes) against a measured device-to-device copy. A correctness check (Triton vs
PyTorch path, same inputs) runs first.

    python benchmarks/gpu_layer.py [--quick] [--json out.json]

Without CUDA the script stops with a message (exit status 2); ``--interpreter-smoke`` instead runs every
code path at a tiny shape under Triton's CPU interpreter (timings meaningless), to check the script.
"""

from __future__ import annotations

import os
import sys

if "--interpreter-smoke" in sys.argv:  # must precede the first triton import (peft imports it)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

import loramix  # noqa: E402
import loramix.mor.functional as mor_functional  # noqa: E402
from _common import (  # noqa: E402
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
from loramix import kernels  # noqa: E402


class Holder(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.proj = base


def copy_bandwidth(device, nbytes: int, iters: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / iters
    else:
        import time

        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = (time.perf_counter() - t0) / iters
    return 2 * nbytes / seconds


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=None, help="tokens (default 8192, quick 2048)")
    p.add_argument("--iters", type=int, default=None, help="fwd+bwd calls per timed sample (default 10)")
    p.add_argument("--interpreter-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = p.parse_args()
    smoke = args.interpreter_smoke
    if not smoke and not torch.cuda.is_available():
        print(
            "benchmarks/gpu_layer.py needs a CUDA GPU (torch.cuda.is_available() is False here) and Triton. "
            "Nothing was measured. (--interpreter-smoke runs the code paths on CPU at a tiny shape, without "
            "meaningful timings.)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if not kernels.triton_available():
        print("benchmarks/gpu_layer.py needs Triton: pip install loramix[triton]", file=sys.stderr)
        raise SystemExit(2)

    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    shapes = [(48, 80), (80, 48)] if smoke else [(4096, 11008), (11008, 4096)]
    tokens = args.tokens or (40 if smoke else (2048 if args.quick else 8192))
    iters = args.iters or (1 if smoke else 10)
    rounds = args.rounds or (2 if smoke else (5 if args.quick else 15))
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    info = machine_info(device)
    print_header(f"MoR layer forward + backward on {'CPU (interpreter smoke test)' if smoke else 'GPU'}", info)
    print(f"dtype {dtype}, {tokens} tokens, {iters} fwd+bwd per sample, {rounds} rounds after {warmup} warm-up")
    copy_bw = copy_bandwidth(device, (1 << 20) if smoke else (1 << 30), 2 if smoke else 20)
    print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")
    payload = {"benchmark": "gpu_layer", "machine": info, "tokens": tokens, "copy_bytes_per_s": copy_bw, "shapes": {}}

    for d_in, d_out in shapes:
        payload["shapes"][f"{d_in}->{d_out}"] = bench_shape(
            d_in, d_out, tokens, iters, rounds, warmup, device, dtype, sync, copy_bw
        )
        sys.stdout.flush()
    write_json(args.json, payload)


def bench_shape(d_in, d_out, tokens, iters, rounds, warmup, device, dtype, sync, copy_bw) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    lora = get_peft_model(Holder(base), LoraConfig(r=8, lora_alpha=32, target_modules=["proj"]))
    lora_layer = lora.base_model.model.proj.to(dtype)  # adapter in the same dtype as MoR's (PEFT keeps fp32)
    with torch.no_grad():
        lora_layer.lora_B["default"].weight.normal_(std=0.01)
    base2 = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        base2.weight.copy_(base.weight)
    cfg = loramix.MoRConfig(r=8, num_experts=8, lora_alpha=32, lora_dropout=0.0, target_modules=["proj"])
    cfg.init_weights = False
    mor = get_peft_model(Holder(base2), cfg).base_model.model.proj.to(device=device, dtype=dtype)
    x = torch.randn(tokens, d_in, device=device, dtype=dtype)
    grad = torch.randn(tokens, d_out, device=device, dtype=dtype)

    # correctness: Triton vs PyTorch path, same inputs
    outs = {}
    for backend in ("torch", "triton"):
        xi = x.detach().requires_grad_(True)
        mor.zero_grad(set_to_none=True)
        with kernels.backend(backend):
            out = mor(xi)
        out.backward(grad)
        outs[backend] = [out.detach().float(), xi.grad.float()] + [
            p.grad.float() for p in mor.parameters() if p.grad is not None
        ]
    errs = [
        ((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(outs["triton"], outs["torch"], strict=True)
    ]
    print(
        f"\n## {d_in} -> {d_out}\n\nTriton vs PyTorch path, max relative error over output and gradients: {max(errs):.2e}"
    )

    def call(layer, backend="torch", loop=False):
        def run():
            for _ in range(iters):
                xi = x.detach().requires_grad_(True)
                for prm in layer.parameters():
                    prm.grad = None
                with kernels.backend(backend):
                    if loop:
                        with patched(mor_functional, "mor_delta", mor_delta_loop):
                            out = layer(xi)
                    else:
                        out = layer(xi)
                out.backward(grad)

        return run

    def adapter_alone():
        for _ in range(iters):
            xi = x.detach().requires_grad_(True)
            out, _ = kernels.mor_linear(
                xi, mor.mor_A["default"], mor.mor_B["default"], mor.mor_omega_A["default"],
                mor.mor_omega_B["default"], mor.mor_router["default"], mor.scaling["default"],
            )  # fmt: skip
            out.backward(grad)

    contenders = {
        "base": call(base),
        "LoRA r=8": call(lora_layer),
        "MoR Triton": call(mor, "triton"),
        "MoR PyTorch": call(mor, "torch"),
        "MoR loop": call(mor, "torch", loop=True),
        "MoR adapter alone (Triton)": adapter_alone,
    }
    res = summarise(interleaved(contenders, rounds=rounds, warmup=warmup, sync=sync, progress=False), "base")
    per_call = {k: v["median_s"] / iters for k, v in res.items()}
    lora_adds = per_call["LoRA r=8"] - per_call["base"]
    print()
    print("| contender | fwd+bwd | vs base | adds over base | adds vs LoRA r=8 adds |")
    print("|---|---|---|---|---|")
    for name, t in per_call.items():
        adds = t - per_call["base"]
        rel = adds / lora_adds if lora_adds > 0 and name not in ("base", "MoR adapter alone (Triton)") else None
        print(
            f"| {name} | {fmt_time(t)} | {res[name]['ratio']:.3f}× | {fmt_time(adds)} | "
            + (f"{rel:.2f}× |" if rel is not None else "– |")
        )
    esize = torch.finfo(dtype).bits // 8
    # minimal traffic of the fused adapter: fwd reads x, writes out; bwd reads g twice and x once, writes dx
    nbytes = esize * tokens * (d_in + d_out + 2 * d_out + 2 * d_in)
    bw = nbytes / per_call["MoR adapter alone (Triton)"]
    print(
        f"\nMoR adapter alone (fused kernels, fwd+bwd): {nbytes / 1e9:.2f} GB minimal traffic in "
        f"{fmt_time(per_call['MoR adapter alone (Triton)'])} = {bw / 1e9:.0f} GB/s, "
        f"{100 * bw / copy_bw:.0f}% of the device copy"
    )
    goal = (per_call["MoR Triton"] - per_call["base"]) / lora_adds if lora_adds > 0 else float("nan")
    print(f"goal: MoR adds <= 1.5x what LoRA r=8 adds over the base layer -> {goal:.2f}x")
    print(f"MoR Triton vs loop: {paired_ratio(res, 'MoR loop', 'MoR Triton'):.2f}x faster")
    return {
        "results": res,
        "per_call_s": per_call,
        "max_rel_err_triton_vs_torch": max(errs),
        "adapter_bytes": nbytes,
        "adapter_bytes_per_s": bw,
        "mor_adds_over_lora_adds": goal,
    }


if __name__ == "__main__":
    main()
