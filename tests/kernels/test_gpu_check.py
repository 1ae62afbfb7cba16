"""``benchmarks/gpu_check.py --dry-run``: the whole GPU-check plan runs on CPU (tiny shapes, Triton's interpreter).

It keeps the script that a GPU session runs unchanged (and has one chance to run) from rotting on machines
without a GPU: every section must run, every correctness check must pass, and both outputs must be written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ["environment", "kernels", "sm90_stages", "guard", "llama_step", "bench_mor_layer", "bench_train_step",
            "bench_decode", "bench_compiled"]  # fmt: skip


def test_dry_run_runs_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LORAMIX_KERNELS"}
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    data = json.loads((tmp_path / "results.json").read_text())
    sections = data["sections"]
    assert list(sections) == SECTIONS
    assert {name: entry["status"] for name, entry in sections.items()} == dict.fromkeys(SECTIONS, "ok")

    kernels = sections["kernels"]["result"]
    families = {case["family"] for case in kernels["cases"]}
    assert families == {"mor_linear", "segmented_lora", "grouped_lora"} and kernels["count"] >= 18
    assert all(case["passed"] and case["margin"] < 1 for case in kernels["cases"])
    guard = sections["guard"]["result"]
    assert all(test["warned"] and test["result_is_pytorch"] for test in guard["self_test"].values())
    assert len(guard["verdicts"]) == 12 and all(v["use_kernel"] for v in guard["verdicts"])
    assert set(guard["first_call_overhead"]) == {"mor_linear training", "segmented_lora decode"}
    assert sections["llama_step"]["result"]["passed"]
    assert sections["bench_decode"]["result"]["mixed_adapters"]["contenders"]

    summary = (tmp_path / "summary.txt").read_text()
    assert "DRY RUN" in summary and "[ok] kernels" in summary and "first-call overhead" in summary
    assert data["total_seconds"] < 300  # about a minute on two idle cores; generous for a shared machine
