"""Every PEFT/transformers entry point knows both methods after ``import loramix``, each in a fresh process.

A fresh interpreter is what a user has when loading a saved adapter, and registration is
process-global state, so these tests run their loading code in subprocesses. Each subprocess runs
its loading path once per method (MoR, MiLoRA): starting an interpreter with torch, transformers and
PEFT costs seconds, the loading itself milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loramix import MiLoRAConfig, MoRConfig
from tests.tiny_models import save_adapters_with_expected_logits

REPO = Path(__file__).resolve().parents[1]

# method -> (config with random weights, config class name, a field to check after loading)
METHODS = {
    "mor": (lambda: MoRConfig(r=4, num_experts=3, init_weights=False, task_type="CAUSAL_LM"), "num_experts", 3),
    "milora": (lambda: MiLoRAConfig(r=4, top_k=2, init_weights=False, task_type="CAUSAL_LM"), "top_k", 2),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny base model and, per method, an adapter with random weights and its expected logits.

    The inputs are a left-padded batch, so MiLoRA's routing must skip the padding on every path.
    """
    root = tmp_path_factory.mktemp("registration")
    save_adapters_with_expected_logits(root, {m: c for m, (c, _, _) in METHODS.items()})
    return root


def run_fresh(code: str, root: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter once per method, with ``method``, ``adapter`` and ``check`` defined;
    ``env`` adds to the environment (e.g. ``LORAMIX_AUTOLOAD=0``: no start-up hook)."""
    prelude = f"""
        import torch
        from safetensors.torch import load_file
        torch.set_num_threads(1)  # same reduction order as the test process, so logits match bit for bit
        root = {str(root)!r}
        FIELDS = {{m: (field, value) for m, (field, value) in { ({m: v[1:] for m, v in METHODS.items()})!r}.items()}}
        def check(model):
            expected = load_file(root + f"/expected_{{method}}.safetensors")
            with torch.no_grad():
                inputs = dict(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"])
                logits = model.eval()(**inputs).logits
            diff = (logits - expected["logits"]).abs().max().item()
            assert diff == 0.0, (method, diff)
            print(method, "max diff", diff)
        for method in {list(METHODS)!r}:
            adapter = root + "/" + method
    """
    script = textwrap.dedent(prelude) + textwrap.indent(textwrap.dedent(code), " " * 4)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


LOADERS = {
    "PeftConfig.from_pretrained": """
        import loramix
        from peft import PeftConfig
        config = PeftConfig.from_pretrained(adapter)
        field, value = FIELDS[method]
        assert config.peft_type.value == method.upper() and getattr(config, field) == value
        assert type(config).__module__.startswith("loramix." + method), type(config)
        print(method, "max diff", 0.0)
    """,
    "PeftModel.from_pretrained": """
        import loramix
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        check(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + "/base"), adapter))
    """,
    "AutoPeftModelForCausalLM.from_pretrained": """
        import loramix
        from peft import AutoPeftModelForCausalLM
        check(AutoPeftModelForCausalLM.from_pretrained(adapter))
    """,
    "transformers load_adapter": """
        import loramix
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(root + "/base")
        model.load_adapter(adapter)
        # (not model.active_adapters(): transformers >= 5.24 gates it behind peft >= 0.22)
        from peft.tuners.tuners_utils import BaseTunerLayer
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        assert list(model.peft_config) == ["default"] and layers
        assert all(m.active_adapters == ["default"] for m in layers)
        check(model)
    """,
    "import twice and reload": """
        import importlib
        import loramix
        import loramix._compat.peft
        importlib.reload(loramix._compat.peft)
        importlib.reload(loramix)
        import loramix
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        check(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + "/base"), adapter))
    """,
}


@pytest.mark.parametrize("path", list(LOADERS))
def test_loading_path_in_fresh_process(saved, path):
    result = run_fresh(LOADERS[path], saved)
    assert result.returncode == 0, result.stderr[-3000:]
    for method in METHODS:
        assert f"{method} max diff 0.0" in result.stdout


def test_without_import_loramix_loading_fails_loudly(saved):
    """PEFT has no plugin mechanism: with the start-up hook off (``LORAMIX_AUTOLOAD=0``) and no `import loramix`, the
    load must fail, never half-load (with the hook on it loads: ``tests/integration/test_autoload.py``)."""
    result = run_fresh(
        """
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        try:
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + "/base"), adapter)
        except Exception as error:
            print(method, "refused:", repr(error))
        else:
            print(method, "LOADED")
        """,
        saved,
        env={"LORAMIX_AUTOLOAD": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED" not in result.stdout
    for method in METHODS:
        assert f"{method} refused:" in result.stdout and method.upper() in result.stdout


@pytest.mark.parametrize("name", ["MOR", "MILORA"])
def test_peft_type_is_a_real_enum_member(name):
    from peft.utils.peft_types import PeftType

    member = PeftType(name)
    assert member is getattr(PeftType, name) is PeftType[name] and member in list(PeftType)
    assert isinstance(member, PeftType) and member == name and member.value.lower() == name.lower()


REGISTRATION_STATE = r"""
import copy, json, os, sys, tempfile
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
import peft.mapping, peft.peft_model
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils.peft_types import PeftType
from transformers.integrations.peft import PeftAdapterMixin
from tests.tiny_models import tiny_llama


