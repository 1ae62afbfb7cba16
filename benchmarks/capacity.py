"""The capacity-bound profile of the quality benchmark: where an adapter's capacity decides the score.

``python benchmarks/quality.py --profile capacity [--quick]`` runs :func:`main`. The model is SmolLM2-135M-Instruct's
first ``layers`` blocks (two) (real pretrained weights, float32, with its final norm and tied head), fine-tuned on the
eight tasks of ``benchmarks/capacity_tasks.py`` mixed together: every task is at chance before training, each
needs another skill and answers in its own labels, so one low-rank update has to serve all of them. Loss and
scoring on the one answer token; accuracy = the task's label with the highest logit is the right one.

Training is what ``transformers.Trainer`` does by default: AdamW at one learning rate for every parameter
(weight decay 0), linear decay, gradient clipping 1.0; per-group rates only in variants that name them. Each contender's learning rate is
chosen from ``lr_grid`` on the validation split with seed 0 (highest accuracy, then lowest NLL); every seed (seed 0's
run at that rate included) is then scored on the test split, which is the only split reported. Differences are paired by seed (same items, same order, same base
model): mean over seeds and a 95% Student-t confidence interval.

On a GPU (the issue's bf16 run on a larger model, not yet run: no GPU was available), the same profile on the whole
SmolLM2-135M (30 blocks) in bf16 autocast with float32 weights, as ``Trainer(bf16=True)``; runs of another device or
precision are logged under their own keys::

    python benchmarks/quality.py --profile capacity --quick --device cuda --dtype bfloat16 --layers 30 \
        --json /tmp/capacity_gpu/quick.json

Contenders per rank ``r`` (FFN = gate/up/down_proj; N = 8 unless named):

====================  ================================================================
``lora_r{r}``         PEFT LoRA r on the FFN
``lora_r{N·r}``       PEFT LoRA at MoR E8's total rank N·r (its arithmetic twin)
``lora_r{m}``         PEFT LoRA at MoR E8's trainable parameter count (m = nearest rank)
``mor_e{1,2,4,8}``    loramix MoR with 1/2/4/8 experts of rank r, defaults otherwise (paper Table 3)
``mor_e8_mean``       MoR E8 with the mean router (paper Table 4)
``lora_all``          PEFT LoRA r on the seven projections
``milora``            loramix MiLoRA r, top-3 of the seven projections, defaults otherwise (gates 'unit_mean')
====================  ================================================================

plus ``--variants`` (:data:`VARIANTS`): candidate defaults, each a contender with config fields changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import loramix
from _common import build_llama, command_line, epoch_batches, machine_info, optimizer_step, print_header
from capacity_tasks import TASKS, Item, build_splits
from loramix.analysis import router_statistics, summarize
from loramix.routing.session import has_routing
from loramix.scoring import left_padded

FFN = ["gate_proj", "up_proj", "down_proj"]
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS = 8


@dataclass
class Profile:
    layers: int
    steps: int
    batch: int
    ranks: tuple[int, ...]
    lr_grid: tuple[float, ...]
    seeds: tuple[int, ...]
    per_task: dict = field(default_factory=lambda: {"train": 300, "validation": 40, "test": 100})
    device: str = "cpu"
    dtype: str = "float32"  # "bfloat16": the forward under autocast, float32 weights and optimizer (Trainer's bf16)


# Sizes, calibrated on 2 idle cores (2026-12-05, torch 2.13.0+cpu; RESULTS.md §7). Two blocks: LoRA r2 then scores
# 0.61 and LoRA r10 0.72 (seed 0, lr 3e-3), so rank binds, and one 800-step run with its evaluations takes about 60 s
# in each of two 1-thread workers (two workers finish 1.4x the runs per hour of one 2-thread process). Four blocks
# (the first calibration) took 80-115 s a run and 2.7 h for the full profile. Steps matter: LoRA r2 on four blocks
# reached 0.59 after 300 steps and 0.71 after 800. Rates: 1e-2 was worse than 3e-3 at 800 steps for LoRA r2, LoRA r16
# and MoR E8R2; 6e-3 won seed 0's validation for some contenders but then failed other seeds (unstable), so the
# grid stops at 3e-3. Runs: 10 contenders x (2 rates + 2 more seeds) per rank, LoRA r16 shared by r = 2 and 8: 116
# runs, 61 minutes measured for the full profile with two workers; each further seed adds 29 runs (about 15 min).
# On a GPU (--device cuda): processes sharing the device; each run is small (a 135M model, batch 16).
GPU_WORKERS = 4
QUICK = Profile(layers=2, steps=800, batch=16, ranks=(2,), lr_grid=(1.5e-3, 3e-3), seeds=(0, 1, 2))
FULL = Profile(layers=2, steps=800, batch=16, ranks=(2, 4, 8), lr_grid=(1.5e-3, 3e-3), seeds=(0, 1, 2))


def _lora(r: int, modules: list[str]) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=4 * r, lora_dropout=0.0, target_modules=modules, task_type="CAUSAL_LM")


def _mor(r: int, experts: int, **fields) -> loramix.MoRConfig:
    return loramix.MoRConfig(r=r, lora_alpha=4 * r, num_experts=experts, lora_dropout=0.0, task_type="CAUSAL_LM",
                             **fields)  # fmt: skip


def _milora(r: int, **fields) -> loramix.MiLoRAConfig:
    fields = {"lora_alpha": 4 * r, "top_k": 3, "lora_dropout": 0.0, **fields}
    return loramix.MiLoRAConfig(r=r, task_type="CAUSAL_LM", **fields)


def matched_rank(r: int, experts: int, dims: list[tuple[int, int]]) -> int:
    """The LoRA rank whose trainable parameters are nearest MoR's (r, experts) on modules of ``dims`` (d_in, d_out):
    MoR has ``r (d_in + d_out)`` (A, B) + ``N r`` (Ω_A) + ``N d_out`` (Ω_B) + ``N d_in`` (router) per module."""
    mor = sum(r * (i + o) + experts * (r + o + i) for i, o in dims)
    return max(1, round(mor / sum(i + o for i, o in dims)))


def contenders(r: int, dims: list[tuple[int, int]]) -> dict[str, callable]:
    """The contenders at rank ``r`` (module docstring), name -> config factory."""
    match = matched_rank(r, EXPERTS, dims)
    return {
        f"lora_r{r}": lambda: _lora(r, FFN),
        f"lora_r{EXPERTS * r}": lambda: _lora(EXPERTS * r, FFN),
        f"lora_r{match}": lambda: _lora(match, FFN),
        **{f"mor_e{n}r{r}": (lambda n=n: _mor(r, n)) for n in (1, 2, 4, EXPERTS)},
        f"mor_e{EXPERTS}r{r}_mean": lambda: _mor(r, EXPERTS, router="mean"),
        f"lora_r{r}_all": lambda: _lora(r, SEVEN),
        f"milora_r{r}": lambda: _milora(r),
    }


# Candidate defaults: name -> (config factory taking r, AdamW rate multipliers per loramix.optim group).
VARIANTS: dict[str, tuple] = {
    "mor_e8_omega0": (lambda r: _mor(r, EXPERTS, omega_init_std=0.0), {}),
    "mor_e8_omega0.1": (lambda r: _mor(r, EXPERTS, omega_init_std=0.1), {}),
    "mor_e8_omega0.5": (lambda r: _mor(r, EXPERTS, omega_init_std=0.5), {}),
    "mor_e8_omega0.5_router10": (lambda r: _mor(r, EXPERTS, omega_init_std=0.5), {"router": 10.0}),
    "mor_e8_omega0.1_router10": (lambda r: _mor(r, EXPERTS, omega_init_std=0.1), {"router": 10.0}),
    "milora_normalized": (lambda r: _milora(r, gate_form="normalized"), {}),
    # the paper's Eq. 3 as written (loramix 0.1's default; RESULTS.md §7 measured the defaults of the time with it)
    "milora_paper_gates": (lambda r: _milora(r, gate_form="probability"), {}),
    "milora_normalized_router10": (lambda r: _milora(r, gate_form="normalized"), {"router": 10.0}),
    # the same rates through the config (loramix's router_lr_ratio: W_r only, one optimizer group)
    "mor_e8_omega0.5_ratio10": (lambda r: _mor(r, EXPERTS, omega_init_std=0.5, router_lr_ratio=10.0), {}),
    "mor_e8_omega0.1_ratio10": (lambda r: _mor(r, EXPERTS, omega_init_std=0.1, router_lr_ratio=10.0), {}),
    "milora_normalized_ratio10": (lambda r: _milora(r, gate_form="normalized", router_lr_ratio=10.0), {}),
    # selected experts at LoRA's scale when the router is uniform: gates p_i / Σ_selected p_j sum to 1, so
    # lora_alpha x top_k makes each ≈ 1 (paper gates: p_i ≈ 1/7, lora_alpha x 7). Under Adam a gate scale c acts on a
    # fresh B like a rate c times larger, so these ask whether MiLoRA only lagged because its updates were scaled down.
    # The first is the function of today's default gates ('unit_mean', k·p_i/S) computed another way.
    "milora_normalized_alpha3": (lambda r: _milora(r, gate_form="normalized", lora_alpha=4 * r * 3), {}),
    "milora_paper_gates_alpha7": (lambda r: _milora(r, gate_form="probability", lora_alpha=4 * r * 7), {}),
    "mor_e8_omega_rate10": (lambda r: _mor(r, EXPERTS), {"omega": 10.0}),
}


@dataclass
class Encoded:
    """A split's items as model inputs: left-padded prompts, the answer token, and each item's label tokens."""

    tasks: list[str]
    context: list[list[int]]
    answer: list[int]
    labels: list[list[int]]
    gold: list[int]


def encode(tokenizer, items: list[Item]) -> Encoded:
    """Tokenize ``prompt`` and ``" " + label`` apart (as a scorer would); the labels of a task must share every
    token but the last (``" 7"`` is a space token then a digit), which then goes to the context. Raises otherwise."""
    out = Encoded([], [], [], [], [])
    for item in items:
        ids = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in item.choices]
        prefix = ids[0][:-1]
        if any(x[:-1] != prefix for x in ids) or len({x[-1] for x in ids}) != len(ids):
            raise ValueError(f"labels of task {item.task!r} are not one distinct last token each: {ids}")
        out.tasks.append(item.task)
        out.context.append(tokenizer(item.prompt)["input_ids"] + prefix)
        out.labels.append([x[-1] for x in ids])
        out.answer.append(ids[item.gold][-1])
        out.gold.append(item.gold)
    return out


def label_vocabulary(data: dict[str, Encoded]) -> list[int]:
    """Every label token of every split, sorted; each split's ``labels`` and ``answer`` become indices into it."""
    vocabulary = sorted({t for d in data.values() for labels in d.labels for t in labels})
    index = {t: i for i, t in enumerate(vocabulary)}
    for d in data.values():
        d.labels = [[index[t] for t in labels] for labels in d.labels]
        d.answer = [index[t] for t in d.answer]
    return vocabulary


