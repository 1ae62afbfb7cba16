"""Shared fixtures. ``import loramix`` here registers the methods with PEFT for every test."""

from __future__ import annotations

import pytest
import torch

import loramix  # noqa: F401

# Tiny models: one thread avoids OpenMP spin-waits that make them 100x slower on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, 128, (2, 9), generator=generator)
