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