def build_model(config, state, layers: int, vocabulary: list[int]):
    """SmolLM2's first ``layers`` blocks, final norm and head, the head cut to the rows of ``vocabulary``.

    Loss and scores only ever compare the labels of an item's task, and a label's logit is its row of the tied
    head times the final hidden state, so the cut head gives exactly the logits that matter; it spares the
    49152-row product (most of a step's time at these sizes)."""
    model = build_llama(config, state, num_layers=layers)
    rows = model.get_input_embeddings().weight[vocabulary].detach().clone()
    head = torch.nn.Linear(rows.shape[1], rows.shape[0], bias=False)
    head.weight = torch.nn.Parameter(rows, requires_grad=False)
    model.lm_head = head
    model.config.tie_word_embeddings = False  # the head is its own now: nothing may re-tie it
    return model


def _inputs(rows: list[list[int]], pad: int, routed: bool, device: torch.device | str = "cpu") -> dict:
    ids, attention, positions, _ = left_padded([(row, []) for row in rows], pad)
    inputs = {"input_ids": ids, "attention_mask": attention, "position_ids": positions}
    if routed:
        inputs["prompt_mask"] = attention.bool()  # MiLoRA routes on the whole prompt (the answer is not in it)
    return {k: v.to(device) for k, v in inputs.items()}


