"""Where loramix meets vLLM's internals: the one module that touches them (vLLM has no public LoRA extension API).

Tested with the vLLM versions in :data:`SUPPORTED_VLLM` (:func:`loramix.vllm.register` refuses others). What it
wraps, each wrapper calling the original:

* ``WorkerLoRAManager._load_adapter``: a loramix adapter directory is converted
  (:func:`loramix.vllm.convert.convert`) into PEFT-named LoRA tensors that vLLM's own loader packs into its
  fused modules (``qkv_proj``, ``gate_up_proj``); its gates are kept here, by LoRA id. Other adapters load as
  before. What :mod:`loramix.vllm.refusals` and the converter refuse is refused here, in the worker, and
  earlier, at request intake (``InputProcessor._validate_lora``: settings, rank, weights' SHA-256), with the
  same message. ``LoRAModelRunnerMixin.load_lora_model`` records the engine settings those checks need.
* ``LoRAModelManager._create_lora_modules``: records each linear LoRA layer's module name and, for fused
  layers, the names of its slices.
* ``PunicaWrapper*.update_metadata``: records which LoRA id sits in which slot for this batch.
* ``LoRAModelRunnerMixin.set_active_loras`` / ``_set_active_loras``: record the step's requests (ids, token
  counts, computed tokens, prompt lengths, adapters) from the model runner's input batch, where vLLM keeps
  them; dummy (warm-up) activations clear it. ``GPUModelRunner._update_states`` frees the MiLoRA routing of
  finished requests.
* ``apply`` of every linear LoRA layer class: before the layer runs, computes its gates for this step
  (MiLoRA's routers run at the block's ``qkv_proj``, whose input is the block's normalized hidden state);
  ``add_expand`` of the Punica wrappers applies them to the rank buffer that ``add_shrink`` filled.

Data flows one way: the runner hooks open the step, a layer's ``apply`` opens its gates, ``add_expand`` reads
them. Nothing is stored on vLLM's objects.
"""

from __future__ import annotations

import functools
import importlib
import re
import weakref
from dataclasses import dataclass, field

import torch

from .convert import (
    ExpertGate,
    MoRGate,
    ServedAdapter,
    UnservableAdapter,
    check_config,
    check_weights,
    convert,
    read_config,
)
from .gates import LayerGates, Routes, StepLayout, expert_factors, route
from .refusals import EngineSettings, check_engine, check_rank

SUPPORTED_VLLM = ("0.32.0",)

_ROUTER_SITE = re.compile(r"\.(\d+)\.self_attn\.qkv_proj$")


@dataclass(frozen=True)
class LayerInfo:
    """A linear LoRA layer: its module name, its slices' module names, the block it routes (qkv_proj).

    ``slices`` is empty for a fused layer whose slices vLLM does not name (no packed-modules entry of that
    length): such a layer gets no gates, and an adapter that targets it is refused at load.
    """

    name: str
    slices: tuple[str, ...]
    router_block: int | None


@dataclass
class Served:
    """The plugin's state in one vLLM process."""

    adapters: dict[int, ServedAdapter] = field(default_factory=dict)
    layers: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    # per Punica wrapper (vLLM keeps one per model part: language model, vision tower, connector):
    # (LoRA id of each slot, LoRA ids of this batch's tokens with 0 for no adapter)
    mappings: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    layout: StepLayout | None = None
    block_weights: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # block -> request -> w
    routes: Routes = field(default_factory=Routes)
    engine: EngineSettings | None = None
    hf_config: object = None
    open: LayerGates | None = None  # the gates of the layer running now, for add_expand
    open_layer: object = None


SERVED = Served()


# ----------------------------------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------------------------------


def engine_settings(vllm_config) -> EngineSettings:
    compilation = vllm_config.compilation_config
    eager = bool(vllm_config.model_config.enforce_eager) or (
        int(getattr(compilation.mode, "value", compilation.mode) or 0) == 0
        and str(getattr(compilation, "cudagraph_mode", "NONE")).upper().endswith("NONE")
    )
    return EngineSettings(
        eager=eager,
        chunked_prefill=bool(vllm_config.scheduler_config.enable_chunked_prefill),
        prefix_caching=bool(vllm_config.cache_config.enable_prefix_caching),
        max_lora_rank=int(vllm_config.lora_config.max_lora_rank),
        fully_sharded_loras=bool(vllm_config.lora_config.fully_sharded_loras),
        tensor_parallel_size=int(vllm_config.parallel_config.tensor_parallel_size),
        v2_model_runner=bool(vllm_config.use_v2_model_runner),
        platform=_platform(),
    )


