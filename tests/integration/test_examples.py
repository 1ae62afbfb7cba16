"""The examples run: train (Trainer, each method) -> generate from the saved adapter -> routing plots,
and the 2-process ``accelerate launch`` of the training script on CPU. Tiny random model (``--model
tiny``), so they take seconds; the same scripts run SmolLM2 by default."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS
from tests.integration.helpers import METHOD_NAMES, run_process_group
from tests.integration.test_distributed import free_port

# The example scripts are imported under their own names: their deprecated calls are errors too.
EXAMPLE_MODULES = "(train|generate|plot_routing|multitask_data|evaluation)$"
pytestmark = pytest.mark.filterwarnings(
    *IGNORE_UPSTREAM_DEPRECATIONS,
    "ignore::UserWarning",
    f"error::FutureWarning:{EXAMPLE_MODULES}",
    f"error::DeprecationWarning:{EXAMPLE_MODULES}",
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    import generate
    import plot_routing
    import train

    yield train, generate, plot_routing
    sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module", params=METHOD_NAMES)
def trained(request, examples, tmp_path_factory):
    train, _, _ = examples
    out = tmp_path_factory.mktemp(f"train-{request.param}")
    argv = ["--model", "tiny", "--method", request.param, "--steps", "6", "--batch-size", "8", "--lr", "3e-3"]
    argv += ["--max-examples", "64", "--output-dir", str(out)]
    result = train.main(argv)
    return request.param, out, result


def test_train_script(trained):
    method, out, result = trained
    logs = [e for e in result["logs"] if "loss" in e]
    assert logs and all("aux_loss" in e and "router_entropy" in e for e in logs)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["base_model_name_or_path"] == str(out / "base")
    stats = json.loads((out / "routing.json").read_text())
    assert stats["method"] == method and set(stats["tasks"]) == {"capital", "addition", "antonym", "plural"}
    for name in ("routing_heatmap.png", "routing_tasks.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_generate_script(trained, examples, capsys):
    _, generate, _ = examples
    method, out, _ = trained
    prompts = ["What is the capital of Peru?", "What is 12 + 30?"]
    answers = generate.main([str(out / "adapter"), *prompts, "--max-new-tokens", "5"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert f"[{method.upper()}] What is the capital of Peru? ->" in capsys.readouterr().out


def test_plot_routing_script(trained, examples, tmp_path):
    _, _, plot_routing = examples
    method, out, _ = trained
    outputs = plot_routing.main([str(out / "adapter"), "--out", str(tmp_path), "--layer", "mean"])
    assert Path(outputs["heatmap"]).exists() and Path(outputs["tasks"]).exists()
    assert json.loads((tmp_path / "routing.json").read_text())["method"] == method


def test_accelerate_two_process_launch_of_the_training_script(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Twice at most: in 2 of 7 full-suite runs on 2 shared cores (2026-12-05) the two CPU ranks hung until the
    # timeout (a rank left waiting in a futex), never in about a dozen runs of the test alone or of tests/integration; a hang on both tries fails,
    # and every try's output is in the failure message.
    tries = []
    for _ in range(2):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2"]
        command += ["--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
        command += [f"--main_process_port={free_port()}", str(EXAMPLES / "train.py"), "--model", "tiny", "--cpu"]
        command += ["--threads", "1", "--steps", "3", "--batch-size", "4", "--max-examples", "32", "--no-plot"]
        command += ["--output-dir", str(tmp_path)]
        code, stdout, stderr = run_process_group(command, ROOT, env, timeout=240)
        tries.append(
            f"exit {code if code is not None else 'none: timed out after 240 s'}\n{stdout[-2000:]}\n{stderr[-5000:]}"
        )
        if code is not None:
            break
    # Each rank ends its process group before exiting (examples/train.py: accelerator.end_training()): a group
    # left to interpreter shutdown can abort a rank after a successful run ("terminate called ...", exit -6).
    assert code == 0, "\n---\n".join(tries)
    assert "terminate called" not in stderr, stderr[-5000:]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed_type"] == "DistributedType.MULTI_CPU"
    logs = [e for e in summary["logs"] if "loss" in e]
    assert len(logs) == 3 and all("aux_loss" in e for e in logs)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_plot_examples_for_the_quickstart(trained, examples, tmp_path):
    """The function the quickstart calls with its in-memory model and its Example objects."""
    _, generate, plot_routing = examples
    from multitask_data import build_dataset

    _, out, _ = trained
    model, tokenizer = generate.load(out / "adapter", None)
    _, test = build_dataset(test_per_task=4)
    rows = [ex for task_rows in test.values() for ex in task_rows]
    result = plot_routing.plot_examples(
        model, tokenizer, rows, tmp_path / "routing", copy_to=tmp_path / "docs" / "r.png"
    )
    assert (tmp_path / "docs" / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(Path(result["stats"]).read_text())["tasks"].keys() == {"capital", "addition", "antonym", "plural"}
