"""A saved loramix adapter in the form vLLM's LoRA machinery serves: LoRA matrices plus per-token gates.

vLLM computes every LoRA of a batch as ``shrink`` (``buffer = x A^T``, float32, one row per token) then
``expand`` (``out += buffer B^T``), each token with its request's adapter slot. Both loramix methods fit that
form exactly once a gate multiplies the buffer between the two (:mod:`loramix.vllm.gates`):

* **MoR** (arXiv 2410.13408, Eq. 11/15; ``loramix/mor/functional.py``). The mixture of N rank-r experts is
  one LoRA of rank N·r: ``A_served = [Ω_A[0]⊙A; ...; Ω_A[N-1]⊙A; W_router]`` (N·r + N rows: the router rows
  ride along in the shrink) and ``B_served = [scaling·Ω_B[i]⊙B ...; 0]``. The gate turns the last N buffer
  columns into ``G = softmax(router logits)`` and multiplies column block i by ``G_i``. With the mean router
  or a single expert ``G`` is constant and is folded into ``B``: a plain rank-r LoRA, no gate.
* **MiLoRA** (arXiv 2410.18035). Every expert is an ordinary LoRA (``B_served = scaling·B``); the gate
  multiplies a token's buffer by its request's router weight ``w_i`` for that expert (0 if not selected).
  The routers (one per block) are kept here, in float32, and run on the prompt (:mod:`loramix.vllm.gates`).

Nothing here imports vLLM: the input is the adapter directory and the base model's ``transformers`` config;
the output is PEFT-LoRA-named tensors (which vLLM's own loader packs into its fused modules) and the gates,
keyed by the base model's module names.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PretrainedConfig

from .._saving import resolve_weights
from ..milora.functional import POOLERS

PEFT_PREFIX = "base_model.model."
METHODS = ("MOR", "MILORA")


class UnservableAdapter(ValueError):
    """A loramix adapter that vLLM cannot serve exactly; the message names what and why."""


@dataclass(frozen=True)
class MoRGate:
    """The gate of a MoR module: buffer columns ``[0, N·r)`` are the experts, ``[N·r, N·r + N)`` the router logits."""

    num_experts: int
    rank: int


@dataclass(frozen=True)
class ExpertGate:
    """The gate of a MiLoRA expert: column ``expert`` of the routing of block ``block``."""

    block: int
    expert: int


@dataclass
class BlockRouter:
    """The router of one MiLoRA block (paper Eq. 2-3): ``Top-k(softmax(g(Pooler(H)) W_r^T))``, all float32.

    ``experts`` are the block's expert modules in router-column order (the order loramix gives them: the base
    model's ``named_modules`` order).
    """

    weight: torch.Tensor  # (N, d)
    pooler: str
    activation: str
    top_k: int
    experts: tuple[str, ...]
    normalize_gates: bool = False  # MiLoRAConfig.normalize_gates
    query: torch.Tensor | None = None  # (d,), attention pooler
    numerator: torch.Tensor | None = None  # rational activation
    denominator: torch.Tensor | None = None


@dataclass
class ServedAdapter:
    """A converted adapter: ``tensors`` in PEFT LoRA naming, the ``rank`` vLLM must hold, the gates."""

    method: str  # "MOR" | "MILORA"
    rank: int
    tensors: dict[str, torch.Tensor]
    gates: dict[str, MoRGate | ExpertGate] = field(default_factory=dict)  # base-model module name -> gate
    routers: dict[int, BlockRouter] = field(default_factory=dict)  # block index -> router (MiLoRA)


def read_config(path: str) -> dict | None:
    """The adapter's ``adapter_config.json`` if it is a loramix adapter (MoR / MiLoRA), else None."""
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    return config if config.get("peft_type") in METHODS else None


def check_config(config: dict) -> None:
    """Refuse the settings the served form does not reproduce exactly (message names the setting)."""
    method = config["peft_type"]
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"`modules_to_save`={config['modules_to_save']} (vLLM LoRA serves no fully trained modules)")
    if method == "MOR" and config.get("bias", "none") != "none":
        problems.append(f"`bias`={config['bias']!r} (trained biases are not LoRA weights)")
    if method == "MILORA":
        if config.get("use_dora"):
            problems.append("`use_dora`=True (MiDoRA: vLLM does not serve DoRA)")
        if config.get("router_input", "normalized") != "normalized":
            problems.append(
                f"`router_input`={config['router_input']!r} (the served router reads the block's normalized input, "
                "the input of its attention projections)"
            )
        if config.get("router_anchor", "input_layernorm") != "input_layernorm":
            problems.append(f"`router_anchor`={config['router_anchor']!r} (only `input_layernorm` is served)")
        if config.get("pooler") not in POOLERS:
            problems.append(f"`pooler`={config.get('pooler')!r}")
    if problems:
        raise UnservableAdapter(
            f"This {method} adapter cannot be served by vLLM exactly: " + "; ".join(problems) + ". Serve it with "
            "transformers (PeftModel.generate) instead."
        )


@functools.lru_cache(maxsize=256)
def _checked_weights(path: str, weights_sha256: str | None, stamp: tuple) -> str | None:
    return resolve_weights(path, weights_sha256)


def check_weights(path: str, config: dict) -> None:
    """Raise if the weights in ``path`` do not belong to ``config`` (``weights_sha256``); hashed once per file
    version (size and modification time), so a server can check on every request."""
    stamps = tuple(
        (name, st.st_size, st.st_mtime_ns)
        for name in ("adapter_model.safetensors", "adapter_model.bin")
        if os.path.isfile(os.path.join(path, name)) and (st := os.stat(os.path.join(path, name)))
    )
    _checked_weights(path, config.get("weights_sha256"), stamps)