def _platform() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else str(current_platform)


# ----------------------------------------------------------------------------------------------------------------------
# the layer's gates for one step
# ----------------------------------------------------------------------------------------------------------------------


def _route_block(block: int, x: torch.Tensor) -> None:
    """Route (or take the kept routing of) every request of a MiLoRA adapter with a router in ``block``."""
    layout = SERVED.layout
    weights: dict[int, torch.Tensor] = {}
    starts = None
    for i, adapter_id in enumerate(() if layout is None else layout.adapters):
        adapter = SERVED.adapters.get(adapter_id)
        if adapter is None or block not in adapter.routers:
            continue
        request = layout.request_ids[i]
        kept = SERVED.routes.weights.get(request, {})
        if layout.computed[i] == 0 and layout.counts[i] >= layout.prompt_lengths[i]:
            starts = layout.starts if starts is None else starts
            prompt = x[starts[i] : starts[i] + layout.prompt_lengths[i]]
            kept[block] = route(adapter.routers[block], prompt)
            SERVED.routes.weights[request] = kept
        elif block not in kept:
            raise RuntimeError(
                f"loramix: MiLoRA request {request!r} (LoRA id {adapter_id}) arrives with {layout.computed[i]} of its "
                f"{layout.prompt_lengths[i]} prompt tokens already computed and no routing kept for it: its prompt "
                "was split across steps (chunked prefill) or partly served from the prefix cache. Serve MiLoRA "
                "adapters with --no-enable-chunked-prefill --no-enable-prefix-caching."
            )
        weights[i] = kept[block]
    SERVED.block_weights[block] = weights


def layer_gates(layer, info: LayerInfo, x: torch.Tensor) -> LayerGates | None:
    """The gates of ``layer`` for this step, or None when vLLM's own computation is exact as it is."""
    slot_ids, present = SERVED.mappings.get(layer.punica_wrapper, ((), frozenset()))
    loramix_ids = [i for i in present if i in SERVED.adapters]
    if not loramix_ids and 0 not in present:
        return None
    tokens = x.reshape(-1, x.shape[-1])
    if info.router_block is not None and any(info.router_block in SERVED.adapters[i].routers for i in loramix_ids):
        if SERVED.layout is None:
            raise RuntimeError("loramix: a MiLoRA adapter is active but the engine step's requests are unknown.")
        _route_block(info.router_block, tokens)
    num_tokens = tokens.shape[0]
    slots = layer.punica_wrapper.token_lora_indices[:num_tokens]
    slices: list[dict[int, MoRGate | torch.Tensor]] = []
    for name in info.slices:
        gates: dict[int, MoRGate | torch.Tensor] = {}
        for adapter_id in loramix_ids:
            gate = SERVED.adapters[adapter_id].gates.get(name)
            if gate is None:
                continue
            slot = slot_ids.index(adapter_id)
            if isinstance(gate, MoRGate):
                gates[slot] = gate
            else:
                gates[slot] = _expert_factors(adapter_id, gate, num_tokens)
        slices.append(gates)
    return LayerGates(slots=slots, slices=slices)


def _expert_factors(adapter_id: int, gate: ExpertGate, num_tokens: int) -> torch.Tensor:
    block_weights = SERVED.block_weights.get(gate.block)
    if block_weights is None or SERVED.layout is None:
        raise RuntimeError(f"loramix: no routing for block {gate.block} in this step (its qkv_proj did not run first).")
    return expert_factors(SERVED.layout, block_weights, adapter_id, gate, num_tokens)


# ----------------------------------------------------------------------------------------------------------------------
# wrappers
# ----------------------------------------------------------------------------------------------------------------------


def _wrap_apply(original):
    @functools.wraps(original)
    def apply(self, x, bias=None):
        info = SERVED.layers.get(self)
        # a subclass's apply calling its parent's (both wrapped) opens the gates once, in the outer call
        if info is None or SERVED.open_layer is self or torch.compiler.is_compiling():
            return original(self, x, bias)
        gates = layer_gates(self, info, x)
        if gates is None:
            return original(self, x, bias)
        SERVED.open, SERVED.open_layer = gates, self
        try:
            return original(self, x, bias)
        finally:
            SERVED.open, SERVED.open_layer = None, None

    return apply