def state():
    "The PEFT and transformers state loramix may change: (place, name) -> identity of the value."
    places = {{
        "PeftType": dict(PeftType.__members__),
        "PeftType values": dict(PeftType._value2member_map_),
        "config mapping": peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
        "tuner mapping": peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING,
        "prefix mapping": peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
        "peft.peft_model": vars(peft.peft_model),
        "PeftModel": vars(PeftModel),
        "PeftConfig": vars(PeftConfig),
        "PeftAdapterMixin": vars(PeftAdapterMixin),
    }}
    return {{
        (place, str(getattr(name, "value", name))): id(value) for place, values in places.items() for name, value in values.items()
    }}


def changes(before, after):
    return sorted(f"{{p}}: {{n}}" for (p, n) in set(before) | set(after) if before.get((p, n)) != after.get((p, n)))


members_before = list(PeftType)
before = state()
import loramix
from loramix import MiLoRAConfig, MoRConfig
after_import = state()
assert list(PeftType) == members_before + [PeftType.MOR, PeftType.MILORA], list(PeftType)[-4:]
print("import:", json.dumps(changes(before, after_import)))

# Building and loading configs runs no registration code (not even an idempotent re-registration).
registration_calls = []
def profile(frame, event, arg):
    if event == "call" and frame.f_code.co_filename.endswith(os.path.join("loramix", "_compat", "peft.py")):
        registration_calls.append(frame.f_code.co_name)
directory = tempfile.mkdtemp()
sys.setprofile(profile)
configs = [MoRConfig(), MoRConfig(r=4, num_experts=3, router="mean"), MiLoRAConfig(), MiLoRAConfig(top_k=2)]
configs[1].save_pretrained(directory)
configs += [PeftConfig.from_pretrained(directory), MoRConfig.from_pretrained(directory), copy.deepcopy(configs[0])]
configs += [PeftConfig.from_peft_type(**configs[3].to_dict())]
sys.setprofile(None)
assert not registration_calls, registration_calls
assert [c.peft_type for c in configs] == [PeftType.MOR] * 2 + [PeftType.MILORA] * 2 + [PeftType.MOR] * 3 + [PeftType.MILORA]

# Nor does anything else loramix does afterwards change that state.
for config in (MoRConfig(r=4, num_experts=3, task_type="CAUSAL_LM"), MiLoRAConfig(r=4, top_k=2, task_type="CAUSAL_LM")):
    adapter = tempfile.mkdtemp()
    get_peft_model(tiny_llama(), config).save_pretrained(adapter)
    PeftModel.from_pretrained(tiny_llama(), adapter)
    tiny_llama().load_adapter(adapter)
assert list(PeftType) == members_before + [PeftType.MOR, PeftType.MILORA]
print("afterwards:", json.dumps(changes(after_import, state())))
"""


def test_registration_happens_once_at_import_and_configs_touch_nothing():
    """``import loramix`` is the only change to PEFT's and transformers' state, and it changes exactly this;
    building configs runs no registration code (the subprocess asserts it and that list(PeftType) grew by
    exactly MOR and MILORA)."""
    script = REGISTRATION_STATE.format(repo=str(REPO))
    # the start-up hook off: this test measures what `import loramix` itself changes, from a process without it
    env = {**os.environ, "LORAMIX_AUTOLOAD": "0"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith(("import", "after")))
    expected = [
        f"{place}: {name}"
        for place in ("PeftType", "PeftType values", "config mapping", "tuner mapping", "prefix mapping")
        for name in ("MILORA", "MOR")
    ]
    expected += ["PeftAdapterMixin: load_adapter", "peft.peft_model: safe_save_file"]
    expected += ["PeftModel: from_pretrained", "PeftModel: load_adapter"]  # undo a failed load (_compat/peft.py, 3.)
    assert json.loads(lines["import"]) == sorted(expected)
    assert json.loads(lines["afterwards"]) == []


def test_only_the_fences_touch_other_libraries_internals():
    """PEFT's registries, private names of PEFT / transformers / torch, and the patches of their classes appear in
    the fence modules only (``loramix/_compat/``; vLLM's in ``loramix/vllm/_hooks.py``)."""
    fences = {"_compat/peft.py", "_compat/transformers.py", "_compat/torch.py", "vllm/_hooks.py"}
    markers = (
        "extend_peft_type", "register_peft_method", "_member_map_", "_member_names_", "_value2member_map_",
        "_forward_hooks", "_forward_pre_hooks", "_execution_engine", "AuxiliaryTrainingWrapper", "PeftAdapterMixin",
        "keys_to_ignore_at_inference", "safe_save_file",
    )  # fmt: skip
    imports = re.compile(r"from (?:peft|transformers|torch|vllm)[\w.]* import (\([^)]*\)|[^\n]*)")
    offenders = []
    for path in sorted((REPO / "src" / "loramix").rglob("*.py")):
        relative = path.relative_to(REPO / "src" / "loramix").as_posix()
        if relative in fences:
            continue
        text = path.read_text()
        offenders += [f"{relative}: {marker}" for marker in markers if re.search(rf"(?<!\w){marker}(?!\w)", text)]
        offenders += [
            f"{relative}: {m.group(0)[:60]!r}" for m in imports.finditer(text) if re.search(r"\b_[a-z]", m[1])
        ]
    assert not offenders, offenders
