"""Optional fused Triton kernels, and the switch that decides when they are used.

Two families of kernels live here:

* :func:`mor_linear` — the whole MoR update (router, softmax, ``Ω_A``/``Ω_B`` scaling and the
  rank-``N·r`` product) forward and backward as fused Triton kernels (``mor_triton.py``).
* :func:`segmented_lora` — a LoRA applied only to selected rows of a batch, each with its own
  weight (Punica-BGMV style shrink/expand), for MiLoRA decoding (``segmented.py``);
  :func:`grouped_lora`, its mixed-adapter form: several adapters' LoRAs, each on its own rows, in one
  launch pair (Punica-SGMV style). Both run the same shrink/expand kernel pair.

Which implementation runs is chosen by the backend, from ``set_backend()`` or else from the
environment variable ``LORAMIX_KERNELS``:

``auto`` (default)
    Triton for CUDA tensors when ``triton`` can be imported, **guarded**: the first call of each kernel
    family on a device, dtype, mode (training / inference) and kernel variant runs the kernel and the
    PyTorch maths (float64) on the same inputs, drawn for the call's shapes, forward and in training
    backward, and compares; on a mismatch, an exception or a compile failure that key falls back to the
    PyTorch path for the rest of the process, with one :class:`KernelFallbackWarning` (``guard.py``;
    :func:`guard_decisions` lists the verdicts). The PyTorch path everywhere else (CPU).
``triton``
    Always Triton, unchecked. CPU tensors then need ``TRITON_INTERPRET=1`` set before Triton is first used
    (Triton's interpreter: slow, for tests only); without it a clear error is raised.
``torch``
    Never Triton: the entry points below compute the same maths in PyTorch (``reference.py``).

On compute capability 9.0 (H100, H200) the launches whose pipelined products take a left operand from
registers run with ``num_stages=1`` (``hardware.py``: triton-lang/triton issue 9433, as vLLM does for its
expand kernel).

Nothing here imports Triton until a kernel is actually needed, so ``import loramix`` stays cheap and
works without Triton installed (``pip install loramix[triton]`` adds it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

from . import guard, reference
from .guard import KernelFallbackWarning

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "LORAMIX_KERNELS"

_backend_override: str | None = None


def _check(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}.")
    return value


def get_backend() -> str:
    """The kernel backend in force: the value given to :func:`set_backend`, else ``$LORAMIX_KERNELS``, else ``auto``."""
    if _backend_override is not None:
        return _backend_override
    return _check(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


def set_backend(name: str | None) -> None:
    """Force ``"triton"`` or ``"torch"``, or ``"auto"``; ``None`` goes back to ``$LORAMIX_KERNELS``."""
    global _backend_override
    _backend_override = None if name is None else _check(name, "backend")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager: ``with loramix.kernels.backend("torch"): ...`` restores the previous choice after."""
    global _backend_override
    previous = _backend_override
    set_backend(name)
    try:
        yield
    finally:
        _backend_override = previous


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` is installed and imports (cached)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install must not break the PyTorch path
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels should run for ``tensor`` under the current backend.

    Under ``auto`` this says whether to *try* them (CUDA and Triton); the entry points below then decide per
    kernel family through the guard, and run the PyTorch maths for a family that failed its check.
    """
    choice = get_backend()
    if choice == "torch":
        return False
    if choice == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError(
            f"loramix kernel backend 'triton' was requested (set_backend or ${ENV_VAR}) but triton cannot be "
            "imported. Install it with `pip install loramix[triton]`, or use the 'auto' / 'torch' backend."
        )
    if not tensor.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"loramix kernel backend 'triton' was requested for a {tensor.device.type} tensor. Triton kernels need a "
            "CUDA device; on CPU they only run under Triton's interpreter (set TRITON_INTERPRET=1 before triton is "
            "first used; slow, for tests). Use the 'auto' or 'torch' backend instead."
        )
    return True


def _dispatch(family: str, args: tuple, kwargs: dict):
    """Run ``family`` as the backend says: the PyTorch maths, the kernel, or the kernel behind the guard."""
    choice = get_backend()
    fallback = getattr(reference, family)
    if choice == "torch" or (choice == "auto" and not triton_available()):
        return fallback(*args, **kwargs)
    if family == "mor_linear":
        from .mor_triton import mor_linear as kernel
    else:
        from . import segmented

        kernel = getattr(segmented, family)
    if choice == "triton":
        return kernel(*args, **kwargs)
    return guard.run(family, kernel, fallback, args, kwargs)


def mor_linear(*args, **kwargs):
    """Fused MoR update; see :func:`loramix.kernels.mor_triton.mor_linear`. Imports Triton on first use."""
    return _dispatch("mor_linear", args, kwargs)


def segmented_lora(*args, **kwargs):
    """Row-selected LoRA; see :func:`loramix.kernels.segmented.segmented_lora`. Imports Triton on first use."""
    return _dispatch("segmented_lora", args, kwargs)


def grouped_lora(*args, **kwargs):
    """Several adapters' row-selected LoRAs in one launch pair; see :func:`loramix.kernels.segmented.grouped_lora`."""
    return _dispatch("grouped_lora", args, kwargs)


def guard_decisions() -> list[dict]:
    """The ``auto`` guard's decisions so far in this process, one dict per key (kernel or PyTorch, and why)."""
    return [decision.as_dict() for decision in guard.decisions().values()]


def reset_guard() -> None:
    """Forget the ``auto`` guard's decisions: each kernel family is checked again on its next call."""
    guard.reset()


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "KernelFallbackWarning",
    "backend",
    "get_backend",
    "grouped_lora",
    "guard_decisions",
    "interpreter_enabled",
    "mor_linear",
    "reset_guard",
    "segmented_lora",
    "set_backend",
    "triton_available",
    "use_triton",
]
