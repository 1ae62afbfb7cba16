"""MoR — Mixture of Ranks (Tang et al., arXiv 2410.13408)."""

from .config import MoRConfig
from .layer import Linear, MoRLayer
from .model import MoRModel

__all__ = ["Linear", "MoRConfig", "MoRLayer", "MoRModel"]
