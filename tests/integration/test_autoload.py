"""Installing loramix makes its methods known to PEFT in every process, without ``import loramix``.

The start-up file ``loramix_autoload.pth`` (``src/loramix_autoload``) acts when an interpreter starts, so
every check runs in a fresh interpreter: of this environment (where ``make test`` installed loramix
editable), and of throwaway venvs into which a wheel and an editable install of a copy of this checkout
are installed by pip. Those venvs get the dependencies (torch, peft, ...) from this environment through a
plain path line, which does not run this environment's own start-up files.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

import loramix_autoload
from loramix import MiLoRAConfig, MoRConfig
from loramix_autoload import loramix_build
from tests.tiny_models import save_adapters_with_expected_logits

ROOT = Path(__file__).resolve().parents[2]
METHODS = {
    "mor": lambda: MoRConfig(r=4, num_experts=3, init_weights=False, task_type="CAUSAL_LM"),
    "milora": lambda: MiLoRAConfig(r=4, top_k=2, init_weights=False, task_type="CAUSAL_LM"),
}
# What start-up must not load (the Done criterion is torch; the others would cost as much).
HEAVY = ("torch", "transformers", "peft", "loramix", "numpy", "safetensors", "accelerate")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A saved tiny base model and, per method, an adapter with random weights and the logits it gives here
    (a process that imported loramix), on a left-padded batch (MiLoRA's routing must skip the padding)."""
    root = tmp_path_factory.mktemp("autoload")
    save_adapters_with_expected_logits(root, METHODS)
    return root


def python(code: str, *, env: dict | None = None, executable: Path | str = sys.executable, args: tuple = ()):
    """Run ``code`` (dedented) in a fresh interpreter, with ``env`` added to this process's environment."""
    command = [str(executable), "-c", textwrap.dedent(code), *args]
    environment = {**os.environ, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment, timeout=300)


# Loads every method's adapter through one entry point, in a process that never imports loramix by hand, and
# compares the logits with the importing process's, bit for bit. argv: the saved root, then the entry point.
LOAD = """
    import sys
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)  # the test process's reduction order: logits match bit for bit
    root, path = sys.argv[1], sys.argv[2]
    assert "loramix" not in sys.modules and "peft" not in sys.modules
    for method in ("mor", "milora"):
        adapter = f"{root}/{method}"
        if path == "PeftModel.from_pretrained":
            from peft import PeftModel
            from transformers import AutoModelForCausalLM
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + "/base"), adapter)
        elif path == "AutoPeftModelForCausalLM.from_pretrained":
            from peft import AutoPeftModelForCausalLM
            model = AutoPeftModelForCausalLM.from_pretrained(adapter)
        else:  # transformers imports peft itself, after asking importlib.util.find_spec("peft") if it is there
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(root + "/base")
            model.load_adapter(adapter)
        expected = load_file(f"{root}/expected_{method}.safetensors")
        with torch.no_grad():
            logits = model.eval()(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
        print(method, "max diff", (logits - expected["logits"]).abs().max().item())
    import loramix, loramix_autoload
    print("status:", loramix_autoload.status())
    print("loramix from:", loramix.__file__)
"""

LOADERS = ["PeftModel.from_pretrained", "AutoPeftModelForCausalLM.from_pretrained", "transformers load_adapter"]


def check_loaded(result: subprocess.CompletedProcess) -> None:
    """Both methods loaded with the importing process's logits, registered by the start-up hook."""
    assert result.returncode == 0, result.stderr[-3000:]
    for method in METHODS:
        assert f"{method} max diff 0.0" in result.stdout, result.stdout
    assert "status: active: loramix" in result.stdout and "when peft was imported" in result.stdout, result.stdout


def test_the_backend_writes_the_file_the_hook_names():
    assert loramix_build.PTH_NAME == loramix_autoload.PTH_NAME
    assert loramix_build.PTH_LINE == "import loramix_autoload; loramix_autoload.install()\n"


def test_this_environment_has_the_startup_file():
    """Precondition of the other tests (``make test`` installs loramix with ``pip install -e``)."""
    result = python("import loramix_autoload; print(loramix_autoload.status())")
    assert result.stdout.startswith("waiting:"), (
        f"{loramix_autoload.PTH_NAME} did not run: reinstall loramix (`pip install -e .`). {result.stdout}{result.stderr}"
    )


@pytest.mark.parametrize("path", LOADERS)
def test_fresh_process_loads_both_methods_without_import_loramix(saved, path):
    check_loaded(python(LOAD, args=(str(saved), path)))


def test_startup_imports_nothing_heavy():
    """Start-up loads ``loramix_autoload`` alone (it imports no other module) and no torch, peft, transformers."""
    result = python(
        """
        import sys
        print(" ".join(sorted(sys.modules)))
        print(any(type(finder).__module__ == "loramix_autoload" for finder in sys.meta_path))
        """
    )
    assert result.returncode == 0, result.stderr
    modules, watching = result.stdout.split("\n")[:2]
    modules = set(modules.split())
    assert "loramix_autoload" in modules and watching == "True"
    assert not {m for m in modules if m.split(".")[0] in HEAVY}, sorted(modules)
    # -X importtime: its cumulative time equals its own, i.e. it imported nothing that was not loaded already.
    timing = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
    [line] = [line for line in timing.stderr.splitlines() if line.split("|")[-1].strip() == "loramix_autoload"]
    own, cumulative = (int(part) for part in line.split(":", 1)[1].split("|")[:2])
    assert own == cumulative, line


