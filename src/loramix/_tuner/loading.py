"""Strict adapter loading for loramix tuners: every adapter tensor present, known and of the right shape.

PEFT loads an adapter with ``load_state_dict(strict=False)`` and only *warns* about missing keys, so
an adapter saved for another base model or another config could come back partly random. loramix
tuners refuse instead: ``loramix._tuner.tuner.LoramixTunerMixin`` runs this check in
``_remap_adapter_state_dict_for_load``, the hook PEFT calls on every ``PeftModel.from_pretrained`` /
``load_adapter`` before loading the weights, whichever file they come from (``adapter_model.safetensors``,
or ``adapter_model.bin`` read with ``torch.load(weights_only=True)``). transformers' ``model.load_adapter``
calls no tuner hook; ``loramix/_compat/transformers.py`` makes that path strict.
"""

from __future__ import annotations

import torch

from loramix._compat.peft import adapter_tensors

_SHOWN = 5


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def check_adapter_state_dict(
    model: torch.nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor], prefix: str
) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped adapter tensor.

    ``state_dict`` is the checkpoint already remapped to the model's keys; ``prefix`` is the method's
    parameter prefix (``"mor_"``), used to recognise adapter tensors the model has no place for.
    """
    model_state = model.state_dict()
    expected = adapter_tensors(model, adapter_name, model_state)
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected and f".{prefix}" in k and k not in model_state)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) with another shape: {_listing(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} adapter tensor(s) missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensor(s) the model has no place for: {_listing(unexpected)}")
    raise ValueError(
        f"The adapter checkpoint (adapter_model.safetensors or .bin) does not fit adapter '{adapter_name}' of this "
        "model; nothing was loaded. It was probably saved for another base model, another config (r, num_experts, "
        "target_modules, ...) or another method. " + "; ".join(problems) + "."
    )
