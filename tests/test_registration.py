"""Every PEFT/transformers entry point knows MoR after ``import loramix``, each in a fresh process.

A fresh interpreter is what a user has when loading a saved adapter, and registration is
process-global state, so these tests run their loading code in subprocesses.
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

from loramix import MoRConfig
from tests.tiny_models import tiny_llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny base model, a MoR adapter trained on it (random weights), and the expected logits."""
    root = tmp_path_factory.mktemp("registration")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    model = get_peft_model(tiny_llama(), MoRConfig(r=4, num_experts=3, init_weights=False, task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    model.eval().save_pretrained(root / "adapter")
    input_ids = torch.arange(1, 11).reshape(2, 5)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    save_file({"input_ids": input_ids, "logits": logits}, root / "expected.safetensors")
    return root


def run_fresh(code: str, root: Path) -> subprocess.CompletedProcess:
    prelude = f"""
        import torch
        from safetensors.torch import load_file
        torch.set_num_threads(1)  # same reduction order as the test process, so logits match bit for bit
        root = {str(root)!r}
        expected = load_file(root + "/expected.safetensors")
        def check(model):
            with torch.no_grad():
                logits = model.eval()(input_ids=expected["input_ids"]).logits
            diff = (logits - expected["logits"]).abs().max().item()
            assert diff == 0.0, diff
            print("max diff", diff)
    """
    script = textwrap.dedent(prelude) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)


LOADERS = {
    "PeftConfig.from_pretrained": """
        import loramix
        from peft import PeftConfig
        config = PeftConfig.from_pretrained(root + "/adapter")
        assert type(config) is loramix.MoRConfig and config.num_experts == 3 and config.peft_type.value == "MOR"
        print("max diff", 0.0)
    """,
    "PeftModel.from_pretrained": """
        import loramix
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        check(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + "/base"), root + "/adapter"))
    """,
    "AutoPeftModelForCausalLM.from_pretrained": """
        import loramix
        from peft import AutoPeftModelForCausalLM
        check(AutoPeftModelForCausalLM.from_pretrained(root + "/adapter"))
    """,
    "transformers load_adapter": """
        import loramix
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(root + "/base")
        model.load_adapter(root + "/adapter")
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
        check(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + "/base"), root + "/adapter"))
    """,
}


@pytest.mark.parametrize("path", list(LOADERS))
def test_loading_path_in_fresh_process(saved, path):
    result = run_fresh(LOADERS[path], saved)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max diff 0.0" in result.stdout


def test_without_import_loramix_loading_fails_loudly(saved):
    """PEFT has no plugin mechanism: without `import loramix` the load must fail, never half-load."""
    result = run_fresh(
        """
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + "/base"), root + "/adapter")
        """,
        saved,
    )
    assert result.returncode != 0
    assert "MOR" in result.stderr


def test_peft_type_is_a_real_enum_member():
    from peft.utils.peft_types import PeftType

    member = PeftType("MOR")
    assert member is PeftType.MOR is PeftType["MOR"] and member in list(PeftType)
    assert isinstance(member, PeftType) and member == "MOR" and member.value.lower() == "mor"
