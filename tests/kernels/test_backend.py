"""The backend switch: LORAMIX_KERNELS / set_backend, and the errors when Triton cannot run."""

from __future__ import annotations

import inspect

import pytest
import torch

from loramix import kernels
from loramix.kernels import mor_triton, reference, segmented


def test_auto_uses_pytorch_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.get_backend() == "auto"
    assert kernels.use_triton(torch.zeros(1)) is False


def test_environment_variable_and_set_backend(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "TORCH")
    assert kernels.get_backend() == "torch"
    with kernels.backend("triton"):
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "torch"
    kernels.set_backend("auto")
    try:
        assert kernels.get_backend() == "auto"
    finally:
        kernels.set_backend(None)
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="LORAMIX_KERNELS"):
        kernels.get_backend()
    with pytest.raises(ValueError, match="one of"):
        kernels.set_backend("fast")


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with kernels.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.backend("triton"):
        assert kernels.use_triton(torch.zeros(1)) is True
    with kernels.backend("torch"):
        assert kernels.use_triton(torch.zeros(1)) is False


def test_entry_points_take_the_parameters_of_their_contract():
    """Each Triton entry point declares its contract (kernels/reference.py), whose signature the guard binds calls
    with: the two must take the same parameters, and a mismatch is refused when the entry point is defined."""
    for kernel in (mor_triton.mor_linear, segmented.segmented_lora, segmented.grouped_lora):
        contract = getattr(reference, kernel.__name__)
        assert inspect.signature(kernel) == inspect.signature(contract)
    with pytest.raises(TypeError, match="must take the parameters of segmented_lora"):

        @reference.implements(reference.segmented_lora)
        def segmented_lora(x, lora_A, lora_B, rows, weights=None, scaling=2.0, out=None):
            raise AssertionError("never called")
