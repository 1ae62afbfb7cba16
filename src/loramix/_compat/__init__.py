"""The fences: every patch or use of another library's internals lives here, one module per library.

* :mod:`~loramix._compat.peft`: PEFT;
* :mod:`~loramix._compat.transformers`: transformers;
* :mod:`~loramix._compat.torch`: torch internals.

The vLLM plugin keeps its own fence, :mod:`loramix.vllm._hooks`, imported only by vLLM's plugin loader.
Each module opens with the list of what it touches, why no public API serves, and the versions it was verified on.
"""
