"""save_pretrained never leaves a half-written adapter: after a crash at any point, loading gives the
old adapter or the new one, complete (weights and config from the same save).

The protocol is described in ``loramix/_tuner/saving.py``; ``.bin`` saves (``safe_serialization=False``) are
covered too, except a ``.bin`` overwritten in place by a killed ``torch.save``, which is refused on
loading (``tests/test_loading.py::test_truncated_bin_is_refused``).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

import loramix._tuner.saving as saving
from loramix import MoRConfig
from tests.tiny_models import tiny_llama

REPO = Path(__file__).resolve().parents[1]


def versioned_model(version: int):
    """A MoR model whose adapter tensors all equal ``version`` and whose config has lora_alpha = version + 1."""
    config = MoRConfig(r=4, num_experts=3, lora_alpha=version + 1, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(), config)
    set_version(model, version)
    return model


def set_version(model, version: int) -> None:
    model.peft_config["default"].lora_alpha = version + 1
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mor_" in name:
                param.fill_(float(version))


def loaded_version(directory) -> int:
    """Load the adapter in ``directory`` and return its version, checking weights and config agree."""
    model = PeftModel.from_pretrained(tiny_llama(), directory)
    values = {p.unique().item() for n, p in model.named_parameters() if ".mor_" in n}
    assert len(values) == 1, f"adapter tensors from different saves: {values}"
    version = int(values.pop())
    assert model.peft_config["default"].lora_alpha == version + 1, "config and weights from different saves"
    return version


def test_overwrite_is_complete_and_leaves_no_journal(tmp_path):
    model = versioned_model(1)
    model.save_pretrained(tmp_path)
    set_version(model, 2)
    model.save_pretrained(tmp_path)
    assert loaded_version(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_switching_between_safetensors_and_bin_keeps_one_weights_file(tmp_path):
    model = versioned_model(1)
    model.save_pretrained(tmp_path)
    set_version(model, 2)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert files(tmp_path) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    assert loaded_version(tmp_path) == 2
    set_version(model, 3)
    model.save_pretrained(tmp_path)
    assert files(tmp_path) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert loaded_version(tmp_path) == 3


@pytest.mark.parametrize("old_format, new_format", [("safetensors", "bin"), ("bin", "safetensors")])
def test_crash_between_weights_and_config_across_formats(tmp_path, monkeypatch, old_format, new_format):
    """The new weights are of the other format than the old ones: the old adapter comes back whole."""
    model = versioned_model(1)
    model.save_pretrained(tmp_path, safe_serialization=old_format == "safetensors")
    set_version(model, 2)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed before the config was written")

    monkeypatch.setattr(MoRConfig, "save_pretrained", die)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path, safe_serialization=new_format == "safetensors")
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert loaded_version(tmp_path) == 1
    set_version(model, 3)
    model.save_pretrained(tmp_path, safe_serialization=new_format == "safetensors")
    assert files(tmp_path) == ["README.md", "adapter_config.json", f"adapter_model.{new_format}"]
    assert loaded_version(tmp_path) == 3


def test_crash_after_the_config_before_removing_the_other_format(tmp_path):
    """Killed after a .bin save's config, before the earlier save's safetensors was removed."""
    model = versioned_model(1)
    model.save_pretrained(tmp_path)
    stale = (tmp_path / "adapter_model.safetensors").read_bytes()
    set_version(model, 2)
    model.save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "adapter_model.safetensors").write_bytes(stale)  # what the crash would have left
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loaded_version(tmp_path) == 2
    assert any("interrupted save_pretrained" in str(w.message) for w in caught)
    assert files(tmp_path) == ["README.md", "adapter_config.json", "adapter_model.bin"]


def test_crash_while_writing_the_weights_keeps_the_old_adapter(tmp_path, monkeypatch):
    model = versioned_model(1)
    model.save_pretrained(tmp_path)
    set_version(model, 2)

    real_replace = saving.os.replace

    def die_before_rename(src, dst):
        if str(dst).endswith("adapter_model.safetensors"):
            raise KeyboardInterrupt("killed while writing the weights")
        return real_replace(src, dst)

    monkeypatch.setattr(saving.os, "replace", die_before_rename)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # temporary file cleaned up
    assert loaded_version(tmp_path) == 1


def test_crash_between_weights_and_config_rolls_back_to_the_old_adapter(tmp_path, monkeypatch):
    model = versioned_model(1)
    model.save_pretrained(tmp_path)
    set_version(model, 2)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed before the config was written")

    monkeypatch.setattr(MoRConfig, "save_pretrained", die)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loaded_version(tmp_path) == 1
    assert any("interrupted save_pretrained" in str(w.message) for w in caught)
    model.save_pretrained(tmp_path)  # and the next save completes normally
    assert loaded_version(tmp_path) == 2


SAVER = """
import sys, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
from tests.test_saving import set_version, versioned_model
model = versioned_model(1)
version = 2
print("ready", flush=True)
while True:
    set_version(model, version)
    model.save_pretrained({directory!r})
    version += 1
"""


@pytest.mark.parametrize("trial", range(4))
def test_sigkill_during_repeated_saves(tmp_path, trial):
    """Kill a process that keeps overwriting an adapter, at a random moment: the adapter still loads whole."""
    versioned_model(1).save_pretrained(tmp_path)
    script = textwrap.dedent(SAVER.format(repo=str(REPO), directory=str(tmp_path)))
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
        time.sleep(random.Random(trial).uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert loaded_version(tmp_path) >= 1
    versioned_model(0).save_pretrained(tmp_path)  # the next complete save clears what the killed one left
    assert files(tmp_path) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert loaded_version(tmp_path) == 0
