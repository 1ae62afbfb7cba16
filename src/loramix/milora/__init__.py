"""MiLoRA — Efficient Mixture of Low-Rank Adaptation (Zhang et al., arXiv 2410.18035).

A transformer block's LoRA modules are the experts; one router per block picks ``top_k`` of them
once per prompt and the choice is reused for every generated token. Not the "minor singular
components" MiLoRA (arXiv 2406.09044).
"""

from loramix.milora.config import MiLoRAConfig
from loramix.milora.layer import Linear, MiLoRARouter, MiLoRATunerLayer
from loramix.milora.model import MiLoRAModel

__all__ = ["Linear", "MiLoRAConfig", "MiLoRAModel", "MiLoRARouter", "MiLoRATunerLayer"]
