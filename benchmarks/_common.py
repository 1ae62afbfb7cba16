"""Shared helpers for the benchmark scripts: interleaved timing, peak memory, machine facts, models, JSON.

Every contender of a benchmark runs in the same process, in rounds: each round runs every contender
once, in an order rotated from round to round, after warm-up rounds. The machine is shared, so what
is reported is the median per contender and, above all, **ratios** of medians taken in the same
rounds (a slow patch of time slows every contender in that round alike).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

SMOLLM2_SUBDIR = "smollm2-135m-instruct"  # examples/smollm2.py caches the converted checkpoint here
SMOLLM2_CONFIG = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


# --------------------------------------------------------------------------------------------- CLI


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few rounds (about 1-2 minutes)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per contender (default: mode's)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: mode's)")
    return p


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


# --------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_info(device: torch.device | None = None) -> dict:
    info = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "triton": _version("triton"),
        "loramix": _version("loramix"),
    }
    try:
        import subprocess

        info["loramix_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:  # not a git checkout
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def print_header(title: str, info: dict) -> None:
    print(f"# {title}")
    print(f"command: {command_line()}")
    keys = ("cpu", "gpu", "logical_cpus", "torch_threads", "load_average", "torch", "transformers", "peft", "triton")
    print("machine: " + "; ".join(f"{k}={info[k]}" for k in keys if k in info))
    print(f"loramix: {info.get('loramix')} ({info.get('loramix_commit', '?')})")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------- timing


def interleaved(
    contenders: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Time every contender once per round, rotating the order; return wall and CPU-time samples (s).

    ``samples_s[k]`` of every contender comes from the same round ``k``, so per-round ratios pair
    measurements taken within about a second of each other (see :func:`summarise`).
    """
    names = list(contenders)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, float] = {}
    for rnd in range(warmup + rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            if sync:
                sync()
            c0, t0 = time.process_time(), time.perf_counter()
            contenders[name]()
            if sync:
                sync()
            t1, c1 = time.perf_counter(), time.process_time()
            last[name] = t1 - t0
            if rnd >= warmup:
                wall[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
        if progress:
            stage = "warm-up" if rnd < warmup else "round"
            k = rnd + 1 if rnd < warmup else rnd + 1 - warmup
            shown = "  ".join(f"{n}={last[n]:.3f}s" for n in names)
            print(f"  [{stage} {k}] {shown}", file=sys.stderr, flush=True)
    return {n: {"samples_s": wall[n], "cpu_samples_s": cpu[n]} for n in names}


def summarise(results: dict[str, dict], reference: str) -> dict[str, dict]:
    """Add medians, minima and ratios to ``reference`` to the samples of :func:`interleaved` (in place).

    ``ratio`` is the median over rounds of the per-round ratio (paired: robust to the machine getting
    slower or faster between rounds); ``ratio_of_min`` compares the least-disturbed runs;
    ``cpu_ratio`` compares median process CPU time (blind to time spent descheduled).
    """
    ref = results[reference]
    for r in results.values():
        r["median_s"] = statistics.median(r["samples_s"])
        r["min_s"] = min(r["samples_s"])
        r["cpu_median_s"] = statistics.median(r["cpu_samples_s"])
    for r in results.values():
        r["ratio"] = statistics.median(a / b for a, b in zip(r["samples_s"], ref["samples_s"], strict=True))
        r["ratio_of_min"] = r["min_s"] / ref["min_s"]
        r["cpu_ratio"] = r["cpu_median_s"] / ref["cpu_median_s"]
    return results


def paired_ratio(results: dict[str, dict], a: str, b: str) -> float:
    """Median over rounds of ``time(a) / time(b)`` measured in the same round."""
    return statistics.median(x / y for x, y in zip(results[a]["samples_s"], results[b]["samples_s"], strict=True))


def ratio_table(results: dict[str, dict], reference: str, extra: dict[str, dict[str, str]] | None = None) -> str:
    """Markdown table: median time, paired ratio, ratio of minima and CPU-time ratio to ``reference``."""
    summarise(results, reference)
    extra = extra or {}
    extra_cols: list[str] = []
    for row in extra.values():
        extra_cols += [c for c in row if c not in extra_cols]
    head = ["contender", "median", "ratio (paired)", "ratio of minima", "CPU-time ratio", *extra_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [
            name,
            fmt_time(r["median_s"]),
            f"{r['ratio']:.3f}×",
            f"{r['ratio_of_min']:.3f}×",
            f"{r['cpu_ratio']:.3f}×",
        ] + [extra.get(name, {}).get(c, "") for c in extra_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def epoch_batches(population, batch: int, seed: int):
    """Endless batches of ``batch`` from ``population``, epoch after epoch, each epoch in a new order drawn from
    ``random.Random(seed)`` (the same draws for every contender of a seed)."""
    rng = random.Random(seed)
    order: list = []
    while True:
        if len(order) < batch:
            order += rng.sample(population, len(population))
        yield order[:batch]
        order = order[batch:]


def optimizer_step(loss, out, aux_coef: float, params, optimizer, schedule) -> float:
    """One training step of the quality benchmarks: ``loss`` plus ``aux_coef · out.aux_loss`` when the adapter
    returns a balance loss, backward, gradient clipping at 1.0, optimizer and schedule step, gradients freed.
    Returns the loss."""
    if aux_coef > 0 and out.get("aux_loss") is not None:
        loss = loss + aux_coef * out["aux_loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


# --------------------------------------------------------------------------------------------- memory


def live_bytes(*objects) -> int:
    """Bytes of the distinct storages of the tensors in modules / optimisers / tensors given."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
                if t.grad is not None:
                    add(t.grad)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for t in state.values():
                    add(t)
        else:
            add(obj)
    return sum(seen.values())


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated by PyTorch's CPU allocator during ``fn()``, above what was live before.

    Read from the profiler's memory events (every allocation and free, with its size), so it is exact
    for tensors and unaffected by other processes or by the C allocator keeping freed pages.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def tensor_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor storages created during ``fn()`` and alive at the same time.

    For long runs (a whole ``generate``) where :func:`cpu_peak_bytes` is unusable: the profiler keeps
    an event per ATen call, gigabytes for a 128-token generate at batch 8. Here a dispatch mode sees
    every ATen output, counts each new storage once (storages first seen as an input existed before
    and are not counted, so in-place writes to them are not taken for allocations), and a weak
    reference subtracts it when it is freed. Buffers an ATen kernel allocates and frees inside itself are not seen (the profiler sees
    them); on the generate runs compared (SmolLM2 with 6 blocks, batch 1 and 4, base, LoRA, MoR and
    MiLoRA) both read the same to 0.01 MiB.
    """
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    state = {"current": 0, "peak": 0}
    seen = WeakIdKeyDictionary()
    refs = []

    def freed(nbytes: int) -> None:
        state["current"] -= nbytes

    class Tracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            for t in tree_leaves((args, kwargs)):  # inputs not seen yet existed before fn(): never counted
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage() not in seen:
                    seen[t.untyped_storage()] = True
            out = func(*args, **kwargs)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    storage = t.untyped_storage()
                    if storage not in seen:
                        seen[storage] = True
                        nbytes = storage.nbytes()
                        state["current"] += nbytes
                        state["peak"] = max(state["peak"], state["current"])
                        refs.append(weakref.ref(storage, lambda _, n=nbytes: freed(n)))
            return out

    with Tracker():
        fn()
    return state["peak"]


def timed_generate(generate: Callable[..., torch.Tensor], prompt: torch.Tensor, new_tokens: int, pad_id: int,
                   **kwargs) -> tuple[torch.Tensor, float]:  # fmt: skip
    """One greedy ``generate(...)`` of exactly ``new_tokens`` tokens under ``inference_mode``; returns the output
    and the seconds of its decoding steps, timed from the first logits-processor call (the prefill is done)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        first: float | None = None

        def __call__(self, input_ids, scores):
            if self.first is None:
                self.first = time.perf_counter()
            return scores

    clock = StepClock()
    with torch.inference_mode():
        out = generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([clock]),
            **kwargs,
        )
    end = time.perf_counter()
    assert out.shape == (prompt.shape[0], prompt.shape[1] + new_tokens), out.shape
    return out, end - clock.first


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------- models


def smollm2_cache_dir() -> Path:
    """Where ``examples/smollm2.py`` caches the converted SmolLM2-135M-Instruct checkpoint."""
    root = os.environ.get("LORAMIX_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "loramix"
    return base / SMOLLM2_SUBDIR


def smollm2_state() -> tuple[object, dict[str, torch.Tensor] | None, str]:
    """``(config, state_dict or None, description)``: the real weights when cached, else the same config."""
    from transformers import LlamaConfig

    path = smollm2_cache_dir()
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        config = LlamaConfig.from_pretrained(path)
        state = load_file(str(path / "model.safetensors"))
        return config, state, f"SmolLM2-135M-Instruct, real weights ({path})"
    config = LlamaConfig(**SMOLLM2_CONFIG)
    return config, None, "SmolLM2-135M shape at random init (weights not cached; run examples/smollm2.py)"


def build_llama(config, state: dict[str, torch.Tensor] | None, num_layers: int | None = None, seed: int = 0):
    """A ``LlamaForCausalLM`` in float32 sharing ``state``'s tensors (no copy), or seeded random init."""
    import copy

    from transformers import LlamaForCausalLM

    config = copy.deepcopy(config)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    config.use_cache = True
    if state is None:
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    keep = {
        k: v
        for k, v in state.items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < config.num_hidden_layers
    }
    missing, unexpected = model.load_state_dict(keep, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are not in the checkpoint: rebuild that module on CPU.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config)
    return model.float()


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------- contenders


def mor_delta_loop(x, lora_A, lora_B, omega_A, omega_B, probs, scaling):
    """MoR the way peer MoE-LoRA code computes a mixture: a Python loop over experts.

    Same signature and result as :func:`loramix.mor.functional.mor_delta`. Each expert's full output
    ``Ω_B[i] ⊙ B (Ω_A[i] ⊙ A x)`` (T x d_out) is formed, weighted by its router column and summed.
    ``A x`` is computed once and shared (the charitable version: peers with independent experts
    compute it per expert too).
    """
    import torch.nn.functional as F

    z = F.linear(x, lora_A)
    gates = probs.to(z.dtype)
    out = None
    for i in range(omega_A.shape[0]):
        expert = F.linear(z * omega_A[i], lora_B) * omega_B[i]
        term = gates[..., i : i + 1] * expert
        out = term if out is None else out + term
    return out * scaling


class patched:
    """Context manager: ``setattr(obj, name, value)`` for the duration of a block."""

    def __init__(self, obj, name, value):
        self.obj, self.name, self.value = obj, name, value

    def __enter__(self):
        self.old = getattr(self.obj, self.name)
        setattr(self.obj, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.obj, self.name, self.old)