def load_tensors(path: str, config: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors, float32, after checking they belong to its config (``weights_sha256``)."""
    weights = resolve_weights(path, config.get("weights_sha256"))
    if weights is None:
        raise FileNotFoundError(f"{path} has no adapter_model.safetensors or adapter_model.bin")
    if weights.endswith(".safetensors"):
        tensors = load_file(weights)
    else:
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in tensors.items()}


def _by_module(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {parameter: tensor}}`` for the keys ``base_model.model.<module>.<prefix><parameter>``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    pattern = re.compile(rf"^{re.escape(PEFT_PREFIX)}(.+)\.{re.escape(prefix)}(\w+)$")
    for key, tensor in tensors.items():
        match = pattern.match(key)
        if match is None:
            raise UnservableAdapter(f"Unexpected tensor '{key}' in the adapter checkpoint; nothing was loaded.")
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    return modules


def _lora_keys(module: str) -> tuple[str, str]:
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def convert_mor(config: dict, tensors: dict[str, torch.Tensor]) -> ServedAdapter:
    """MoR as a rank-(N·r [+ N]) LoRA per module; see the module docstring."""
    scaling = config["lora_alpha"] / config["r"]
    out: dict[str, torch.Tensor] = {}
    gates: dict[str, MoRGate | ExpertGate] = {}
    rank = 0
    for module, p in _by_module(tensors, "mor_").items():
        missing = {"A", "B", "omega_A", "omega_B"} - set(p)
        if missing:
            raise UnservableAdapter(f"MoR module '{module}' lacks {sorted(missing)} in the checkpoint.")
        lora_A, lora_B, omega_A, omega_B = p["A"], p["B"], p["omega_A"], p["omega_B"]
        num_experts, r = omega_A.shape
        router = p.get("router")
        key_A, key_B = _lora_keys(module)
        if router is None or num_experts == 1:
            # G is constant (1/N for the mean router, 1 for a single expert), so the mixture is one rank-r LoRA:
            # ΔW = scaling · ((Σ_i G_i Ω_B[i] ⊗ Ω_A[i]) ⊙ B) A   (mor_delta_weight), computed in float64
            g = torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
            mix = torch.einsum("i,io,ik->ok", g, omega_B.double(), omega_A.double())
            out[key_A], out[key_B] = lora_A, (scaling * mix * lora_B.double()).float()
            rank = max(rank, r)
            continue
        stacked_A = (omega_A.unsqueeze(-1) * lora_A.unsqueeze(0)).reshape(num_experts * r, -1)  # row (i, k)
        # column (i, k) of the served B: scaling · Ω_B[i, o] · B[o, k]
        stacked_B = scaling * omega_B.unsqueeze(1) * lora_B.t().unsqueeze(0)  # (N, r, d_out)
        out[key_A] = torch.cat([stacked_A, router], dim=0)  # (N·r + N, d_in)
        out[key_B] = torch.cat(
            [stacked_B.reshape(num_experts * r, -1).t(), lora_B.new_zeros(lora_B.shape[0], num_experts)], dim=1
        )
        gates[module] = MoRGate(num_experts, r)
        rank = max(rank, num_experts * r + num_experts)
    return ServedAdapter("MOR", rank, out, gates)


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


def convert_milora(config: dict, tensors: dict[str, torch.Tensor], hf_config: PretrainedConfig) -> ServedAdapter:
    """MiLoRA experts as plain LoRAs gated per request, and the block routers; see the module docstring."""
    scaling = config["lora_alpha"] / config["r"]
    params = _by_module(tensors, "milora_")
    anchor = config.get("router_anchor", "input_layernorm")
    router_blocks = {m[: -len(anchor) - 1]: p for m, p in params.items() if m.endswith("." + anchor)}
    expert_params = {m: p for m, p in params.items() if not m.endswith("." + anchor)}
    out: dict[str, torch.Tensor] = {}
    for module, p in expert_params.items():
        if set(p) != {"A", "B"}:
            raise UnservableAdapter(f"MiLoRA expert '{module}' has parameters {sorted(p)}, expected A and B.")
        key_A, key_B = _lora_keys(module)
        out[key_A], out[key_B] = p["A"], scaling * p["B"]
    gates: dict[str, MoRGate | ExpertGate] = {}
    routers: dict[int, BlockRouter] = {}
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
            weight=p["router"],
            pooler=config["pooler"],
            activation=config["activation"],
            top_k=config["top_k"],
            experts=members,
            normalize_gates=bool(config.get("normalize_gates", False)),
            query=p.get("pool_query"),
            numerator=p.get("rational_num"),
            denominator=p.get("rational_den"),
        )
        for column, member in enumerate(members):
            gates[member] = ExpertGate(int(index), column)
    orphans = sorted(set(expert_params) - set(gates))
    if orphans:
        raise UnservableAdapter(f"MiLoRA experts without a router in their block: {orphans[:5]}.")
    return ServedAdapter("MILORA", config["r"], out, gates, routers)


def convert(path: str, hf_config: PretrainedConfig) -> ServedAdapter | None:
    """The served form of the loramix adapter saved in ``path``, or None if ``path`` holds no loramix adapter."""
    config = read_config(path)
    if config is None:
        return None
    check_config(config)
    tensors = load_tensors(path, config)
    if config["peft_type"] == "MOR":
        return convert_mor(config, tensors)
    return convert_milora(config, tensors, hf_config)
