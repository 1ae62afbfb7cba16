"""MoR — Mixture of Ranks (Tang et al., arXiv 2410.13408)."""

from loramix.mor.config import MoRConfig
from loramix.mor.layer import Linear, MoRLayer
from loramix.mor.model import MoRModel

__all__ = ["Linear", "MoRConfig", "MoRLayer", "MoRModel"]
