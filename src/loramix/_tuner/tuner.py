"""Behaviour every loramix tuner (``BaseTuner`` subclass) shares; mix in before ``BaseTuner``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from loramix._compat.peft import auxiliary_modules_per_row
from loramix._compat.transformers import ignore_router_outputs_at_inference, restore_keys_to_ignore_at_inference
from loramix._tuner.loading import check_adapter_state_dict
from loramix._tuner.undo import ModelState
from loramix.routing.mixed_batch import (
    adapters_per_row,
    check_adapter_names,
    check_names_per_input,
    generation_expansions,
)
from loramix.routing.session import (
    Prompt,
    current_session,
    generation_routing,
    install_session_hooks,
    remove_session_hooks,
)


def _row_names(module: nn.Module) -> tuple[str, ...] | None:
    """The adapter of each row of the forward now running, for PEFT's trainable-module wrappers."""
    session = current_session()
    if session is None:  # e.g. T5's encoder, which generate runs by itself: the rows cannot be matched
        raise RuntimeError(
            f"loramix: PEFT's {type(module).__name__} ran outside a forward of the adapted model during a call with "
            "`adapter_names` (e.g. in the encoder of an encoder-decoder model, which `generate` calls by itself), so "
            "its rows cannot be matched to their adapters; run one adapter per batch with `set_adapter`."
        )
    return None if session.rows is None else session.rows.names


class LoramixTunerMixin:
    """Routing sessions on the adapted model (:mod:`loramix.routing.session`), strict adapter loading, mixed-adapter
    batches (:mod:`loramix.routing.mixed_batch`), and refusals that change nothing.

    Every refusal is decided before anything changes: merging checks all the adapters it would merge
    (:meth:`_check_merge`), ``set_adapter`` all the names, and adding an adapter that fails part-way puts
    the model back as it was (:class:`~loramix._tuner.undo.ModelState`). Failed loads are undone by the loading
    entry points (``loramix/_compat/peft.py``, ``loramix/_compat/transformers.py``), which know whether the adapter is new.
    """

    prefix: str
    target_module_mapping: dict[str, list[str]]  # model_type -> default target_modules
    linear_cls: type  # the method's tuner layer for an nn.Linear, built as linear_cls(target, adapter_name, config)

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        """Default ``target_modules`` from :attr:`target_module_mapping` by ``model_type``; a clear error without."""
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                linear_names = sorted(
                    {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
                )
                raise ValueError(
                    f"{type(peft_config).__name__}.target_modules is not set and loramix has no default target modules "
                    f"of this method for model_type={model_type!r}. Set `target_modules` to the nn.Linear names to "
                    f"adapt; this model's linear layers are named: {linear_names}."
                )
            peft_config.target_modules = set(self.target_module_mapping[model_type])
        return peft_config

    def _create_and_replace(
        self,
        peft_config,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        """Add ``adapter_name`` to a layer that has the method's adapters, or replace an ``nn.Linear`` by one."""
        if isinstance(target, self.linear_cls):
            target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
            return
        if self._skip_target(target, target_name, peft_config):
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"{type(peft_config).__name__} can only adapt torch.nn.Linear layers, but target module "
                f"'{current_key}' is a {type(base).__name__}. Remove it from `target_modules`."
            )
        new_module = self.linear_cls(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _skip_target(self, target: nn.Module, target_name: str, peft_config) -> bool:
        """Whether a matched module is left alone by ``_create_and_replace`` (a method's non-linear layers)."""
        return False

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

        Its forwards reuse the routing of the first one (:func:`~loramix.routing.session.generation_routing`): a
        ``generate`` routes once, on the prompt, with the KV cache on or off, greedy, sampling, beam search
        (transformers repeats each prompt for its beams before the first step, so beams share its routing)
        and ``num_return_sequences``; a plain forward is one forward.

        ``adapter_names=[...]`` (PEFT's mixed-adapter batches, :mod:`loramix.routing.mixed_batch`): checked here with
        PEFT's rules, then every forward of the call computes each row with its own adapter (beams and returned
        sequences of a prompt keep its adapter and routing).
        """
        names = kwargs.get("adapter_names")
        prompt = Prompt.of_call(args, kwargs)
        if names is None:
            with generation_routing(prompt):
                yield
            return
        merged = [n for m in self.model.modules() if isinstance(m, BaseTunerLayer) for n in m.merged_adapters]
        names = check_adapter_names(names, list(self.peft_config), self.training, merged)
        check_names_per_input(names, None if prompt is None else prompt.batch)
        expansions = generation_expansions(kwargs, getattr(self.model, "generation_config", None))
        with (
            generation_routing(prompt),
            adapters_per_row(names, expansions),
            auxiliary_modules_per_row(self.model, _row_names),
        ):
            yield
