"""Energy pruning of singular values, and the search of the energy threshold for a FLOPs budget.

Energy pruning (Yang et al. 2020): for one layer with singular values s₁ ≥ … ≥ s_R, remove the
largest set K of singular values whose energy is at most a fraction e of the layer's,

    Σ_{j∈K} s_j² ≤ e · Σ_i s_i²,

i.e. drop the smallest values while their cumulative energy stays ≤ e; at least one value is
always kept. Keeping rank k is the same as keeping energy ≥ 1 − e, so this is the foundation's
``rank_from_energy(s, keep=1 − e)``.

The number of values kept per layer only changes at the thresholds e = 1 − kept(k) (kept(k) the
energy fraction of the top k), so a FLOPs target is met exactly by bisection over the sorted
union of those thresholds: the model's FLOPs are a non-increasing step function of e.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch

from tensorslim.errors import TensorslimError
from tensorslim.rank.select import energy_kept, rank_from_energy


def check_energy(energy: float) -> float:
    """``energy`` (the fraction of Σs² that may be removed) must be in [0, 1)."""
    if isinstance(energy, bool) or not isinstance(energy, int | float) or math.isnan(energy):
        raise TensorslimError(f"energy must be a number in [0, 1), got {energy!r}")
    if not 0 <= energy < 1:
        raise TensorslimError(
            f"energy {energy} is outside [0, 1): it is the fraction of Σs² pruning may remove "
            "(e.g. 0.05)"
        )
    return float(energy)


def _sorted_magnitudes(singular_values: torch.Tensor, what: str) -> torch.Tensor:
    s = singular_values.detach().double().abs().flatten()
    if s.numel() == 0:
        raise TensorslimError(f"{what} has no singular values")
    if not bool(torch.isfinite(s).all()):
        raise TensorslimError(f"{what}: singular values contain NaN or Inf")
    return torch.sort(s, descending=True).values


def energy_keep_count(singular_values: torch.Tensor, energy: float, what: str = "layer") -> int:
    """How many singular values survive energy pruning with threshold ``energy`` (≥ 1)."""
    energy = check_energy(energy)
    s = _sorted_magnitudes(singular_values, what)
    if float(s[0]) == 0.0:
        return 1
    return rank_from_energy(s, 1.0 - energy)


def energy_keep_mask(
    singular_values: torch.Tensor, energy: float, what: str = "layer"
) -> torch.Tensor:
    """Boolean mask (same order as ``singular_values``) of the values kept: the largest |s|."""
    k = energy_keep_count(singular_values, energy, what)
    order = torch.argsort(singular_values.detach().abs(), descending=True, stable=True)
    mask = torch.zeros(singular_values.numel(), dtype=torch.bool, device=singular_values.device)
    mask[order[:k]] = True
    return mask


def energy_thresholds(singular_values: torch.Tensor) -> list[float]:
    """The thresholds e at which the kept count of this spectrum changes, ascending.

    Keeping the top k needs e ≥ 1 − kept(k); the list holds those values for k = R−1 … 1.
    """
    s = _sorted_magnitudes(singular_values, "spectrum")
    if float(s[0]) == 0.0:
        return []
    kept = energy_kept(s)
    return sorted({float(1.0 - kept[k - 1]) for k in range(1, s.numel())})


def search_energy(
    spectra: Sequence[torch.Tensor],
    layer_cost: Sequence[Callable[[int], int]],
    fixed_cost: int,
    total_cost: int,
    target_fraction: float,
    metric: str = "flops",
) -> tuple[float, float]:
    """Smallest energy threshold e whose pruned model costs ≤ ``target_fraction`` of the model
    (costs in ``metric``, named in the errors).

    ``layer_cost[i](k)`` is layer i's cost with k singular values kept (already min'ed with its
    dense cost when the layer would be merged back); ``fixed_cost`` is everything else;
    ``total_cost`` is the reference (the original dense model). Returns (e, fraction reached).
    Raises when even rank 1 everywhere stays above the target.
    """
    if not 0 < target_fraction <= 1:
        raise TensorslimError(f"target {metric} fraction must be in (0, 1], got {target_fraction}")
    if total_cost <= 0:
        raise TensorslimError(f"the model's {metric} are zero: nothing to budget")

    def fraction(energy: float) -> float:
        cost = fixed_cost + sum(
            fn(energy_keep_count(s, energy)) for s, fn in zip(spectra, layer_cost, strict=True)
        )
        return cost / total_cost

    candidates = sorted({0.0, *(e for s in spectra for e in energy_thresholds(s) if e < 1.0)})
    # the last candidate leaves every layer at rank 1: the cheapest reachable point
    cheapest = fraction(candidates[-1])
    if cheapest > target_fraction:
        raise TensorslimError(
            f"target {metric} {target_fraction:g} is not reachable by pruning singular values: "
            f"rank 1 in every SVD layer still costs {cheapest:.3f} of the model's {metric} — "
            "raise the target"
        )
    # fraction is non-increasing in e: find the first candidate at or under the target
    index = bisect.bisect_left(
        range(len(candidates)), True, key=lambda i: fraction(candidates[i]) <= target_fraction
    )
    energy = candidates[index]
    return energy, fraction(energy)