def test_opt_out_with_the_environment_variable(saved):
    """``LORAMIX_AUTOLOAD=0``: PEFT refuses the adapters as before, loudly, and status says why."""
    result = python(
        """
        import sys
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        import loramix_autoload
        assert "loramix" not in sys.modules
        print("status:", loramix_autoload.status())
        for method in ("mor", "milora"):
            try:
                PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/base"), sys.argv[1] + "/" + method)
            except Exception as error:
                print(method, "refused:", repr(error))
            else:
                print(method, "LOADED")
        """,
        env={"LORAMIX_AUTOLOAD": "0"},
        args=(str(saved),),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "status: off: LORAMIX_AUTOLOAD=0" in result.stdout and "LOADED" not in result.stdout
    for method in METHODS:
        assert f"{method} refused:" in result.stdout and method.upper() in result.stdout
    check = subprocess.run(
        [sys.executable, "-m", "loramix_autoload"],
        capture_output=True,
        text=True,
        env={**os.environ, "LORAMIX_AUTOLOAD": "off"},
    )
    assert check.returncode == 1 and check.stdout.startswith("off:"), check.stdout + check.stderr


def test_status_command_and_import_loramix_first():
    """``python -m loramix_autoload`` reports the registration; a process that imports loramix itself is
    registered by that import (the hook sees loramix importing peft and leaves it alone)."""
    check = subprocess.run([sys.executable, "-m", "loramix_autoload"], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.startswith("active: loramix"), check.stdout + check.stderr
    result = python(
        """
        import loramix, loramix_autoload
        from peft.utils.peft_types import PeftType
        assert {"MOR", "MILORA"} <= set(PeftType.__members__)
        print(loramix_autoload.status())
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "active: registered by `import loramix`"


def test_a_loramix_that_cannot_import_costs_one_warning(tmp_path):
    """If loramix fails to import, importing peft still works: one RuntimeWarning, PEFT without loramix."""
    shadow = tmp_path / "shadow" / "loramix"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('simulated: loramix cannot import')\n")
    result = python(
        """
        import peft
        from peft import LoraConfig, get_peft_model
        import loramix_autoload
        LoraConfig(r=2)
        print("status:", loramix_autoload.status())
        print("peft works")
        """,
        env={"PYTHONPATH": str(shadow.parent)},  # ahead of site-packages: this `loramix` is the one found
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peft works" in result.stdout
    assert "status: failed: `import loramix` raised ImportError: simulated" in result.stdout
    assert result.stderr.count("RuntimeWarning: loramix: could not register") == 1, result.stderr


def copy_project(target: Path) -> Path:
    """What a build needs from this checkout (sdist contents), without build leftovers."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, target / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for package in ("loramix", "loramix_autoload"):
        shutil.copytree(ROOT / "src" / package, target / "src" / package, ignore=ignore)
    return target


def record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


@pytest.mark.parametrize("mode", ["wheel", "editable"])
def test_wheel_and_editable_installs_ship_the_startup_file(saved, tmp_path, mode):
    """``pip install .`` (through a wheel) and ``pip install -e .`` (PEP 660) both put the start-up file in
    site-packages and list it in RECORD; a fresh process of that venv loads both methods from that install
    with only ``from peft import ...``; ``pip uninstall`` removes the file. Offline: built with this
    environment's setuptools (``--no-build-isolation``)."""
    project = copy_project(tmp_path / "project")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpython = venv / "bin" / "python"
    purelib = Path(
        python("import sysconfig; print(sysconfig.get_paths()['purelib'])", executable=vpython).stdout.strip()
    )
    # The dependencies, from this environment; a plain path line does not run this environment's .pth files.
    (purelib / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    quiet = ["--no-deps", "--no-index", "--no-build-isolation", "--disable-pip-version-check", "-q"]
    pip = [sys.executable, "-m", "pip", "--python", str(vpython)]
    if mode == "wheel":
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", *quiet, "-w", str(tmp_path / "dist"), str(project)],
            capture_output=True,
            text=True,
        )
        assert built.returncode == 0, built.stderr[-3000:]
        [wheel] = (tmp_path / "dist").glob("loramix-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            content = archive.read(loramix_autoload.PTH_NAME)
            [record] = [name for name in archive.namelist() if name.endswith(".dist-info/RECORD")]
            assert record_line(loramix_autoload.PTH_NAME, content) in archive.read(record).decode().splitlines()
        target = [str(wheel)]
    else:
        target = ["-e", str(project)]
    installed = subprocess.run([*pip, "install", *quiet, *target], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    startup_file = purelib / loramix_autoload.PTH_NAME
    assert startup_file.read_text() == loramix_build.PTH_LINE
    [record] = purelib.glob("loramix-*.dist-info/RECORD")
    assert any(line.startswith(f"{loramix_autoload.PTH_NAME},") for line in record.read_text().splitlines())

    startup = python("import sys; print(' '.join(sorted(sys.modules)))", executable=vpython)
    modules = set(startup.stdout.split())
    assert "loramix_autoload" in modules and not {m for m in modules if m.split(".")[0] in HEAVY}, startup
    result = python(LOAD, executable=vpython, args=(str(saved), "PeftModel.from_pretrained"))
    check_loaded(result)
    expected_home = purelib / "loramix" if mode == "wheel" else project / "src" / "loramix"
    assert f"loramix from: {expected_home / '__init__.py'}" in result.stdout, result.stdout

    removed = subprocess.run(
        [*pip, "uninstall", "-y", "-q", "--disable-pip-version-check", "loramix"], capture_output=True, text=True
    )
    assert removed.returncode == 0, removed.stderr[-3000:]
    assert not startup_file.exists()
