"""Tucker decomposition on selected modes (Tucker-2 for conv kernels): HOSVD and HOOI.

A tensor X is approximated by projecting chosen modes onto orthonormal bases:

    X ≈ X̂ = G ×_{m₁} U_{m₁} ×_{m₂} U_{m₂} …,     G = X ×_{m₁} U_{m₁}ᵀ ×_{m₂} U_{m₂}ᵀ …

with U_m of shape (I_m, R_m), UᵀU = I. For a conv kernel K (n, c, kh, kw), Tucker-2 on modes
(0, 1) gives U₀ (n × R_out), U₁ (c × R_in) and a core G (R_out, R_in, kh, kw) (Kim et al. 2016).

Because the projections are orthogonal, ‖X − X̂‖² = ‖X‖² − ‖G‖² exactly. With the *full*
HOSVD bases (all singular vectors, ordered by singular value), the core of the truncated HOSVD at
ranks (r₀, r₁) is the leading block G_full[:r₀, :r₁], so the HOSVD error of every rank pair
comes from one 2-D cumulative sum of G_full² (:func:`tucker2_error_table`).

HOSVD takes U_m = leading left singular vectors of the mode-m unfolding X_(m). HOOI (higher-order
orthogonal iteration, De Lathauwer et al. 2000) then alternates U_m ← leading left singular
vectors of (X ×_{k≠m} U_kᵀ)_(m); each step can only lower the error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tensorslim.errors import TensorslimError


@dataclass
class TuckerResult:
    """X ≈ core ×_{modes[i]} factors[i]; ``rel_error`` = ‖X − X̂‖_F / ‖X‖_F."""

    core: torch.Tensor
    factors: list[torch.Tensor]
    modes: tuple[int, ...]
    rel_error: float
    hooi_iters: int = 0

    def to_tensor(self) -> torch.Tensor:
        """The reconstruction X̂ (same shape as the decomposed tensor)."""
        out = self.core
        for mode, u in zip(self.modes, self.factors, strict=True):
            out = mode_product(out, u, mode)
        return out


def mode_product(x: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """x ×_mode matrix: contracts x's ``mode`` (size J) with matrix (I × J) → size I there."""
    moved = x.movedim(mode, 0)
    shape = moved.shape
    out = matrix @ moved.reshape(shape[0], -1)
    return out.reshape(matrix.shape[0], *shape[1:]).movedim(0, mode)


def unfolding(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding X_(mode): shape (I_mode, Π_{k≠mode} I_k)."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def leading_left_singular(
    matrix: torch.Tensor, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading left singular vectors U (m × r) and singular values (r) of a (m × n) matrix.

    Computed from the eigendecomposition of the m × m Gram matrix A Aᵀ, which is far cheaper than
    an SVD of a wide unfolding (m ≪ n for conv kernels) and accurate for the leading subspace.
    Singular values below √(machine ε)·σ_max are not resolved this way; they only matter for the
    ordering of directions that carry no energy. With ``rank=None`` all m vectors are returned
    (a full orthonormal basis, so truncation at full rank is exact).
    """
    m = matrix.shape[0]
    r = m if rank is None else rank
    if not 1 <= r <= m:
        raise TensorslimError(f"rank {r} is impossible for a mode of size {m} (1..{m})")
    gram = matrix @ matrix.T
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)[:r]
    return evecs[:, order], evals[order].clamp_min(0).sqrt()


def _check_ranks(shape: Sequence[int], modes: Sequence[int], ranks: Sequence[int]) -> None:
    if len(modes) != len(ranks):
        raise TensorslimError(f"Tucker: {len(ranks)} ranks for {len(modes)} modes {tuple(modes)}")
    if len(set(modes)) != len(modes) or any(not 0 <= m < len(shape) for m in modes):
        raise TensorslimError(f"Tucker: bad modes {tuple(modes)} for shape {tuple(shape)}")
    for mode, rank in zip(modes, ranks, strict=True):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= shape[mode]:
            raise TensorslimError(
                f"Tucker rank {rank!r} is impossible for mode {mode} of size {shape[mode]} "
                f"(choose 1..{shape[mode]})"
            )


def partial_tucker(
    tensor: torch.Tensor,
    ranks: Sequence[int],
    modes: Sequence[int] = (0, 1),
    hooi_iters: int = 0,
    tol: float = 1e-7,
    dtype: torch.dtype = torch.float64,
) -> TuckerResult:
    """Truncated HOSVD of ``tensor`` on ``modes`` at ``ranks``, then ≤ ``hooi_iters`` HOOI sweeps.

    HOOI stops early when a sweep lowers the relative error by less than ``tol``. The factors
    are orthonormal; the core is X projected onto them.
    """
    x = tensor.detach().to(device="cpu", dtype=dtype)
    modes, ranks = tuple(int(m) for m in modes), tuple(ranks)
    _check_ranks(x.shape, modes, ranks)
    if hooi_iters < 0:
        raise TensorslimError(f"hooi_iters must be ≥ 0, got {hooi_iters}")
    norm2 = float((x * x).sum())
    factors = [
        leading_left_singular(unfolding(x, m), r)[0] for m, r in zip(modes, ranks, strict=True)
    ]

    def project(skip: int | None) -> torch.Tensor:
        out = x
        for i, (mode, u) in enumerate(zip(modes, factors, strict=True)):
            if i != skip:
                out = mode_product(out, u.T, mode)
        return out

    def error(core: torch.Tensor) -> float:
        if norm2 == 0.0:
            return 0.0
        return math.sqrt(max(norm2 - float((core * core).sum()), 0.0) / norm2)

    core = project(None)
    err = error(core)
    done = 0
    for _ in range(hooi_iters):
        for i, (mode, rank) in enumerate(zip(modes, ranks, strict=True)):
            partial = project(i)
            factors[i] = leading_left_singular(unfolding(partial, mode), rank)[0]
        core = project(None)
        new_err = error(core)
        done += 1
        improved = err - new_err
        err = min(err, new_err)
        if improved < tol:
            break
    return TuckerResult(core, factors, modes, err, done)


def tucker2_error_table(kernel: torch.Tensor) -> torch.Tensor:
    """HOSVD relative errors of Tucker-2 on modes (0, 1) for every rank pair.

    Returns E of shape (I₀ + 1, I₁ + 1) with E[r₀, r₁] = ‖X − X̂_{r₀,r₁}‖/‖X‖ for the truncated
    HOSVD at ranks (r₀, r₁) (row/column 0 mean rank 0, error 1). Cost: two Gram
    eigendecompositions and one projection of X — the same as a single decomposition.
    """
    x = kernel.detach().to(device="cpu", dtype=torch.float64)
    if x.ndim < 2:
        raise TensorslimError(f"Tucker-2 needs a tensor with ≥ 2 modes, got {tuple(x.shape)}")
    u0 = leading_left_singular(unfolding(x, 0))[0]
    u1 = leading_left_singular(unfolding(x, 1))[0]
    core = mode_product(mode_product(x, u0.T, 0), u1.T, 1)
    energy = (core * core).reshape(core.shape[0], core.shape[1], -1).sum(-1)
    kept = torch.zeros(energy.shape[0] + 1, energy.shape[1] + 1, dtype=torch.float64)
    kept[1:, 1:] = energy.cumsum(0).cumsum(1)
    total = float((x * x).sum())
    if total == 0.0:
        return torch.zeros_like(kept)
    return ((total - kept).clamp_min(0) / total).sqrt()
