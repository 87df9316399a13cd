"""Structured layers: each replaces one dense Linear or Conv2d."""

from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear

__all__ = ["LowRankConv2d", "LowRankLinear", "StructuredLayer"]
