"""Two processes on CPU (gloo): DDP through ``accelerate launch`` + ``Trainer``, and FSDP2 sharding.

Each run launches ``dist_worker.py`` in 2 processes (both methods in one launch, to pay the start-up
once), then checks its report here: parameters identical on every rank after training, the saved
adapter loads and reproduces the trained weights; for FSDP2, training equals an unsharded run.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS
from tests.integration.helpers import METHOD_NAMES, run_process_group
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.filterwarnings(*IGNORE_UPSTREAM_DEPRECATIONS, "ignore::UserWarning")

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[2]
# The methods run in turn in one launch (start-up paid once); a crash ends the launch, so MoR goes first.
LAUNCH_ORDER = sorted(METHOD_NAMES, key=lambda method: method != "mor")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], out: Path) -> str:
    """Run a 2-process job; returns its output for the failure messages of the tests that read it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    code, stdout, stderr = run_process_group(command, ROOT, env, timeout=240)  # a timeout leaves no rank behind
    if code is None:
        return f"timed out after 240 s\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return f"exit code {code}\n{stdout[-3000:]}\n{stderr[-6000:]}"


def report(out: Path, log: str, method: str) -> dict:
    """The report a method's run wrote (each method runs in turn, so one failing does not hide another)."""
    path = out / method / "report.json"
    if not path.exists():
        pytest.fail(f"the {method} run wrote no report:\n{log}")
    return json.loads(path.read_text())


def check_adapter_loads(out: Path, method: str) -> None:
    expected = torch.load(out / method / "final.pt")
    loaded = PeftModel.from_pretrained(tiny_llama(), out / method / "adapter")
    params = dict(loaded.named_parameters())
    assert expected
    for name, value in expected.items():
        assert torch.equal(params[name].detach(), value), name


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    # On a machine without GPUs `--multi_gpu` starts torchrun-style processes; the script's
    # use_cpu=True then makes accelerate pick DistributedType.MULTI_CPU with the gloo backend.
    log = launch(
        [
            *accelerate,
            "--multi_gpu",
            "--num_processes=2",
            "--num_machines=1",
            "--mixed_precision=no",
            "--dynamo_backend=no",
            f"--main_process_port={free_port()}",
            str(WORKER),
            "ddp",
            str(out),
            *LAUNCH_ORDER,
        ],
        out,
    )
    return out, log


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    log = launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(WORKER),
            "fsdp2",
            str(out),
            *LAUNCH_ORDER,
        ],
        out,
    )
    return out, log


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_ddp_with_accelerate_and_trainer(ddp_run, method):
    out, log = ddp_run
    result = report(out, log, method)
    assert result["distributed_type"] == "DistributedType.MULTI_CPU"
    assert result["backend"] == "gloo" and result["world_size"] == 2
    assert result["ddp"] == "DistributedDataParallel"
    assert result["ranks_saw_other_rows"] and result["changed"]
    assert result["identical"]  # parameters equal on both ranks after training
    logs = result["logs"]
    assert len(logs) == 3 and all("aux_loss" in e and "router_entropy" in e for e in logs)
    check_adapter_loads(out, method)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_fsdp2_sharded_training_matches_unsharded(fsdp_run, method):
    out, log = fsdp_run
    result = report(out, log, method)
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["sharded_adapter_params"] > 0  # adapter parameters are DTensors, sharded over ranks
    assert result["changed"] and result["max_diff_vs_unsharded"] < 1e-5
    check_adapter_loads(out, method)
