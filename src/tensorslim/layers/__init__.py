"""Structured layers: each replaces one dense layer (Linear, Conv1d, Conv2d, …)."""

from tensorslim.layers.attention import LowRankMultiheadAttention
from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.cp import CPConv2d
from tensorslim.layers.debut import DeButConv2d, DeButLinear
from tensorslim.layers.debut_chain import DeButChain, DeButFactor
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear
from tensorslim.layers.lowrank_conv1d import LowRankConv1d
from tensorslim.layers.recurrent import LowRankRNN
from tensorslim.layers.sparse import SparseConv2d, SparseLinear, WeightMask
from tensorslim.layers.svd import SVDConv2d, SVDLinear
from tensorslim.layers.tt import TTLinear
from tensorslim.layers.tucker import TuckerConv2d

__all__ = [
    "CPConv2d",
    "DeButChain",
    "DeButConv2d",
    "DeButFactor",
    "DeButLinear",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankMultiheadAttention",
    "LowRankRNN",
    "SVDConv2d",
    "SVDLinear",
    "SparseConv2d",
    "SparseLinear",
    "StructuredLayer",
    "TTLinear",
    "TuckerConv2d",
    "WeightMask",
]
