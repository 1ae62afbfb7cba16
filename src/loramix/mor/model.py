"""MoR tuner: injects :class:`~loramix.mor.layer.Linear` into a model and adds the balance loss."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner

from loramix._tuner.tuner import LoramixTunerMixin
from loramix.constants import TRANSFORMERS_MODELS_TO_FFN_TARGET_MODULES
from loramix.mor.layer import Linear, MoRLayer, routed_merge_error


class MoRModel(LoramixTunerMixin, BaseTuner):
    """Creates a MoR (Mixture of Ranks) model from a transformers model (Tang et al., arXiv 2410.13408).

    Use it through PEFT: ``get_peft_model(model, MoRConfig(...))``. When an active adapter has
    ``router_aux_loss_coef > 0``, every forward returns ``aux_loss`` (the Switch balance loss
    averaged over the adapted layers) and, when ``labels`` are given, adds
    ``router_aux_loss_coef * aux_loss`` to ``loss`` (``lm_loss`` keeps the loss without it); the layers
    record their router probabilities into the forward's :class:`~loramix.routing.session.RoutingSession`, read
    by the hooks of the mixin. Merging is refused, before any weight changes, if any adapter it would
    merge has a learnable router, or a layer it adapts has a quantized base weight.
    """

    prefix: str = "mor_"
    tuner_layer_cls = MoRLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_FFN_TARGET_MODULES
    linear_cls = Linear

    def _refuse_merge(self, adapter_names: list[str]) -> None:
        """Checked for every adapter and layer before any weight changes (a partial merge is never left)."""
        routed = [name for name in adapter_names if not self.peft_config[name].is_input_independent]
        if routed:
            raise ValueError(routed_merge_error(routed))
        for module in self.model.modules():
            if isinstance(module, MoRLayer):
                refusal = module.merge_refusal(adapter_names)
                if refusal:
                    raise ValueError(refusal)