def autocast(model, dtype: str):
    """The forward's precision: float32, or ``dtype`` under autocast with float32 weights (``Trainer(bf16=True)``)."""
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


def last_logits(model, rows: list[list[int]], pad: int, dtype: str = "float32") -> torch.Tensor:
    with autocast(model, dtype):
        out = model(**_inputs(rows, pad, has_routing(model), model.device), logits_to_keep=1)
    return out.logits[:, -1].float()


def label_logits(logits: torch.Tensor, data: Encoded, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, targets)``: each row's logits of its task's labels only (padded with -inf to the most labels)
    and the index of the right label: the loss is a classification among the task's labels, as scored."""
    width = max(len(data.labels[i]) for i in rows)
    device = logits.device
    index = torch.tensor([data.labels[i] + [0] * (width - len(data.labels[i])) for i in rows], device=device)
    scores = logits.gather(1, index)
    valid = torch.tensor([[k < len(data.labels[i]) for k in range(width)] for i in rows], device=device)
    return scores.masked_fill(~valid, float("-inf")), torch.tensor([data.gold[i] for i in rows], device=device)


def train(model, data: Encoded, profile: Profile, lr: float, seed: int, pad: int, probe=None, rates=None) -> list[float]:
    """AdamW at one rate for every trainable parameter (``Trainer``'s default), linear decay to 0, clipping 1.0.
    ``rates`` (candidate defaults only): multipliers of :func:`loramix.optim.parameter_groups`' router / omega rates."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = params
    if rates:
        from loramix.optim import parameter_groups

        groups = parameter_groups(model, lr, router_lr=lr * rates.get("router", 1.0), omega_lr=lr * rates.get("omega", 1.0))
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / profile.steps))
    coef = getattr(model.peft_config["default"], "router_aux_loss_coef", 0.0)
    batches = epoch_batches(range(len(data.answer)), profile.batch, seed)
    losses = []
    model.train()
    for step in range(profile.steps):
        if probe is not None and step in probe.at:
            probe(model, step)
        batch = next(batches)
        with autocast(model, profile.dtype):
            inputs = _inputs([data.context[i] for i in batch], pad, has_routing(model), model.device)
            out = model(**inputs, logits_to_keep=1)
        loss = torch.nn.functional.cross_entropy(*label_logits(out.logits[:, -1].float(), data, batch))
        losses.append(optimizer_step(loss, out, coef, params, optimizer, schedule))
    model.eval()
    if probe is not None:
        probe(model, profile.steps)
    return losses


@torch.no_grad()
def evaluate(model, data: Encoded, pad: int, batch: int = 128, dtype: str = "float32") -> dict:
    """Per item: right (bool) and the right label's NLL among the task's labels; per task: their means."""
    model.eval()
    right, nll = [], []
    for start in range(0, len(data.answer), batch):
        logits = last_logits(model, data.context[start : start + batch], pad, dtype).cpu()
        for row, i in enumerate(range(start, min(start + batch, len(data.answer)))):
            scores = torch.log_softmax(logits[row, data.labels[i]].double(), dim=-1)
            right.append(int(scores.argmax()) == data.gold[i])
            nll.append(-float(scores[data.gold[i]]))
    per_task = {
        t: {"accuracy": statistics.mean(r for r, task in zip(right, data.tasks, strict=True) if task == t),
            "nll": statistics.mean(n for n, task in zip(nll, data.tasks, strict=True) if task == t)}
        for t in TASKS
    }  # fmt: skip
    return {"right": right, "tasks": per_task, "accuracy": statistics.mean(right), "nll": statistics.mean(nll)}


class RouterProbe:
    """Router entropy, task specialisation and (MoR) Ω spread on held-out prompts at the start, middle and end."""

    def __init__(self, data: Encoded, pad: int, steps: int, per_task: int = 16, dtype: str = "float32") -> None:
        self.dtype = dtype
        keep = [i for t in TASKS for i in [j for j, task in enumerate(data.tasks) if task == t][:per_task]]
        self.rows, self.tasks, self.pad = [data.context[i] for i in keep], [data.tasks[i] for i in keep], pad
        self.at = {0, steps // 2}
        self.snapshots: dict[int, dict] = {}

    def __call__(self, model, step: int) -> None:
        config = model.peft_config["default"]
        if not has_routing(model) or getattr(config, "router", "") == "mean" or getattr(config, "num_experts", 2) == 1:
            return
        batch = {**_inputs(self.rows, self.pad, True), "task": self.tasks}
        with autocast(model, self.dtype):
            stats = router_statistics(model, [batch])
        snap = {k: v for k, v in summarize(stats).items() if k in ("normalized_entropy", "max_usage")}
        snap["specialisation"] = specialisation(stats)
        spread = [p.detach().double().std(dim=0).mean().item() for n, p in model.named_parameters()
                  if "mor_omega" in n and p.shape[0] > 1]  # fmt: skip
        if spread:
            snap["omega_spread"] = statistics.mean(spread)
        self.snapshots[step] = snap


def specialisation(stats: dict) -> float:
    """Mean over layers and tasks of the total-variation distance between a task's router distribution (MoR: mean
    probabilities; MiLoRA: selection frequencies) and all tasks': 0 = every task routed alike."""
    key, scale = ("mean_prob", 1.0) if stats["method"] == "mor" else ("usage", 1.0 / stats["top_k"])
    distances = [
        0.5 * sum(abs(a - b) * scale for a, b in zip(per[key][layer], overall, strict=True))
        for layer, overall in enumerate(stats[key])
        for per in stats["tasks"].values()
        if overall is not None and per[key][layer] is not None
    ]
    return statistics.mean(distances) if distances else float("nan")


def student_t975(df: int) -> float:
    """The 97.5% quantile of Student's t (two-sided 95% interval), df >= 1: tabulated to 20; beyond, the larger
    (more cautious) value of the next tabulated df (21-30: 2.086 of df 20; above 30: 2.042 of df 30)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
             11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
             20: 2.086}  # fmt: skip
    return table.get(df, 2.086 if df <= 30 else 2.042)


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of ``a - b`` over seeds and its 95% t-interval ``(mean, low, high)``."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.mean(d)
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    half = student_t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def comparisons(r: int, dims) -> list[tuple[str, str, str]]:
    """The issue's targets at rank r: (label, contender, reference)."""
    match, e = matched_rank(r, EXPERTS, dims), EXPERTS
    return [
        (f"MoR E{e} − MoR E1 (paper Table 3)", f"mor_e{e}r{r}", f"mor_e1r{r}"),
        (f"MoR E{e} − LoRA r{match} (equal parameters)", f"mor_e{e}r{r}", f"lora_r{match}"),
        (f"MoR E{e} − LoRA r{r} (equal rank)", f"mor_e{e}r{r}", f"lora_r{r}"),
        (f"MoR E{e} − LoRA r{e * r} (equal total rank)", f"mor_e{e}r{r}", f"lora_r{e * r}"),
        (f"MoR E{e} router − mean (paper Table 4)", f"mor_e{e}r{r}", f"mor_e{e}r{r}_mean"),
        ("MiLoRA − LoRA, seven projections", f"milora_r{r}", f"lora_r{r}_all"),
        # candidate defaults (--variants), where they ran
        (f"MoR E{e}, Ω σ 0.5 + router_lr_ratio 10 − MoR E{e} defaults", f"mor_e8_omega0.5_ratio10_r{r}", f"mor_e{e}r{r}"),
        (f"MoR E{e}, Ω σ 0.5 + router_lr_ratio 10 − LoRA r{match}", f"mor_e8_omega0.5_ratio10_r{r}", f"lora_r{match}"),
        ("MiLoRA defaults ('unit_mean') − paper gates", f"milora_r{r}", f"milora_paper_gates_r{r}"),
        ("MiLoRA paper gates − LoRA, seven projections", f"milora_paper_gates_r{r}", f"lora_r{r}_all"),
        ("MiLoRA gates normalized − paper gates", f"milora_normalized_r{r}", f"milora_paper_gates_r{r}"),
        ("MiLoRA gates normalized − LoRA, seven projections", f"milora_normalized_r{r}", f"lora_r{r}_all"),
        ("MiLoRA gates normalized, α×3 − LoRA, seven projections", f"milora_normalized_alpha3_r{r}", f"lora_r{r}_all"),
        ("MiLoRA gates normalized, α×3 − paper gates", f"milora_normalized_alpha3_r{r}", f"milora_paper_gates_r{r}"),
        ("MiLoRA paper gates, α×7 − LoRA, seven projections", f"milora_paper_gates_alpha7_r{r}", f"lora_r{r}_all"),
        (f"MoR E{e}, Ω rate ×10 − MoR E{e} defaults", f"mor_e8_omega_rate10_r{r}", f"mor_e{e}r{r}"),
        (f"MoR E{e}, Ω rate ×10 − LoRA r{match}", f"mor_e8_omega_rate10_r{r}", f"lora_r{match}"),
    ]


