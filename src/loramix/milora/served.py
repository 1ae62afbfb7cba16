"""MiLoRA's served form for vLLM: its experts as plain LoRAs gated per request (see :mod:`loramix.vllm.convert`).

Every expert is an ordinary LoRA (``B_served = scaling·B``). Its gate is a per-request
:class:`~loramix.vllm.gates.PromptGate`: the request's router weight ``w_i`` for that expert (0 if not selected),
computed once from the prompt by the router of the expert's block (:class:`BlockRouter`, arXiv 2410.18035 Eq. 2-3,
kept here in float32). The plugin runs the routers at each block's router site, the layer whose input is the
block's normalized hidden state (the input of its attention projections), so a served request routes as
``PeftModel.generate`` routes it.

Pure PyTorch and transformers; imported by the vLLM plugin only (``Method.served_form``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from loramix.milora import functional as F_milora
from loramix.milora.config import resolve_gate_form
from loramix.vllm.convert import ServedAdapter, UnservableAdapter, by_module, lora_keys
from loramix.vllm.gates import Gate, PromptGate, PromptRouter

# The routing pools the whole prompt and applies to the prompt's own tokens: a prompt is prefilled in one step.
ROUTES_ON_PROMPT = True


def check_config(config: dict) -> list[str]:
    """The settings of a MiLoRA adapter that the served form does not reproduce exactly."""
    problems = []
    if config.get("use_dora"):
        problems.append("`use_dora`=True (MiDoRA: vLLM does not serve DoRA)")
    if config.get("router_input", "normalized") != "normalized":
        problems.append(
            f"`router_input`={config['router_input']!r} (the served router reads the block's normalized input, "
            "the input of its attention projections)"
        )
    if config.get("router_anchor", "input_layernorm") != "input_layernorm":
        problems.append(f"`router_anchor`={config['router_anchor']!r} (only `input_layernorm` is served)")
    if config.get("pooler") not in F_milora.POOLERS:
        problems.append(f"`pooler`={config.get('pooler')!r}")
    try:
        resolve_gate_form(config.get("gate_form"), config.get("normalize_gates"), config.get("loramix_format"))
    except ValueError as error:
        problems.append(str(error))
    return problems


def served_rank(config: dict) -> tuple[int, str]:
    """Each expert is a LoRA of rank ``r``."""
    return int(config["r"]), ""


@dataclass
class BlockRouter(PromptRouter):
    """The router of one MiLoRA block (paper Eq. 2-3): ``Top-k(softmax(g(Pooler(H)) W_r^T))``, all float32.

    ``experts`` are the block's expert modules in router-column order (the order loramix gives them: the base
    model's ``named_modules`` order).
    """

    weight: torch.Tensor  # (N, d)
    pooler: str
    activation: str
    top_k: int
    experts: tuple[str, ...]
    gate_form: str  # MiLoRAConfig.gate_form
    query: torch.Tensor | None = None  # (d,), attention pooler
    numerator: torch.Tensor | None = None  # rational activation
    denominator: torch.Tensor | None = None

    def route(self, hidden: torch.Tensor) -> torch.Tensor:
        """The router weights ``w`` (N,) of one prompt from its block input ``hidden`` (T, d), float32:
        :func:`loramix.milora.functional.route` for a batch of one, all of whose tokens enter the pool."""
        _, _, gates, _ = F_milora.route(
            hidden.unsqueeze(0),
            None,
            self.weight,
            pooler=self.pooler,
            activation=self.activation,
            top_k=self.top_k,
            gate_form=self.gate_form,
            query=self.query,
            numerator=self.numerator,
            denominator=self.denominator,
        )
        return gates.squeeze(0)


def expert_order(hf_config: PretrainedConfig, experts: set[str]) -> list[str]:
    """The expert modules in the base model's ``named_modules`` order (that of MiLoRA's router columns).

    The model is built on the meta device: no memory, no weights; only its module tree is read.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    ordered = [name for name, _ in model.named_modules() if name in experts]
    unknown = sorted(experts - set(ordered))
    if unknown:
        raise UnservableAdapter(
            f"The adapter has experts the base model ({type(model).__name__}) does not have: {unknown[:5]}. It was "
            "trained on another base model."
        )
    return ordered


def convert(config: dict, tensors: dict[str, torch.Tensor], hf_config: PretrainedConfig) -> ServedAdapter:
    """MiLoRA experts as plain LoRAs gated per request, and the block routers; see the module docstring."""
    scaling = config["lora_alpha"] / config["r"]
    params = by_module(tensors, "milora_")
    anchor = config.get("router_anchor", "input_layernorm")
    router_blocks = {m[: -len(anchor) - 1]: p for m, p in params.items() if m.endswith("." + anchor)}
    expert_params = {m: p for m, p in params.items() if not m.endswith("." + anchor)}
    out: dict[str, torch.Tensor] = {}
    for module, p in expert_params.items():
        if set(p) != {"A", "B"}:
            raise UnservableAdapter(f"MiLoRA expert '{module}' has parameters {sorted(p)}, expected A and B.")
        key_A, key_B = lora_keys(module)
        out[key_A], out[key_B] = p["A"], scaling * p["B"]
    # read as MiLoRAConfig reads it: format 1 files hold loramix 0.1's normalize_gates
    gate_form = resolve_gate_form(config.get("gate_form"), config.get("normalize_gates"), config.get("loramix_format"))
    gates: dict[str, Gate] = {}
    routers: dict[int, PromptRouter] = {}
    ordered = expert_order(hf_config, set(expert_params))
    for block, p in router_blocks.items():
        index = block.rsplit(".", 1)[-1]
        if not index.isdigit():
            raise UnservableAdapter(f"MiLoRA router of '{block}' is not in a numbered transformer block.")
        members = tuple(m for m in ordered if m.startswith(block + "."))
        if len(members) != p["router"].shape[0]:
            raise UnservableAdapter(
                f"The router of '{block}' has {p['router'].shape[0]} experts but the checkpoint holds {len(members)} "
                f"expert modules in that block: {list(members)}."
            )
        routers[int(index)] = BlockRouter(
            weight=p["router"] * config.get("router_lr_ratio", 1.0),  # W_r = ratio · P (ScaledRouter)
            pooler=config["pooler"],
            activation=config["activation"],
            top_k=config["top_k"],
            experts=members,
            gate_form=gate_form,
            query=p.get("pool_query"),
            numerator=p.get("rational_num"),
            denominator=p.get("rational_den"),
        )
        for column, member in enumerate(members):
            gates[member] = PromptGate(int(index), column)
    orphans = sorted(set(expert_params) - set(gates))
    if orphans:
        raise UnservableAdapter(f"MiLoRA experts without a router in their block: {orphans[:5]}.")
    return ServedAdapter(config["peft_type"], config["r"], out, gates, routers)
