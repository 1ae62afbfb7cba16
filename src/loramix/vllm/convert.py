"""A saved loramix adapter in the form vLLM's LoRA machinery serves: LoRA matrices plus gates.

vLLM computes every LoRA of a batch as ``shrink`` (``buffer = x A^T``, float32, one row per token) then
``expand`` (``out += buffer B^T``), each token with its request's adapter slot. A loramix method is servable when
it fits that form exactly once a gate multiplies the buffer between the two (:mod:`loramix.vllm.gates`). Each
method says how in its own package: its :class:`~loramix.method.Method` names a served-form module
(``Method.served_form``, e.g. ``loramix/mor/served.py``), which provides

* ``check_config(config: dict) -> list[str]``: the settings of ``adapter_config.json`` that the served form does
  not reproduce exactly (each names the setting and why); empty if none;
* ``served_rank(config: dict) -> tuple[int, str]``: the LoRA rank vLLM must hold for the adapter
  (``--max-lora-rank``), and what it is made of when it is not just ``r`` (else ``""``);
* ``ROUTES_ON_PROMPT: bool``: whether its gates are computed once from the request's whole prompt
  (:class:`~loramix.vllm.gates.PromptGate`), which the engine must then prefill in one step, from its first token;
* ``convert(config: dict, tensors: dict[str, Tensor], hf_config) -> ServedAdapter``: the served form of the
  adapter's float32 ``tensors``, with ``hf_config`` the base model's ``transformers`` config.

The shared code here reads the adapter directory, checks what is common to all methods (``modules_to_save``, the
weights' checksum) and hands the rest to the method's served form. Nothing here imports vLLM: the output is
PEFT-LoRA-named tensors (which vLLM's own loader packs into its fused modules) and the gates, keyed by the base
model's module names.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from loramix._tuner.config import LORAMIX_FORMAT
from loramix._tuner.saving import resolve_weights
from loramix.method import method_of
from loramix.vllm.gates import Gate, PromptRouter

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PEFT_PREFIX = "base_model.model."


class UnservableAdapter(ValueError):
    """A loramix adapter that vLLM cannot serve exactly; the message names what and why."""


@dataclass
class ServedAdapter:
    """A converted adapter: ``tensors`` in PEFT LoRA naming, the ``rank`` vLLM must hold, the gates.

    ``gates`` maps a base-model module name to its :class:`~loramix.vllm.gates.Gate` (a module without one is
    a plain LoRA); ``routers`` maps a block index to the router that computes the routing its
    :class:`~loramix.vllm.gates.PromptGate` s read (prompt-routed methods only).
    """

    method: str  # the adapter's peft_type ("MOR")
    rank: int
    tensors: dict[str, torch.Tensor]
    gates: dict[str, Gate] = field(default_factory=dict)
    routers: dict[int, PromptRouter] = field(default_factory=dict)


def read_config(path: str) -> dict | None:
    """The adapter's ``adapter_config.json`` if it is an adapter of a loramix method with a served form, else None."""
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    method = method_of(config.get("peft_type"))
    return config if method is not None and method.served_form is not None else None


def served_form(config: dict) -> ModuleType:
    """The served-form module of the adapter's method (``Method.served_form``), imported on first use."""
    return importlib.import_module(method_of(config["peft_type"]).served_form)


def check_config(config: dict) -> None:
    """Refuse the settings the served form does not reproduce exactly (message names the setting)."""
    saved_format = config.get("loramix_format", 1)
    if isinstance(saved_format, int) and saved_format > LORAMIX_FORMAT:
        raise UnservableAdapter(
            f"This adapter was saved by a newer loramix (adapter format {saved_format}; this installation reads "
            f"format {LORAMIX_FORMAT}). Upgrade loramix: `pip install -U loramix`."
        )
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"`modules_to_save`={config['modules_to_save']} (vLLM LoRA serves no fully trained modules)")
    problems += served_form(config).check_config(config)
    if problems:
        raise UnservableAdapter(
            f"This {config['peft_type']} adapter cannot be served by vLLM exactly: " + "; ".join(problems) + ". "
            "Serve it with transformers (PeftModel.generate) instead."
        )


@functools.lru_cache(maxsize=256)
def _checked_weights(path: str, weights_sha256: str | None, stamp: tuple) -> str | None:
    return resolve_weights(path, weights_sha256)


def check_weights(path: str, config: dict) -> None:
    """Raise if the weights in ``path`` do not belong to ``config`` (``weights_sha256``); hashed once per file
    version (size and modification time), so a server can check on every request."""
    stamps = tuple(
        (name, st.st_size, st.st_mtime_ns)
        for name in ("adapter_model.safetensors", "adapter_model.bin")
        if os.path.isfile(os.path.join(path, name)) and (st := os.stat(os.path.join(path, name)))
    )
    _checked_weights(path, config.get("weights_sha256"), stamps)


def load_tensors(path: str, config: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors, float32, after checking they belong to its config (``weights_sha256``)."""
    weights = resolve_weights(path, config.get("weights_sha256"))
    if weights is None:
        raise FileNotFoundError(f"{path} has no adapter_model.safetensors or adapter_model.bin")
    if weights.endswith(".safetensors"):
        tensors = load_file(weights)
    else:
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in tensors.items()}


def by_module(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {parameter: tensor}}`` for the keys ``base_model.model.<module>.<prefix><parameter>``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    pattern = re.compile(rf"^{re.escape(PEFT_PREFIX)}(.+)\.{re.escape(prefix)}(\w+)$")
    for key, tensor in tensors.items():
        match = pattern.match(key)
        if match is None:
            raise UnservableAdapter(f"Unexpected tensor '{key}' in the adapter checkpoint; nothing was loaded.")
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    return modules


def lora_keys(module: str) -> tuple[str, str]:
    """The PEFT LoRA names of ``module``'s served ``A`` and ``B``."""
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def convert(path: str, hf_config: PretrainedConfig) -> ServedAdapter | None:
    """The served form of the loramix adapter saved in ``path``, or None if ``path`` holds no loramix adapter."""
    config = read_config(path)
    if config is None:
        return None
    check_config(config)
    tensors = load_tensors(path, config)
    return served_form(config).convert(config, tensors, hf_config)
