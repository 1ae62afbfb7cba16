"""MiLoRA tuner: LoRA experts on a block's projections plus one prompt-aware router per block.

Zhang et al., "MiLoRA: Efficient Mixture of Low-Rank Adaptation for Large Language Models
Fine-tuning", arXiv 2410.18035 (EMNLP Findings 2024) — not the "minor singular components" MiLoRA
of arXiv 2406.09044.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    check_target_module_exists,
)
from peft.utils.integrations import init_empty_weights
from torch import nn

from loramix._compat.peft import resolve_all_linear
from loramix._tuner.tuner import LoramixTunerMixin
from loramix.constants import TRANSFORMERS_MODELS_TO_BLOCK_TARGET_MODULES, TRANSFORMERS_MODELS_TO_MILORA_ROUTER_ANCHOR
from loramix.milora.config import MiLoRAConfig
from loramix.milora.layer import MERGE_ERROR, Linear, MiLoRARouter, MiLoRATunerLayer


def _block_of(model: nn.Module, key: str, anchor: str) -> str | None:
    """The name of the innermost ancestor of module ``key`` that has a child named ``anchor``."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:depth])
        if anchor in model.get_submodule(name)._modules:
            return name
    return None


class MiLoRAModel(LoramixTunerMixin, BaseTuner):
    """Creates a MiLoRA model from a transformers model (Zhang et al., arXiv 2410.18035).

    Use it through PEFT: ``get_peft_model(model, MiLoRAConfig(...))``. Every targeted linear layer
    becomes a LoRA expert (:class:`~loramix.milora.layer.Linear`); the module named ``router_anchor``
    of each block that holds experts (LLaMA: ``input_layernorm``) is wrapped by the block's router
    (:class:`~loramix.milora.layer.MiLoRARouter`). Each forward's :class:`~loramix.routing.session.RoutingSession`
    decides when to route and on which tokens:

    * a forward that does not continue a KV cache routes on its input: the tokens of ``prompt_mask``
      if given, else the attended tokens labelled -100 if ``labels`` are given, else all attended
      tokens — padding never enters a pool;
    * the later forwards of one ``generate`` call, and a forward that continues a KV cache returned
      by a routed forward, reuse that routing; the routers are not called; any other continued cache
      raises;
    * ``outputs.router_logits`` (one (B, N) tensor per block) is set whenever routing ran, and
      ``outputs.aux_loss`` (Switch loss, mean over blocks) too when ``router_aux_loss_coef > 0``;
      ``router_aux_loss_coef · aux_loss`` is added to ``outputs.loss`` when labels are given (``outputs.lm_loss``
      keeps the loss without it).

    ``merge_adapter()`` and ``merge_and_unload()`` raise before anything changes (a per-prompt router cannot be
    merged); ``unload()`` works.
    """

    prefix: str = "milora_"
    tuner_layer_cls = MiLoRATunerLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_BLOCK_TARGET_MODULES
    linear_cls = Linear

    # ------------------------------------------------------------------------------------------------------------
    # injection
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config: MiLoRAConfig, model_config: dict) -> MiLoRAConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        model_type = model_config.get("model_type")
        if peft_config.router_anchor is None:
            if model_type not in TRANSFORMERS_MODELS_TO_MILORA_ROUTER_ANCHOR:
                raise ValueError(
                    f"MiLoRAConfig.router_anchor is not set and loramix knows no router position for "
                    f"model_type={model_type!r}. Set `router_anchor` to the name of the module of every block whose "
                    "input is the block's input hidden states and that runs before the block's projections (LLaMA: "
                    "'input_layernorm'). Post-norm architectures have none and are not supported."
                )
            peft_config.router_anchor = TRANSFORMERS_MODELS_TO_MILORA_ROUTER_ANCHOR[model_type]
        return peft_config

    def _prepare_model(self, peft_config: MiLoRAConfig, model: nn.Module) -> None:
        """Check, before anything is replaced, that every block can be routed (errors name the field)."""
        resolve_all_linear(peft_config, model)
        inside = [key + "." for key, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
        targets = [
            key
            for key, _ in model.named_modules()
            if key and not any(key.startswith(p) for p in inside) and check_target_module_exists(peft_config, key)
        ]
        if targets:
            self._group_by_block(model, targets, peft_config, check=True)

    def _group_by_block(self, model, keys, config: MiLoRAConfig, check: bool = False) -> OrderedDict:
        anchor = config.router_anchor
        blocks: OrderedDict[str, list[str]] = OrderedDict()
        for key in keys:
            block = _block_of(model, key, anchor)
            if block is None:
                raise ValueError(
                    f"`target_modules` matches '{key}', which is not inside a transformer block (no enclosing module "
                    f"has a child named `router_anchor`={anchor!r}). MiLoRA experts must be projections of a block."
                )
            anchor_key = f"{block}.{anchor}" if block else anchor
            if key == anchor_key or key.startswith(anchor_key + "."):
                raise ValueError(
                    f"`target_modules` matches '{key}', which is (inside) the router anchor `router_anchor`={anchor!r}."
                )
            blocks.setdefault(block, []).append(key)
        if check:
            for block, members in blocks.items():
                if config.top_k > len(members):
                    raise ValueError(
                        f"`top_k`={config.top_k} is larger than the number of experts ({len(members)}) in block "
                        f"'{block}': {[m[len(block) + 1 :] for m in members]}. Lower top_k or target more modules."
                    )
            if config.layers_to_transform is not None:
                wanted = config.layers_to_transform
                wanted = [wanted] if isinstance(wanted, int) else wanted
                found = {int(b.rsplit(".", 1)[-1]) for b in blocks if b.rsplit(".", 1)[-1].isdigit()}
                missing = sorted(set(wanted) - found)
                if missing:
                    raise ValueError(
                        f"`layers_to_transform` lists layer(s) {missing} that have no targeted module (blocks with "
                        f"experts: {sorted(found)}); a MiLoRA router needs at least `top_k` experts in its block."
                    )
        return blocks

    def _skip_target(self, target: nn.Module, target_name: str, peft_config: MiLoRAConfig) -> bool:
        # a router key in a loaded state dict: routers are attached in inject_adapter
        return isinstance(target, MiLoRARouter) or target_name == peft_config.router_anchor

    def _finish_injection(self, model: nn.Module, adapter_name: str, low_cpu_mem_usage: bool = False) -> None:
        with init_empty_weights() if low_cpu_mem_usage else nullcontext():
            self._attach_routers(model, adapter_name)

    def _attach_routers(self, model: nn.Module, adapter_name: str) -> None:
        """Wrap the anchor of every block holding experts of ``adapter_name`` with the block's router."""
        config = self.peft_config[adapter_name]
        experts = {
            key: module
            for key, module in model.named_modules()
            if isinstance(module, Linear) and adapter_name in module.milora_A
        }
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
        for block, keys in self._group_by_block(model, list(experts), config).items():
            block_module = model.get_submodule(block)
            anchor = block_module._modules[config.router_anchor]
            names = [key[len(block) + 1 :] if block else key for key in keys]
            if not isinstance(anchor, MiLoRARouter):
                weight = getattr(anchor, "weight", None)
                size = weight.shape[-1] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else hidden_size
                if size is None:
                    raise ValueError(f"MiLoRA cannot tell the hidden size of block '{block}' for its router.")
                router = MiLoRARouter(anchor, size)
                # the router takes the anchor's place in the block, as PEFT's layers take their base layer's
                setattr(block_module, config.router_anchor, router)
                anchor = router
            anchor.update_layer(adapter_name, config, names, self.active_adapters, config.inference_mode)
            if anchor.milora_router[adapter_name].device.type != "meta":
                device = experts[keys[0]].milora_A[adapter_name].device
                for attr in anchor.adapter_layer_names:
                    if adapter_name in getattr(anchor, attr):
                        container = getattr(anchor, attr)
                        container[adapter_name] = container[adapter_name].to(device)
            for index, key in enumerate(keys):
                experts[key].expert_index[adapter_name] = index  # its column in the router's choice
                experts[key].block_router[adapter_name] = anchor

    # ------------------------------------------------------------------------------------------------------------
    # merging, unloading, generation
    # ------------------------------------------------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_ERROR)

    def _refuse_merge(self, adapter_names: list[str]) -> None:
        raise ValueError(MERGE_ERROR)
