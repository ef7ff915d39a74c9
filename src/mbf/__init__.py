"""mbf: the mini-block Fisher optimizer for PyTorch (Bahamou, Goldfarb & Ren, AISTATS 2023)."""

from .blocks import BlockLayout
from .layers import LayerRule, UnitSpec, register_layer
from .optimizer import DEFAULTS, MBF, PAPER

__all__ = ["DEFAULTS", "MBF", "PAPER", "BlockLayout", "LayerRule", "UnitSpec", "register_layer"]
__version__ = "0.1.0"
"""The package version: the one place it is set (the build reads it from here)."""
