"""Behaviour every loramix tuner (``BaseTuner`` subclass) shares; mix in before ``BaseTuner``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._loading import check_adapter_state_dict
from .routing import generation_routing, install_session_hooks, remove_session_hooks


def reject_mixed_adapter_batches(kwargs: dict[str, Any]) -> None:
    """PEFT's ``adapter_names=[...]`` (a different adapter per row) is LoRA-only; PeftModel strips the
    argument before the model sees it, so without this check it would be silently ignored."""
    if kwargs.get("adapter_names") is not None:
        raise ValueError(
            "`adapter_names` (mixed-adapter batches) is not supported by loramix methods: each row would silently "
            "use the active adapter. Run one adapter per batch with `set_adapter`."
        )


class LoramixTunerMixin:
    """Routing sessions on the adapted model (:mod:`loramix.routing`), strict adapter loading, and refusal of
    unsupported PEFT forward arguments."""

    prefix: str

    def inject_adapter(self, model, adapter_name: str, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, **kwargs)
        install_session_hooks(model)  # also on transformers' load_adapter path, which keeps no tuner

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        remove_session_hooks(model)
        return model

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            check_adapter_state_dict(model, adapter_name, remapped, cls.prefix)
        except ValueError:
            # PEFT has already created the adapter's layers: remove them so that no adapter with random
            # weights stays behind (load_adapter of a second adapter into a model in use).
            peft_config = getattr(model, "peft_config", {})
            if adapter_name in peft_config and len(peft_config) > 1 and hasattr(model, "delete_adapter"):
                model.delete_adapter(adapter_name)
            raise
        return remapped

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Every ``PeftModel`` (with or without ``task_type``) wraps ``forward`` and ``generate`` in this context.

        Its forwards reuse the routing of the first one (:func:`~loramix.routing.generation_routing`): a
        ``generate`` routes once, on the prompt, with the KV cache on or off, greedy, sampling, beam search
        (transformers repeats each prompt for its beams before the first step, so beams share its routing)
        and ``num_return_sequences``; a plain forward is one forward.
        """
        reject_mixed_adapter_batches(kwargs)
        with generation_routing():
            yield
