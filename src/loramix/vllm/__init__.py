"""Serve loramix adapters (MoR, MiLoRA) with vLLM, per request, next to plain LoRA adapters.

vLLM loads :func:`register` in each of its processes through the ``vllm.general_plugins`` entry point that
``pip install loramix`` declares; no user code is needed::

    vllm serve BASE --enable-lora --max-lora-rank 128 --enforce-eager \\
        --no-enable-chunked-prefill --no-enable-prefix-caching \\
        --lora-modules tenant-a=/adapters/mor tenant-b=/adapters/milora plain=/adapters/lora

The served forms are exact (README "Serving"): MoR is a rank-(N·r) LoRA gated per token by its router,
MiLoRA's experts are LoRAs gated per request by its routers, run once on each request's prompt.
"""

from __future__ import annotations

from loramix.vllm.convert import UnservableAdapter

__all__ = ["UnservableAdapter", "register"]


def register() -> None:
    """The vLLM plugin entry point: check the vLLM version, then wrap its LoRA path (:mod:`loramix.vllm._hooks`)."""
    import vllm

    from loramix.vllm import _hooks

    if vllm.__version__ not in _hooks.SUPPORTED_VLLM:
        raise RuntimeError(
            f"loramix's vLLM plugin supports vLLM {', '.join(_hooks.SUPPORTED_VLLM)}; this is vLLM {vllm.__version__}, "
            "whose LoRA internals it has not been checked against. Install a supported vLLM, or skip the plugin with "
            "VLLM_PLUGINS set to the plugins you want loaded (without 'loramix')."
        )
    _hooks.install()
