"""Rank selection: per-layer rules and the global budget allocator."""

from tensorslim.rank.allocate import allocate
from tensorslim.rank.budget import Budget
from tensorslim.rank.select import (
    energy_kept,
    rank_from_energy,
    rank_from_ratio,
    validate_fixed_rank,
)

__all__ = [
    "Budget",
    "allocate",
    "energy_kept",
    "rank_from_energy",
    "rank_from_ratio",
    "validate_fixed_rank",
]
