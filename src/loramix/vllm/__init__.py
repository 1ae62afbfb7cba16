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
    """The vLLM plugin entry point: check every vLLM internal the plugin hooks (:mod:`loramix.vllm._internals`),
    then wrap vLLM's LoRA path (:mod:`loramix.vllm._hooks`); a vLLM whose internals differ is refused, naming them."""
    import vllm

    from loramix.vllm import _hooks, _internals

    report = _internals.check()
    if report.problems:
        raise RuntimeError(_internals.refusal(report, vllm.__version__))
    if vllm.__version__ not in _internals.VERIFIED:
        import logging

        logging.getLogger(__name__).warning(
            "loramix: vLLM %s is not among the versions the plugin was verified on (%s); every internal it hooks "
            "has the names and parameters it expects, so it is installed.",
            vllm.__version__,
            ", ".join(_internals.VERIFIED),
        )
    _hooks.install(report)
