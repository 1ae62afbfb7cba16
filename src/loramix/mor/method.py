"""MoR's declaration to the shared code (see :mod:`loramix.method`)."""

from __future__ import annotations

from loramix.method import Method, RouterView
from loramix.mor.config import MoRConfig
from loramix.mor.model import MoRModel

METHOD = Method(
    name="mor",
    display_name="MoR",
    config_cls=MoRConfig,
    model_cls=MoRModel,
    router_params=("mor_router",),
    scale_params=("mor_omega_A", "mor_omega_B"),
    router_view=RouterView(
        param="mor_router",  # a layer per adapted linear, routing every token
        unit="token",
        experts=lambda layer, adapter, config: [f"E{i + 1}" for i in range(config.num_experts)],
        top_k=lambda config: 1,  # a soft router: usage counts each token's most probable expert
        absent="learnable MoR router (router='mean' does not route)",
    ),
    served_form="loramix.mor.served",
)