def _wrap_add_expand(original):
    @functools.wraps(original)
    def add_expand(self, y, x, *args, **kwargs):
        if SERVED.open is not None:
            SERVED.open.apply_(x)
        return original(self, y, x, *args, **kwargs)

    return add_expand


def _wrap_update_metadata(original):
    @functools.wraps(original)
    def update_metadata(self, mapping, lora_index_to_id, *args, **kwargs):
        SERVED.mappings[self] = (tuple(lora_index_to_id), frozenset(max(int(i), 0) for i in mapping.index_mapping))
        return original(self, mapping, lora_index_to_id, *args, **kwargs)

    return update_metadata


def _wrap_create_lora_modules(original):
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    @functools.wraps(original)
    def _create_lora_modules(self):
        result = original(self)
        for name, module in self.modules.items():
            if not isinstance(module, BaseLinearLayerWithLoRA):
                continue
            prefix, _, last = name.rpartition(".")
            packed = self.packed_modules_mapping.get(last) or []
            if module.n_slices == 1:
                slices = (name,)
            elif len(packed) == module.n_slices:
                slices = tuple(f"{prefix}.{p}" if prefix else p for p in packed)
            else:
                slices = ()
            site = _ROUTER_SITE.search(name)
            SERVED.layers[module] = LayerInfo(name, slices, int(site.group(1)) if site else None)
        return result

    return _create_lora_modules


def _wrap_load_lora_model(original):
    @functools.wraps(original)
    def load_lora_model(self, model, vllm_config, device):
        SERVED.engine = engine_settings(vllm_config)
        SERVED.hf_config = vllm_config.model_config.hf_config
        return original(self, model, vllm_config, device)

    return load_lora_model


def _wrap_load_adapter(original):
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_adapter_absolute_path, parse_fine_tuned_lora_name

    @functools.wraps(original)
    def _load_adapter(self, lora_request):
        path = get_adapter_absolute_path(lora_request.lora_path)
        config = read_config(path)
        if config is None:
            SERVED.adapters.pop(lora_request.lora_int_id, None)
            return original(self, lora_request)
        name = lora_request.lora_name
        check_engine(config, SERVED.engine, name)
        check_rank(config, self.lora_config.max_lora_rank, name)
        served = convert(path, SERVED.hf_config)
        manager = self._adapter_manager
        mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
        mapper = None if mapper is None else mapper.get_rename_mapper()
        targets = {parse_fine_tuned_lora_name(k, mapper)[0] for k in served.tensors}
        slice_names = {s for info in SERVED.layers.values() for s in info.slices}  # the layers with gates
        unsupported = sorted(targets - slice_names)
        if unsupported:
            raise UnservableAdapter(
                f"The {served.method} adapter '{name}' adapts modules that vLLM's LoRA layers of this model do not "
                f"cover: {unsupported[:5]}. Nothing was loaded."
            )
        served.gates = {
            parse_fine_tuned_lora_name(f"base_model.model.{m}.lora_A.weight", mapper)[0]: g
            for m, g in served.gates.items()
        }
        sites = {info.router_block for info in SERVED.layers.values() if info.router_block is not None}
        unrouted = sorted(set(served.routers) - sites)
        if unrouted:
            raise UnservableAdapter(
                f"The MiLoRA adapter '{name}' routes blocks {unrouted} whose attention input projection vLLM does not "
                "expose as `self_attn.qkv_proj`; this architecture is not supported by the loramix vLLM plugin."
            )
        helper = PEFTHelper(r=served.rank, lora_alpha=served.rank, target_modules=sorted(targets))
        helper.validate_legal(self.lora_config)
        lora = self._lora_model_cls.from_lora_tensors(
            lora_request.lora_int_id,
            served.tensors,
            helper,
            device="cpu",
            dtype=self.lora_config.lora_dtype,
            model_vocab_size=self.vocab_size,
            weights_mapper=mapper,
            skip_prefixes=getattr(manager.model, "lora_skip_prefixes", None),
        )
        SERVED.adapters[lora_request.lora_int_id] = served
        return lora

    return _load_adapter


