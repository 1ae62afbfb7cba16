"""Behaviour every loramix tuner (``BaseTuner`` subclass) shares; mix in before ``BaseTuner``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from ._loading import check_adapter_state_dict
from ._outputs import ignore_router_outputs_at_inference, restore_keys_to_ignore_at_inference
from ._registration import auxiliary_row_adapters
from ._undo import ModelState
from .mixed_batch import adapters_per_row, check_adapter_names, generation_expansions
from .routing import current_session, generation_routing, install_session_hooks, remove_session_hooks


def _auxiliary_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """PEFT's ``modules_to_save`` / trainable-token wrappers take the row adapters as ``adapter_names``."""
    session = current_session()
    if session is None:  # e.g. T5's encoder, which generate runs by itself: the rows cannot be matched
        raise RuntimeError(
            f"loramix: PEFT's {type(module).__name__} ran outside a forward of the adapted model during a call with "
            "`adapter_names` (e.g. in the encoder of an encoder-decoder model, which `generate` calls by itself), so "
            "its rows cannot be matched to their adapters; run one adapter per batch with `set_adapter`."
        )
    if session.rows is not None:
        kwargs["adapter_names"] = auxiliary_row_adapters(module, session.rows.names)
    return args, kwargs


@contextmanager
def _auxiliary_modules_per_row(model: nn.Module) -> Iterator[None]:
    handles = [
        module.register_forward_pre_hook(_auxiliary_pre_hook, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, AuxiliaryTrainingWrapper)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class LoramixTunerMixin:
    """Routing sessions on the adapted model (:mod:`loramix.routing`), strict adapter loading, mixed-adapter
    batches (:mod:`loramix.mixed_batch`), and refusals that change nothing.

    Every refusal is decided before anything changes: merging checks all the adapters it would merge
    (:meth:`_check_merge`), ``set_adapter`` all the names, and adding an adapter that fails part-way puts
    the model back as it was (:class:`~loramix._undo.ModelState`). Failed loads are undone by the loading
    entry points (``loramix/_registration.py``), which know whether the adapter is new.
    """

    prefix: str

    def inject_adapter(self, model, adapter_name: str, **kwargs: Any) -> None:
        state = ModelState(self, model)
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
            self._finish_injection(model, adapter_name, low_cpu_mem_usage=kwargs.get("low_cpu_mem_usage", False))
            install_session_hooks(model)  # also on transformers' load_adapter path, which keeps no tuner
            ignore_router_outputs_at_inference(getattr(model, "config", None))  # Trainer's predictions: logits
        except BaseException:
            state.restore()
            raise

    def _finish_injection(self, model, adapter_name: str, low_cpu_mem_usage: bool = False) -> None:
        """Method-specific injection after PEFT's (MiLoRA: the routers); undone with it if it fails."""

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"Adapter(s) {unknown} not found; this model has {list(self.peft_config)}. Nothing was changed."
            )
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None
    ):
        if merge:
            self._check_merge(adapter_names)
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        remove_session_hooks(model)
        restore_keys_to_ignore_at_inference(getattr(model, "config", None))
        return model

    def _check_merge(self, adapter_names: list[str] | None) -> None:
        """Raise, before any weight changes, if any adapter that would be merged cannot be (the named ones, or
        the active ones when ``adapter_names`` is None)."""
        names = list(self.active_adapters) if adapter_names is None else adapter_names
        if isinstance(names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {names!r}.")
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"Cannot merge adapter(s) {unknown}: not found; this model has {list(self.peft_config)}. "
                "Nothing was merged."
            )
        self._refuse_merge(list(names))

    def _refuse_merge(self, adapter_names: list[str]) -> None:
        """Raise ``ValueError`` if any of ``adapter_names`` cannot be merged into every layer it adapts."""

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # Raises before any weight is loaded; the loading entry point undoes the adapter it created, if any.
        check_adapter_state_dict(model, adapter_name, remapped, cls.prefix)
        return remapped

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Every ``PeftModel`` (with or without ``task_type``) wraps ``forward`` and ``generate`` in this context.

        Its forwards reuse the routing of the first one (:func:`~loramix.routing.generation_routing`): a
        ``generate`` routes once, on the prompt, with the KV cache on or off, greedy, sampling, beam search
        (transformers repeats each prompt for its beams before the first step, so beams share its routing)
        and ``num_return_sequences``; a plain forward is one forward.

        ``adapter_names=[...]`` (PEFT's mixed-adapter batches, :mod:`loramix.mixed_batch`): checked here with
        PEFT's rules, then every forward of the call computes each row with its own adapter (beams and returned
        sequences of a prompt keep its adapter and routing).
        """
        names = kwargs.get("adapter_names")
        if names is None:
            with generation_routing():
                yield
            return
        merged = [n for m in self.model.modules() if isinstance(m, BaseTunerLayer) for n in m.merged_adapters]
        names = check_adapter_names(names, list(self.peft_config), self.training, merged)
        expansions = generation_expansions(kwargs, getattr(self.model, "generation_config", None))
        with generation_routing(), adapters_per_row(names, expansions), _auxiliary_modules_per_row(self.model):
            yield
