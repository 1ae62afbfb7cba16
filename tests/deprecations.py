"""Blame upstream deprecation warnings on the code that called the deprecated API.

pyproject.toml turns ``FutureWarning`` and ``DeprecationWarning`` attributed to loramix's and the tests'
modules into errors (warnings filters match the module a warning is *attributed* to). Upstream does not
always attribute its deprecations to the caller:

* transformers warns with the default ``stacklevel=1`` in e.g. ``gradient_checkpointing_enable`` and
  ``is_gradient_checkpointing``, so the warning is attributed to ``transformers.modeling_utils``;
* its ``deprecate_kwarg`` warns with ``stacklevel=2``, which for ``model(..., past_key_values=...)``
  lands in torch's ``Module.__call__`` machinery, not in the code that passed the old keyword.

A module filter for loramix or the tests would never see either. :func:`install` wraps ``warnings.warn``
(for the test session only) so that a deprecation warned by an upstream package is attributed to the
caller of the deprecated function at least (``stacklevel >= 2``), skipping torch's ``Module.__call__``
frames and generated code (a dataclass's ``__init__``). An upstream function that calls another upstream
deprecated function is still blamed on upstream, so only deprecated calls made by loramix or the tests
themselves become errors.
"""

from __future__ import annotations

import sys
import warnings

UPSTREAM = frozenset(
    "transformers peft torch accelerate trl datasets huggingface_hub safetensors bitsandbytes triton".split()
)
# Frames between a caller and the ``forward`` it called through ``module(...)``; generated code (a
# dataclass ``__init__`` calling ``TrainingArguments.__post_init__``) is skipped too.
FORWARDING = frozenset({"torch.nn.modules.module"})

# For a test module's ``filterwarnings`` mark: ignore upstream's own deprecations there, but not those
# attributed to loramix or the tests (a plain "ignore::FutureWarning" mark overrides pyproject's errors).
NOT_OURS = r"(?!(loramix|tests)(\.|$))"
IGNORE_UPSTREAM_DEPRECATIONS = (f"ignore::FutureWarning:{NOT_OURS}", f"ignore::DeprecationWarning:{NOT_OURS}")

_original_warn = warnings.warn


def _module(frame) -> str:
    return frame.f_globals.get("__name__", "") if frame is not None else ""


def _reattributed_warn(message, category=None, stacklevel=1, source=None, **kwargs):
    kind = type(message) if isinstance(message, Warning) else (category or UserWarning)
    if issubclass(kind, (DeprecationWarning, FutureWarning)) and not kwargs:  # kwargs: skip_file_prefixes (3.12)
        warner = sys._getframe(1)
        if _module(warner).partition(".")[0] in UPSTREAM:
            stacklevel = max(stacklevel, 2)
            try:
                frame = sys._getframe(stacklevel)
            except ValueError:  # fewer frames than that: warnings attributes it to "sys"
                frame = None
            while frame is not None and (_module(frame) in FORWARDING or frame.f_code.co_filename == "<string>"):
                frame, stacklevel = frame.f_back, stacklevel + 1
    return _original_warn(message, category, stacklevel + 1, source, **kwargs)


def install() -> None:
    """Route ``warnings.warn`` through the re-attribution (idempotent)."""
    warnings.warn = _reattributed_warn