def _wrap_validate_lora(original):
    from vllm.lora.utils import get_adapter_absolute_path

    @functools.wraps(original)
    def _validate_lora(self, lora_request):
        original(self, lora_request)
        if lora_request is None:
            return
        path = get_adapter_absolute_path(lora_request.lora_path)
        config = read_config(path)
        if config is not None:
            try:
                check_config(config)
                check_weights(path, config)
                check_engine(config, engine_settings(self.vllm_config), lora_request.lora_name)
                check_rank(config, self.vllm_config.lora_config.max_lora_rank, lora_request.lora_name)
            except (UnservableAdapter, ValueError, FileNotFoundError) as error:
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(str(error)) from error

    return _validate_lora


def _wrap_set_active_loras(original):
    @functools.wraps(original)
    def set_active_loras(self, input_batch, num_scheduled_tokens, *args, **kwargs):
        result = original(self, input_batch, num_scheduled_tokens, *args, **kwargs)
        n = input_batch.num_reqs
        SERVED.layout = StepLayout(
            request_ids=tuple(input_batch.req_ids[:n]),
            counts=tuple(int(c) for c in num_scheduled_tokens[:n]),
            computed=tuple(int(c) for c in input_batch.num_computed_tokens_cpu[:n]),
            prompt_lengths=tuple(int(c) for c in input_batch.num_prompt_tokens[:n]),
            adapters=tuple(int(c) for c in input_batch.request_lora_mapping[:n]),
        )
        SERVED.block_weights = {}
        return result

    return set_active_loras


def _wrap_dummy_loras(original):
    @functools.wraps(original)
    def _set_active_loras(self, *args, **kwargs):
        SERVED.layout = None  # a warm-up or profiling activation: no requests
        SERVED.block_weights = {}
        return original(self, *args, **kwargs)

    return _set_active_loras


def _wrap_update_states(original):
    @functools.wraps(original)
    def _update_states(self, scheduler_output):
        SERVED.routes.finish(scheduler_output.finished_req_ids)
        return original(self, scheduler_output)

    return _update_states


_installed = False


def install() -> None:
    """Wrap the vLLM internals listed in the module docstring (once per process)."""
    global _installed
    if _installed:
        return
    from vllm.lora import utils as lora_utils
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper import punica_base, punica_cpu
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    classes = {cls for cls in lora_utils._all_lora_classes if issubclass(cls, BaseLinearLayerWithLoRA)}
    classes.add(BaseLinearLayerWithLoRA)
    for cls in classes:
        if "apply" in cls.__dict__:
            cls.apply = _wrap_apply(cls.__dict__["apply"])
    wrappers = [punica_base.PunicaWrapperBase, punica_cpu.PunicaWrapperCPU]
    for module, name in (("punica_gpu", "PunicaWrapperGPU"), ("punica_xpu", "PunicaWrapperXPU")):
        try:  # absent from some builds; the plugin refuses XPU at load anyway
            wrappers.append(getattr(importlib.import_module(f"vllm.lora.punica_wrapper.{module}"), name))
        except (ImportError, AttributeError):
            pass
    for cls in wrappers:
        if "add_expand" in cls.__dict__:
            cls.add_expand = _wrap_add_expand(cls.__dict__["add_expand"])
        if "update_metadata" in cls.__dict__:
            cls.update_metadata = _wrap_update_metadata(cls.__dict__["update_metadata"])
    LoRAModelManager._create_lora_modules = _wrap_create_lora_modules(LoRAModelManager._create_lora_modules)
    WorkerLoRAManager._load_adapter = _wrap_load_adapter(WorkerLoRAManager._load_adapter)
    InputProcessor._validate_lora = _wrap_validate_lora(InputProcessor._validate_lora)
    LoRAModelRunnerMixin.load_lora_model = _wrap_load_lora_model(LoRAModelRunnerMixin.load_lora_model)
    LoRAModelRunnerMixin.set_active_loras = _wrap_set_active_loras(LoRAModelRunnerMixin.set_active_loras)
    LoRAModelRunnerMixin._set_active_loras = _wrap_dummy_loras(LoRAModelRunnerMixin._set_active_loras)
    GPUModelRunner._update_states = _wrap_update_states(GPUModelRunner._update_states)
    _installed = True
