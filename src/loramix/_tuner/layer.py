"""The per-adapter state every loramix tuner layer starts with, as PEFT's layers hold it."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def init_adapter_state(layer: BaseTunerLayer, base_layer: nn.Module, modules: tuple[str, ...] = ()) -> None:
    """Give ``layer`` its ``base_layer`` and empty per-adapter containers, no adapter merged or disabled.

    Each name of ``layer.adapter_layer_names`` becomes an ``nn.ParameterDict`` (an ``nn.ModuleDict`` if it is in
    ``modules``), each of ``other_param_names`` a plain dict (or an ``nn.ModuleDict`` if in ``modules``): PEFT's
    ``set_adapter``, ``delete_adapter`` and device moves walk exactly these. The containers' types are declared
    as annotations in the layer's class.
    """
    layer.base_layer = base_layer
    for name in layer.adapter_layer_names:
        setattr(layer, name, nn.ModuleDict() if name in modules else nn.ParameterDict())
    for name in layer.other_param_names:
        setattr(layer, name, nn.ModuleDict() if name in modules else {})
    layer._disable_adapters = False
    layer.merged_adapters = []


class ScaledRouter:
    """Mixin for a layer whose router weight is a fixed multiple of its parameter: ``W_r = k · P``, with ``k`` the
    adapter's ``router_lr_ratio``.

    The layer computes with ``W_r`` (:meth:`router_weight`) and trains, saves and loads ``P`` like any other
    parameter. Adam-type optimizers (``Trainer``'s default AdamW) move every parameter by about the learning rate per
    step whatever its gradient's scale, so ``W_r`` moves ``k`` times faster than the other parameters, with one
    learning rate for all (plain SGD: ``k²``). The initialisation draws ``P`` as ``W_r``'s distribution divided by
    ``k``, so a fresh adapter does not depend on ``k``. Like ``lora_alpha``, ``k`` is part of the adapter: saved in
    ``adapter_config.json`` and applied by whatever loads the file (PEFT, transformers' ``load_adapter``, a
    DeepSpeed or FSDP checkpoint: no loader needs to know about it; the vLLM conversion multiplies ``P`` by ``k``).
    The layer sets ``router_container`` (the name of its ``ParameterDict`` of routers) and keeps ``router_lr_ratio``
    per adapter.
    """

    router_container: str
    router_lr_ratio: dict[str, float]

    def router_weight(self, adapter_name: str):
        """``W_r = router_lr_ratio · P``: the router weight the layer computes with."""
        return getattr(self, self.router_container)[adapter_name] * self.router_lr_ratio[adapter_name]
