"""The loramix methods under test, with small configs for tiny models; MiLoRA joins once registered."""

from __future__ import annotations

from loramix import MoRConfig

# method name -> (config factory taking overrides, parameter prefix)
METHODS = {"mor": (lambda **kw: MoRConfig(**{"r": 4, "num_experts": 3, "task_type": "CAUSAL_LM", **kw}), "mor_")}
try:
    from loramix import MiLoRAConfig

    # lora_alpha 8: the default scaling lora_alpha / r = 2 (64 / 32) at r = 4 (64 / 4 = 16 made 3 steps at lr 1e-2
    # overshoot once the default gates put a selected expert at LoRA's scale)
    METHODS["milora"] = (
        lambda **kw: MiLoRAConfig(**{"r": 4, "lora_alpha": 8, "top_k": 2, "task_type": "CAUSAL_LM", **kw}),
        "milora_",
    )
except ImportError:  # pragma: no cover - until MiLoRA lands
    pass