def report(runs: dict, profile: Profile, dims) -> str:
    """Markdown: per rank, each contender's test accuracy (mean ± sd over seeds) and per task, then the targets'
    paired differences with 95% CIs."""
    lines = []
    for r in profile.ranks:
        names = [n for n in contenders(r, dims) if n in runs] + [n for n in runs if runs[n]["rank"] == r
                                                                   and n not in contenders(r, dims)]  # fmt: skip
        lines += [f"\n**r = {r}** (test accuracy, mean ± sd over seeds {list(profile.seeds)})\n",
                  "| contender | trainable | lr | accuracy | NLL | " + " | ".join(TASKS) + " |",
                  "|---|---|---|---|---|" + "---|" * len(TASKS)]  # fmt: skip
        for n in names:
            seeds = runs[n]["test"]
            acc = [s["accuracy"] for s in seeds.values()]
            nll = [s["nll"] for s in seeds.values()]
            per = [statistics.mean(s["tasks"][t]["accuracy"] for s in seeds.values()) for t in TASKS]
            sd = lambda v: f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")  # noqa: E731
            lines.append(f"| {n} | {runs[n]['trainable'] / 1e3:.1f}k | {runs[n]['lr']:g} | {sd(acc)} | {sd(nll)} | "
                         + " | ".join(f"{p:.2f}" for p in per) + " |")  # fmt: skip
        lines += ["", "| paired difference (accuracy points) | mean | 95% CI | seeds |", "|---|---|---|---|"]
        for label, a, b in comparisons(r, dims):
            if a in runs and b in runs:
                common = sorted(set(runs[a]["test"]) & set(runs[b]["test"]))
                mean, low, high = paired([runs[a]["test"][s]["accuracy"] for s in common],
                                         [runs[b]["test"][s]["accuracy"] for s in common])  # fmt: skip
                lines.append(f"| {label} | {100 * mean:+.2f} | [{100 * low:+.2f}, {100 * high:+.2f}] | {len(common)} |")
    return "\n".join(lines)


