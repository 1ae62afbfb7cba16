"""What a loramix method tells the shared code about itself: one :class:`Method` object per method.

Each method package (``loramix/mor``, ``loramix/milora``) declares its ``METHOD`` in ``method.py``, and
``loramix/__init__.py`` registers it with one line. The shared modules never test for a method by name:
they look the method of an adapter up here (:func:`method_of`) or loop over :func:`registered_methods`.

* PEFT registration (:mod:`loramix._compat.peft`): ``name``, ``config_cls``, ``model_cls``;
* optimizer groups (:mod:`loramix.optim`): ``router_params`` and ``scale_params``, the ``ParameterDict``
  attributes of the method's layers that hold routers and multiplicative scaling vectors;
* router statistics (:mod:`loramix.analysis`): :class:`RouterView`, what a router's records mean;
* serving (:mod:`loramix.vllm`): ``served_form``, the module that converts a saved adapter into the form
  vLLM's LoRA kernels serve, imported only by the vLLM plugin.

A third method is a new package with its ``METHOD`` and one ``register`` line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "Method",
    "RouterView",
    "holds_loramix",
    "is_loramix_state_dict",
    "method_of",
    "register_method",
    "registered_methods",
    "weight_markers",
]


@dataclass(frozen=True)
class RouterView:
    """How :mod:`loramix.analysis` reads one method's router records.

    Args:
        param: the ``ParameterDict`` attribute of the layers that hold a router (a layer with an entry for the
            adapter is a routing layer).
        unit: what one routed row is: ``"token"`` (a per-token router) or ``"prompt"`` (one routing per prompt).
        experts: ``experts(layer, adapter, config)`` -> the expert names of a routing layer, in router-column order.
        top_k: ``top_k(config)`` -> how many experts a row selects (1 for a soft router).
        layer_name: the name statistics give a routing layer, from its module name (default: unchanged).
        per_module: whether every adapted module has its own router (plots then keep one module kind per block
            for deep models); ``False``: one router per block.
        expert_label: what plots call an expert (``"expert"``, ``"LoRA module"``).
        absent: what the error says is missing when the adapter has no routing layer.
    """

    param: str
    unit: str
    experts: Callable[[nn.Module, str, Any], list[str]]
    top_k: Callable[[Any], int]
    layer_name: Callable[[str], str] = field(default=lambda name: name)
    per_module: bool = True
    expert_label: str = "expert"
    absent: str = "learnable router"


@dataclass(frozen=True)
class Method:
    """Everything the shared code needs to know about one loramix method.

    Args:
        name: PEFT's name of the method, lower case (``"mor"``); its ``PeftType`` member is ``name.upper()``.
        display_name: the name people use (``"MoR"``), for messages and plots.
        config_cls: the method's ``LoramixConfig`` subclass.
        model_cls: the method's tuner (``BaseTuner`` subclass); its ``prefix`` marks the adapter's parameters.
        router_params: the ``ParameterDict`` attributes of its layers that hold router parameters (optimizer group
            ``"router"``: own learning rate, no weight decay).
        scale_params: those that hold multiplicative scaling vectors initialised near 1 (optimizer group
            ``"omega"``: weight decay would pull them towards 0).
        router_view: how its router records are read by :mod:`loramix.analysis`.
        served_form: the module (dotted path, imported by the vLLM plugin only; pure PyTorch) with the method's
            vLLM served form (:mod:`loramix.vllm.convert`): ``check_config(config) -> list[str]`` (the settings of
            ``adapter_config.json`` that cannot be served exactly), ``served_rank(config) -> (rank, what it is made
            of)``, ``ROUTES_ON_PROMPT`` (its gates are computed once from the whole prompt, which the engine must
            then prefill in one step) and ``convert(config, tensors, hf_config) -> ServedAdapter`` (LoRA tensors,
            one :class:`~loramix.vllm.gates.TokenGate` or :class:`~loramix.vllm.gates.PromptGate` per gated module,
            and the prompt routers). ``None``: not servable with vLLM.
    """

    name: str
    display_name: str
    config_cls: type
    model_cls: type
    router_params: tuple[str, ...] = ()
    scale_params: tuple[str, ...] = ()
    router_view: RouterView | None = None
    served_form: str | None = None

    @property
    def peft_type(self) -> str:
        """The value of the method's ``PeftType`` member (``"MOR"``), as written in ``adapter_config.json``."""
        return self.name.upper()

    @property
    def prefix(self) -> str:
        """The prefix of the adapter's parameter names (``"mor_"``)."""
        return self.model_cls.prefix


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    """Record ``method`` (by its ``peft_type``); registering the same name again replaces it (a reload)."""
    if method.config_cls.PEFT_TYPE_NAME != method.peft_type:
        raise ValueError(
            f"{method.config_cls.__name__}.PEFT_TYPE_NAME is {method.config_cls.PEFT_TYPE_NAME!r}, "
            f"not {method.peft_type!r}."
        )
    _METHODS[method.peft_type] = method


def registered_methods() -> Iterator[Method]:
    """The registered methods, in registration order."""
    return iter(list(_METHODS.values()))


def method_of(peft_type: Any) -> Method | None:
    """The method of a ``PeftType`` member, its value (``"MOR"``) or a config; ``None`` if it is not loramix's."""
    peft_type = getattr(peft_type, "peft_type", peft_type)
    return _METHODS.get(str(getattr(peft_type, "value", peft_type)).upper())


def holds_loramix(model: Any) -> bool:
    """Whether ``model`` (an ``nn.Module``) holds a layer of a registered method."""
    classes = tuple(method.model_cls.tuner_layer_cls for method in registered_methods())
    return isinstance(model, nn.Module) and any(isinstance(m, classes) for m in model.modules())


def weight_markers() -> set[str]:
    """``.<prefix>`` of every registered method: a state-dict key containing one belongs to a loramix adapter."""
    return {"." + method.prefix for method in registered_methods()}


def is_loramix_state_dict(tensors: Any) -> bool:
    """Whether a state dict (its keys) holds a tensor of a registered method's adapter."""
    markers = weight_markers()
    return any(marker in key for key in tensors for marker in markers)
