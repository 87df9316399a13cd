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
    """Smallest k whose kept energy Σ_{i≤k} σᵢ² reaches ``keep`` · Σ σᵢ² (keep in (0, 1]).

    Equivalently the smallest k whose dropped energy Σ_{i>k} σᵢ² is at most (1 − keep) · Σ σᵢ².
    Singular values at or below the numerical noise floor of an SVD, R·ε·σ₁ (R values, ε of
    float64; the tolerance of ``numpy.linalg.matrix_rank``), count as zero; every other value is
    energy. So ``keep=1.0`` keeps the numerical rank: a small but real σ is never dropped.
    """
    if not 0 < keep <= 1:
        raise TensorslimError(f"energy to keep must be in (0, 1], got {keep}")
    s = singular_values.detach().double().flatten().abs()
    energy = s**2
    total = float(energy.sum())
    if total <= 0:
        return 1
    noise = s.numel() * torch.finfo(torch.float64).eps * float(s.max())
    signal = torch.where(s > noise, energy, torch.zeros_like(energy))
    # summed from the small end: exactly 0 past the last value above the noise floor
    tail = torch.flip(torch.cumsum(torch.flip(signal, [0]), 0), [0])  # tail[j] = Σ_{i≥j}
    dropped = torch.cat([tail[1:], tail.new_zeros(1)])  # dropped[k−1]: energy lost keeping k
    # relative slack for the rounding of ``keep`` itself (e.g. 1 − e of a computed fraction)
    allowed = (1.0 - keep) * total * (1 + 1e-9)
    return int(torch.nonzero(dropped <= allowed)[0]) + 1
