"""Every PEFT/transformers entry point knows both methods after ``import loramix``, each in a fresh process.

A fresh interpreter is what a user has when loading a saved adapter, and registration is
process-global state, so these tests run their loading code in subprocesses. Each subprocess runs
its loading path once per method (MoR, MiLoRA): starting an interpreter with torch, transformers and
PEFT costs seconds, the loading itself milliseconds.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import save_file

from loramix import MiLoRAConfig, MoRConfig
from tests.tiny_models import tiny_llama

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
    tiny_llama().save_pretrained(root / "base")
    input_ids = torch.arange(1, 11).reshape(2, 5)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    for method, (config, _, _) in METHODS.items():
        model = get_peft_model(tiny_llama(), config())
        model.peft_config["default"].base_model_name_or_path = str(root / "base")
        model.eval().save_pretrained(root / method)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "logits": logits}
        save_file(tensors, root / f"expected_{method}.safetensors")
    return root


def run_fresh(code: str, root: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter once per method, with ``method``, ``adapter`` and ``check`` defined."""
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
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)


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
        assert model.active_adapters() == ["default"]
        check(model)
    """,
    "import twice and reload": """
        import importlib
        import loramix
        import loramix._registration
        importlib.reload(loramix._registration)
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
    """PEFT has no plugin mechanism: without `import loramix` the load must fail, never half-load."""
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
