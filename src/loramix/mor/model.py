"""MoR tuner: injects :class:`~loramix.mor.layer.Linear` into a model and adds the balance loss."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .._tuner import LoramixTunerMixin
from ..constants import TRANSFORMERS_MODELS_TO_FFN_TARGET_MODULES
from .config import MoRConfig
from .layer import Linear, MoRLayer


class MoRModel(LoramixTunerMixin, BaseTuner):
    """Creates a MoR (Mixture of Ranks) model from a transformers model (Tang et al., arXiv 2410.13408).

    Use it through PEFT: ``get_peft_model(model, MoRConfig(...))``. When an active adapter has
    ``router_aux_loss_coef > 0``, every forward returns ``aux_loss`` (the Switch balance loss
    averaged over the adapted layers) and, when ``labels`` are given, adds
    ``router_aux_loss_coef * aux_loss`` to ``loss`` (``lm_loss`` keeps the loss without it); the layers
    record their router probabilities into the forward's :class:`~loramix.routing.RoutingSession`, read
    by the hooks of the mixin. Merging is refused, before any weight changes, if any adapter it would
    merge has a learnable router, or a layer it adapts has a quantized base weight.
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

    def _refuse_merge(self, adapter_names: list[str]) -> None:
        """Checked for every adapter and layer before any weight changes (a partial merge is never left)."""
        routed = [name for name in adapter_names if not self.peft_config[name].is_input_independent]
        if routed:
            raise ValueError(
                f"Cannot merge MoR adapter(s) {routed}: a learnable per-token router makes the update depend on "
                "each input, so no fixed weight reproduces it. Only num_experts=1 or router='mean' merge exactly. "
                "Use `unload()` to get the base model back, or keep the adapter unmerged. Nothing was merged."
            )
        for module in self.model.modules():
            if isinstance(module, MoRLayer):
                refusal = module.merge_refusal(adapter_names)
                if refusal:
                    raise ValueError(refusal)