def router_report(runs: dict) -> str:
    lines = ["| contender | step | normalised entropy | task specialisation | Ω spread |", "|---|---|---|---|---|"]
    for n, run in runs.items():
        for step in sorted({int(k) for snaps in run["routers"].values() for k in snaps}):
            snaps = [s[str(step)] if str(step) in s else s.get(step) for s in run["routers"].values()]
            snaps = [s for s in snaps if s]
            if snaps:
                mean = lambda k, snaps=snaps: statistics.mean(s[k] for s in snaps) if k in snaps[0] else float("nan")  # noqa: E731
                lines.append(f"| {n} | {step} | {mean('normalized_entropy'):.3f} | {mean('specialisation'):.3f} | "
                             f"{mean('omega_spread'):.3f} |")  # fmt: skip
    return "\n".join(lines)


@dataclass
class Setup:
    """What every run needs, built the same way in the main process and in each worker."""

    config: object
    state: dict
    pad: int
    data: dict[str, Encoded]
    vocabulary: list[int]
    dims: list[tuple[int, int]]


def prepare(profile: Profile) -> Setup:
    """Load SmolLM2, build and encode the splits (seeded: identical in every process)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig

    from smollm2 import load_smollm2

    path = load_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config, state = LlamaConfig.from_pretrained(path), load_file(str(path / "model.safetensors"))
    one_token = lambda w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1  # noqa: E731
    splits = build_splits(0, profile.per_task, one_token)
    data = {s: encode(tokenizer, [i for t in TASKS for i in splits[s][t]]) for s in splits}
    vocabulary = label_vocabulary(data)
    layer = build_model(config, state, 1, vocabulary).model.layers[0]
    dims = [(m.in_features, m.out_features) for n, m in layer.mlp.named_children() if n in FFN]
    return Setup(config, state, tokenizer.pad_token_id, data, vocabulary, dims)


def factory(name: str, r: int, dims) -> tuple:
    """``(config factory, rate multipliers)`` of a contender or variant by its name at rank ``r``: by name, so that
    a worker process can rebuild it (the factories are closures)."""
    pool = contenders(r, dims)
    if name in pool:
        return pool[name], {}
    make, rates = VARIANTS[name.removesuffix(f"_r{r}")]
    return (lambda: make(r)), rates


_WORKER: dict = {}


def _init_worker(profile: Profile, threads: int, paths: list[str]) -> None:
    import sys

    sys.path[:0] = [p for p in paths if p not in sys.path]
    torch.set_num_threads(threads)
    _WORKER["setup"], _WORKER["profile"] = prepare(profile), profile


def _worker_run(job: tuple) -> dict:
    return train_and_score(_WORKER["setup"], _WORKER["profile"], *job)


def main(args) -> None:
    profile = QUICK if args.quick else FULL
    for name in ("seeds", "steps", "ranks", "lr_grid", "layers"):
        if getattr(args, name, None):
            setattr(profile, name, tuple(getattr(args, name)) if name in ("seeds", "ranks", "lr_grid") else getattr(args, name))
    for name in ("device", "dtype"):
        if getattr(args, name, None):
            setattr(profile, name, getattr(args, name))
    device = torch.device(profile.device)
    profile.device = f"cuda:{device.index or 0}" if device.type == "cuda" else device.type  # one log key per device
    if profile.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {profile.device}: torch sees no CUDA device")
    # CPU: one 1-thread process per core (short sequences are overhead-bound); a GPU: a few processes share it
    workers = args.workers or (GPU_WORKERS if profile.device.startswith("cuda") else len(os.sched_getaffinity(0)))
    if workers < 1:
        raise SystemExit(f"--workers must be at least 1, got {workers}")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"not variants of the capacity profile: {sorted(unknown)} (have {sorted(VARIANTS)})")
    info = machine_info(torch.device(profile.device))
    print_header("Capacity-bound fine-tuning quality (benchmarks/quality.py --profile capacity)", info)
    print(f"profile: {profile}; workers: {workers}", flush=True)
    setup = prepare(profile)
    print("items: " + ", ".join(f"{s} {len(d.answer)}" for s, d in setup.data.items()))
    base = build_model(setup.config, setup.state, profile.layers, setup.vocabulary).to(profile.device).eval()
    base_test = evaluate(base, setup.data["test"], setup.pad, dtype=profile.dtype)
    print(f"base model ({profile.layers} blocks): test accuracy {base_test['accuracy']:.3f} "
          + " ".join(f"{t} {v['accuracy']:.2f}" for t, v in base_test["tasks"].items()), flush=True)  # fmt: skip
    del base
    log = Path(args.json).with_suffix(".jsonl") if args.json else None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    done = _resume(log)
    plan = []
    unknown = set(args.contenders or []) - {n for r in profile.ranks for n in contenders(r, setup.dims)} - {""}
    if unknown and not args.only_variants:
        raise SystemExit(f"not contenders at r = {list(profile.ranks)}: {sorted(unknown)}")
    for r in profile.ranks:
        every = contenders(r, setup.dims)
        pool = [] if args.only_variants else list(every)
        plan += [(r, n) for n in pool if not args.contenders or n in args.contenders]
        plan += [(r, f"{v}_r{r}") for v in args.variants]
    run_jobs = _runner(done, log, setup, profile, workers)
    # Phase 1: every contender at every rate of the grid, seed 0, scored on validation; phase 2: the other seeds at
    # the chosen rate. Seed 0's run at the chosen rate is phase 1's (the same key).
    grid = profile.lr_grid
    if len(grid) > 1:
        run_jobs([(name, r, lr, 0) for r, name in plan for lr in grid])
    runs: dict[str, dict] = {}
    for r, name in plan:
        run = runs.setdefault(name, {"rank": r, "test": {}, "validation": {}, "routers": {}, "losses": {}})
        if len(grid) > 1:
            run["validation"] = {lr: done[_key(name, lr, 0, profile)] for lr in grid}
            run["lr"] = max(grid, key=lambda lr: (run["validation"][lr]["validation"]["accuracy"],
                                                  -run["validation"][lr]["validation"]["nll"]))  # fmt: skip
        else:
            run["lr"] = grid[0]
    run_jobs([(name, r, runs[name]["lr"], seed) for r, name in plan for seed in profile.seeds])
    for _, name in plan:
        run = runs[name]
        for seed in profile.seeds:
            result = done[_key(name, run["lr"], seed, profile)]
            run["test"][seed] = result["test"]
            run["routers"][seed] = result["routers"]
            run["trainable"] = result["trainable"]
            run["losses"][seed] = result["final_loss"]
    print()
    print(report(runs, profile, setup.dims))
    print()
    print(router_report(runs))
    print(f"\ncommand: {command_line()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "profile": asdict(profile), "base": base_test,
                                               "runs": runs}, default=str, indent=1))  # fmt: skip


def _key(name: str, lr: float, seed: int, profile: Profile) -> str:
    # runs on another device or in another precision are other runs (the CPU float32 keys are those of old logs)
    where = "" if (profile.device, profile.dtype) == ("cpu", "float32") else f"|{profile.device}|{profile.dtype}"
    return f"{name}|{lr:g}|{seed}|{profile.steps}|{profile.layers}{where}"


def fingerprint(name: str, r: int, dims) -> str:
    """What a run of ``name`` at rank ``r`` trains: a hash of its config's fields and rate multipliers. A logged run
    with another fingerprint (a default or a contender changed since) is run again, not reused under its old name.
    The fields include PEFT's own (``peft_version`` among them), so a log does not carry over a PEFT upgrade."""
    make, rates = factory(name, r, dims)
    fields = make().to_dict()
    fields = {k: sorted(v) if isinstance(v, set) else v for k, v in fields.items()}
    text = json.dumps({"config": fields, "rates": rates}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _runner(done: dict, log: Path | None, setup: Setup, profile: Profile, workers: int):
    """A function that runs the jobs ``(name, r, lr, seed)`` not yet in ``done`` (the JSON log), in this process
    (``workers == 1``, ``--threads`` threads) or in ``workers`` processes of ``cores // workers`` threads each, and
    records each result as it arrives. The two settings differ in float rounding (threads split reductions), so a
    log resumed with another ``--workers`` may hold runs of both; each record names its ``threads``. A failed run
    or Ctrl-C cancels the queued runs (finished ones stay in the log) and re-raises."""

    def record(result: dict) -> None:
        routers = result["routers"].get(profile.steps)
        print(f"{result['key']}: validation {result['validation']['accuracy']:.3f}, test {result['test']['accuracy']:.3f}, "
              f"final loss {result['final_loss']:.3f}, {result['seconds']:.0f}s, routers {json.dumps(routers)}", flush=True)  # fmt: skip
        if log is not None:
            with log.open("a") as f:
                f.write(json.dumps(result, default=str) + "\n")
        done[result["key"]] = result

    def current(job: tuple) -> bool:
        logged = done.get(_key(job[0], job[2], job[3], profile))
        return logged is not None and logged.get("config") == fingerprint(job[0], job[1], setup.dims)

    def run_jobs(jobs: list[tuple]) -> None:
        # one job per key: LoRA r16 is a contender at r = 2 (MoR E8R2's total rank) and r = 8 (its parameters)
        todo = list({_key(j[0], j[2], j[3], profile): j for j in jobs if not current(j)}.values())
        stale = [j for j in jobs if _key(j[0], j[2], j[3], profile) in done and not current(j)]
        if stale:
            print(f"{len(stale)} logged runs were made with another config of their contender (or before runs were "
                  "fingerprinted); running them again: "
                  + ", ".join(sorted({_key(j[0], j[2], j[3], profile) for j in stale})), flush=True)  # fmt: skip
        if workers == 1:
            for job in todo:
                record(train_and_score(setup, profile, *job))
            return
        if not todo:
            return
        import concurrent.futures as cf
        import multiprocessing
        import sys

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=(profile, threads, sys.path))  # fmt: skip
        try:
            for future in cf.as_completed([pool.submit(_worker_run, job) for job in todo]):
                record(future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # not the whole queue on a failure or Ctrl-C
            raise
        pool.shutdown()

    return run_jobs


def train_and_score(setup: Setup, profile: Profile, name: str, r: int, lr: float, seed: int) -> dict:
    """Train ``name`` at rank ``r`` and ``lr`` from ``seed``; score validation and test; router snapshots."""
    make, rates = factory(name, r, setup.dims)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = get_peft_model(build_model(setup.config, setup.state, profile.layers, setup.vocabulary), make())
    model.to(profile.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    probe = RouterProbe(setup.data["validation"], setup.pad, profile.steps, dtype=profile.dtype)
    losses = train(model, setup.data["train"], profile, lr, seed, setup.pad, probe, rates)
    return {"key": _key(name, lr, seed, profile), "config": fingerprint(name, r, setup.dims), "trainable": trainable, "final_loss": statistics.mean(losses[-10:]),
            "validation": _drop_items(evaluate(model, setup.data["validation"], setup.pad, dtype=profile.dtype)),
            "test": evaluate(model, setup.data["test"], setup.pad, dtype=profile.dtype), "routers": probe.snapshots,
            "seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}  # fmt: skip


def _drop_items(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "right"}


def _resume(log: Path | None) -> dict:
    if log is None or not log.exists():
        return {}
    done = {}
    for line in log.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            record["routers"] = {int(k): v for k, v in record["routers"].items()}
            done[record["key"]] = record
    print(f"resuming: {len(done)} runs from {log}")
    return done
