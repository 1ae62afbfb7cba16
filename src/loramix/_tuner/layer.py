"""The per-adapter state every loramix tuner layer starts with, as PEFT's layers hold it."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from loramix._compat.torch import register_state_dict_hooks


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
    """Mixin for a layer whose router weight is stored divided by its adapter's ``router_lr_ratio`` ``k``.

    The layer computes with ``W_r = k · P`` (:meth:`router_weight`) and trains ``P``. Adam-type optimizers
    (``Trainer``'s default AdamW) move every parameter by about the learning rate per step whatever its gradient's
    scale, so ``W_r`` moves ``k`` times faster than the other parameters, with one learning rate for all (plain SGD:
    ``k²``). ``state_dict()`` and so every saved file hold ``W_r`` itself, and loading divides by the loading
    config's ``k``: the saved format does not depend on ``k`` (an adapter saved with any ratio, or by loramix 0.1,
    loads and computes the same). The layer sets ``router_container`` (the name of its ``ParameterDict`` of routers)
    and keeps ``router_lr_ratio`` per adapter; :meth:`init_router_scaling` registers the hooks once.
    """

    router_container: str
    router_lr_ratio: dict[str, float]

    def init_router_scaling(self) -> None:
        register_state_dict_hooks(self, _save_scaled_routers, _load_scaled_routers)

    def router_weight(self, adapter_name: str):
        """``W_r = router_lr_ratio · P``: the router weight the layer computes with."""
        return getattr(self, self.router_container)[adapter_name] * self.router_lr_ratio[adapter_name]


def _router_keys(module: ScaledRouter, state_dict, prefix: str):
    """``(key, ratio)`` for each of ``module``'s routers present in ``state_dict`` with a ratio other than 1."""
    for name, ratio in module.router_lr_ratio.items():
        key = f"{prefix}{module.router_container}.{name}"
        if ratio != 1.0 and key in state_dict:
            yield key, ratio


def _save_scaled_routers(module, state_dict, prefix, local_metadata) -> None:
    for key, ratio in _router_keys(module, state_dict, prefix):
        state_dict[key] = state_dict[key] * ratio  # a new tensor: the parameter itself is left alone


def _load_scaled_routers(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    for key, ratio in _router_keys(module, state_dict, prefix):
        state_dict[key] = state_dict[key] / ratio
