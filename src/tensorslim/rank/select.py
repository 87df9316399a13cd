"""Per-layer rank rules on a spectrum σ₁ ≥ σ₂ ≥ … ≥ σ_R."""

from __future__ import annotations

import math

import torch

from tensorslim.errors import TensorslimError


def validate_fixed_rank(rank: int, full_rank: int, where: str = "layer") -> int:
    """``rank`` itself if 1 ≤ rank ≤ full_rank; else a clear error naming the layer."""
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= full_rank:
        raise TensorslimError(f"rank {rank} is impossible for {where}: choose 1..{full_rank}")
    return rank


def rank_from_ratio(ratio: float, full_rank: int) -> int:
    """⌈ratio · R⌉, at least 1 (ratio in (0, 1])."""
    if not 0 < ratio <= 1:
        raise TensorslimError(f"rank ratio must be in (0, 1], got {ratio}")
    return max(1, math.ceil(ratio * full_rank - 1e-9))


def energy_kept(singular_values: torch.Tensor) -> torch.Tensor:
    """Cumulative kept energy fraction: entry k−1 is Σ_{i≤k} σᵢ² / Σ σᵢ² (rank k kept)."""
    energy = singular_values.double() ** 2
    total = energy.sum()
    if total <= 0:
        return torch.ones_like(energy)
    return torch.cumsum(energy, 0) / total


def rank_from_energy(singular_values: torch.Tensor, keep: float) -> int:
    """Smallest k whose kept energy Σ_{i≤k} σᵢ² reaches ``keep`` · Σ σᵢ² (keep in (0, 1])."""
    if not 0 < keep <= 1:
        raise TensorslimError(f"energy to keep must be in (0, 1], got {keep}")
    kept = energy_kept(singular_values)
    # tolerance so that keep=1.0 is reached despite rounding in the cumulative sum
    k = int(torch.searchsorted(kept, torch.tensor(keep - 1e-12, dtype=kept.dtype))) + 1
    return min(max(1, k), singular_values.numel())
