"""MiLoRA's declaration to the shared code (see :mod:`loramix.method`)."""

from __future__ import annotations

from loramix.method import Method, RouterView
from loramix.milora.config import MiLoRAConfig
from loramix.milora.model import MiLoRAModel

METHOD = Method(
    name="milora",
    display_name="MiLoRA",
    config_cls=MiLoRAConfig,
    model_cls=MiLoRAModel,
    router_params=("milora_router", "milora_pool_query", "milora_rational_num", "milora_rational_den"),
    router_view=RouterView(
        param="milora_router",  # one router per block, wrapping the block's anchor module
        unit="prompt",
        experts=lambda layer, adapter, config: [str(name) for name in layer.expert_names[adapter]],
        top_k=lambda config: config.top_k,
        layer_name=lambda name: name.rsplit(".", 1)[0],  # the block, without the anchor module's name
        per_module=False,
        expert_label="LoRA module",
        absent="MiLoRA router",
    ),
    served_form="loramix.milora.served",
)
