"""The loramix methods under test, with small configs for tiny models; MiLoRA joins once registered."""

from __future__ import annotations

from loramix import MoRConfig

# method name -> (config factory taking overrides, parameter prefix)
METHODS = {"mor": (lambda **kw: MoRConfig(**{"r": 4, "num_experts": 3, "task_type": "CAUSAL_LM", **kw}), "mor_")}
try:
    from loramix import MiLoRAConfig

    METHODS["milora"] = (lambda **kw: MiLoRAConfig(**{"r": 4, "top_k": 2, "task_type": "CAUSAL_LM", **kw}), "milora_")
except ImportError:  # pragma: no cover - until MiLoRA lands
    pass
