"""MoR tuner: injects :class:`~loramix.mor.layer.Linear` into a model and adds the balance loss."""

from __future__ import annotations

import functools
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .._outputs import with_aux_loss
from .._tuner import LoramixTunerMixin
from ..balance import switch_balance_loss
from ..constants import TRANSFORMERS_MODELS_TO_FFN_TARGET_MODULES
from ._checkpointing import AuxGradState, GradProbe, PendingAux
from .config import MoRConfig
from .layer import Linear, MoRLayer


class MoRModel(LoramixTunerMixin, BaseTuner):
    """Creates a MoR (Mixture of Ranks) model from a transformers model (Tang et al., arXiv 2410.13408).

    Use it through PEFT: ``get_peft_model(model, MoRConfig(...))``. When the active adapter has
    ``router_aux_loss_coef > 0``, every forward returns ``aux_loss`` (the Switch balance loss
    averaged over the adapted layers) and, when ``labels`` are given, adds
    ``router_aux_loss_coef * aux_loss`` to ``loss`` — transformers' MoE convention.
    """

    prefix: str = "mor_"
    tuner_layer_cls = MoRLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_FFN_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: MoRConfig, model_config: dict) -> MoRConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                linear_names = sorted(
                    {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
                )
                raise ValueError(
                    f"MoRConfig.target_modules is not set and loramix has no default feed-forward modules for "
                    f"model_type={model_type!r}. Set `target_modules` to the feed-forward nn.Linear names of this model; "
                    f"its linear layers are named: {linear_names}."
                )
            peft_config.target_modules = set(self.target_module_mapping[model_type])
        return peft_config

    def _create_and_replace(
        self,
        peft_config: MoRConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if isinstance(target, MoRLayer):
            target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"MoR can only adapt torch.nn.Linear layers, but target module '{current_key}' is a "
                f"{type(base).__name__}. Remove it from `target_modules`."
            )
        new_module = Linear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        routed = [name for name in self.active_adapters if not self.peft_config[name].is_input_independent]
        if routed:
            raise ValueError(
                f"Cannot merge MoR adapter(s) {routed}: a learnable per-token router makes the update depend on "
                "each input, so no fixed weight reproduces it. Only num_experts=1 or router='mean' merge exactly. "
                "Use `unload()` to get the base model back, or keep the adapter unmerged."
            )

    def _mor_layers(self) -> list[MoRLayer]:
        return [m for m in self.model.modules() if isinstance(m, MoRLayer)]

    @staticmethod
    def _balance_loss(layers: list[MoRLayer], name: str) -> torch.Tensor | None:
        """Mean Switch loss of adapter ``name`` over the layers that recorded router statistics.

        Layers whose probabilities came without a graph although grad is on (the no-grad first pass of
        reentrant activation checkpointing) get their gradient when the backward pass recomputes them;
        see :mod:`loramix.mor._checkpointing`.
        """
        recorded = [(layer, *layer._router_stats[name]) for layer in layers if name in layer._router_stats]
        if not recorded:
            return None
        loss = torch.stack([switch_balance_loss(probs, mask) for _, probs, mask in recorded]).mean()
        deferred = [
            (layer, probs, mask)
            for layer, probs, mask in recorded
            if torch.is_grad_enabled() and not probs.requires_grad and layer.mor_router[name].requires_grad
        ]
        if deferred:
            state = AuxGradState()
            loss = GradProbe.apply(loss, loss.new_zeros((), requires_grad=True), state)
            for layer, probs, mask in deferred:
                term_fn = functools.partial(switch_balance_loss, mask=mask)
                layer._pending_aux[name] = PendingAux(state, 1.0 / len(recorded), term_fn, probs.shape)
        return loss

    def forward(self, *args: Any, **kwargs: Any):
        """The model's forward; with ``router_aux_loss_coef > 0`` it also returns ``aux_loss`` (Switch
        balance loss, mean over layers) and adds ``router_aux_loss_coef * aux_loss`` to ``loss``."""
        coefs = {
            name: self.peft_config[name].router_aux_loss_coef
            for name in self.active_adapters
            if name in self.peft_config and self.peft_config[name].router_aux_loss_coef > 0
        }
        if not coefs:
            return self.model(*args, **kwargs)
        layers = self._mor_layers()
        mask = kwargs.get("attention_mask")
        for layer in layers:
            layer._record_router_stats, layer._token_mask = True, mask
        try:
            outputs = self.model(*args, **kwargs)
            per_adapter = {name: self._balance_loss(layers, name) for name in coefs}
        finally:
            for layer in layers:
                layer._record_router_stats, layer._token_mask = False, None
                layer._router_stats.clear()
        losses = {name: loss for name, loss in per_adapter.items() if loss is not None}
        if not losses:
            return outputs
        aux_loss = torch.stack(list(losses.values())).mean()
        outputs = with_aux_loss(outputs, aux_loss)  # a real field: DDP and torch.compile rebuild outputs
        if kwargs.get("labels") is not None and outputs.get("loss") is not None:
            outputs["loss"] = outputs["loss"] + sum(coefs[name] * loss for name, loss in losses.items())
        return outputs
