"""Shared helpers for the MiLoRA tests: tiny LLaMA models with a MiLoRA adapter."""

from __future__ import annotations

import inspect
import weakref

import torch
from peft import get_peft_model
from transformers import LlamaForCausalLM

from loramix import MiLoRAConfig
from loramix.milora.layer import Linear, MiLoRARouter
from loramix.routing.session import subscribe
from tests.tiny_models import tiny_llama

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache`
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def wide_llama(seed: int = 0):
    """A tiny LLaMA whose hidden states are O(1) (initializer 0.3): router logits are well separated,
    so routing decisions do not hinge on float rounding."""
    return tiny_llama(seed, initializer_range=0.3)


def milora_model(seed: int = 0, base=None, adapter_name: str = "default", **config):
    """A tiny LLaMA with a random (``init_weights=False``) MiLoRA adapter: r=4, top_k=2, no dropout."""
    config = {"r": 4, "top_k": 2, "lora_dropout": 0.0, "init_weights": False, **config}
    base = wide_llama(seed) if base is None else base
    return watch(get_peft_model(base, MiLoRAConfig(task_type="CAUSAL_LM", **config), adapter_name=adapter_name))


_LATEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def watch(model):
    """Keep the latest routing record of every router of ``model`` (a ``loramix.routing.session`` subscription)."""
    names = {module: name for name, module in model.named_modules()}
    latest: dict[tuple[str, str], object] = {}

    def keep(records, outputs) -> None:
        for record in records:
            latest[(names.get(record.layer) or record.layer, record.adapter)] = record

    subscribe(model, keep)
    _LATEST[model] = latest
    return model


def latest(model, name: str, adapter_name: str = "default"):
    """The record of the latest forward that routed, for router ``name`` (see :func:`watch`)."""
    return _LATEST[model][(name, adapter_name)]


def routers(model) -> dict[str, MiLoRARouter]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MiLoRARouter)}


def router_params(router: MiLoRARouter, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The router's tensors of one adapter (pool query, router weight, rational coefficients), detached."""
    return {
        attr: getattr(router, attr)[adapter_name].detach()
        for attr in router.adapter_layer_names
        if adapter_name in getattr(router, attr)
    }


def experts(model) -> dict[str, Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def selections(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The latest (batch, N) expert selection of every block."""
    return {name: latest(model, name, adapter_name).selected.clone() for name in routers(model)}


def probabilities(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return {name: latest(model, name, adapter_name).probs.detach().clone() for name in routers(model)}


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def random_tokens(shape, seed: int = 0) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.randint(1, 128, shape, generator=torch.Generator().manual_seed(seed))


def left_pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D token tensors with 0 into (input_ids, attention_mask)."""
    length = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, length - len(s) :], mask[i, length - len(s) :] = s, 1
    return ids, mask


def right_pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask
