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


@dataclass
class Tucker2Bases:
    """The full HOSVD of a kernel on modes (0, 1): X = core ×₀ U₀ ×₁ U₁ with U₀ (I₀ × I₀) and
    U₁ (I₁ × I₁) orthogonal, columns ordered by singular value; ``norm2`` = ‖X‖².

    Every truncated HOSVD is a slice of it: ranks (r₀, r₁) keep U₀[:, :r₀], U₁[:, :r₁] and the
    core block [:r₀, :r₁] — exactly what :func:`partial_tucker` computes at those ranks.
    """

    u0: torch.Tensor
    u1: torch.Tensor
    core: torch.Tensor
    norm2: float

    def truncate(self, rank_out: int, rank_in: int) -> TuckerResult:
        """The truncated HOSVD at (``rank_out``, ``rank_in``)."""
        _check_ranks(self.core.shape, (0, 1), (rank_out, rank_in))
        core = self.core[:rank_out, :rank_in].clone()
        kept = float((core * core).sum())
        err = math.sqrt(max(self.norm2 - kept, 0.0) / self.norm2) if self.norm2 > 0 else 0.0
        factors = [self.u0[:, :rank_out].clone(), self.u1[:, :rank_in].clone()]
        return TuckerResult(core, factors, (0, 1), err)


def tucker2_bases(kernel: torch.Tensor) -> Tucker2Bases:
    """Full HOSVD bases and core of ``kernel`` on modes (0, 1): two Gram eigendecompositions
    and one projection (float64)."""
    x = kernel.detach().to(device="cpu", dtype=torch.float64)
    if x.ndim < 2:
        raise TensorslimError(f"Tucker-2 needs a tensor with ≥ 2 modes, got {tuple(x.shape)}")
    u0 = leading_left_singular(unfolding(x, 0))[0]
    u1 = leading_left_singular(unfolding(x, 1))[0]
    core = mode_product(mode_product(x, u0.T, 0), u1.T, 1)
    return Tucker2Bases(u0, u1, core, float((x * x).sum()))


def tucker2_error_table(kernel: torch.Tensor | Tucker2Bases) -> torch.Tensor:
    """HOSVD relative errors of Tucker-2 on modes (0, 1) for every rank pair.

    Returns E of shape (I₀ + 1, I₁ + 1) with E[r₀, r₁] = ‖X − X̂_{r₀,r₁}‖/‖X‖ for the truncated
    HOSVD at ranks (r₀, r₁) (row/column 0 mean rank 0, error 1). Cost: two Gram
    eigendecompositions and one projection of X — the same as a single decomposition (none
    when given the :class:`Tucker2Bases`).
    """
    bases = kernel if isinstance(kernel, Tucker2Bases) else tucker2_bases(kernel)
    core = bases.core
    energy = (core * core).reshape(core.shape[0], core.shape[1], -1).sum(-1)
    kept = torch.zeros(energy.shape[0] + 1, energy.shape[1] + 1, dtype=torch.float64)
    kept[1:, 1:] = energy.cumsum(0).cumsum(1)
    if bases.norm2 == 0.0:
        return torch.zeros_like(kept)
    return ((bases.norm2 - kept).clamp_min(0) / bases.norm2).sqrt()


def tucker2_output_error_table(
    bases: Tucker2Bases, gram: torch.Tensor, chunk_entries: int = 1 << 22
) -> torch.Tensor:
    """Relative output errors ‖(W − Ŵ_{r₀,r₁})X‖/‖WX‖ of every truncated HOSVD, from the input
    Gram G = XᵀX over the kernel's unfolded patches (order (c, kh, kw)); shape (I₀+1, I₁+1).

    With Δ = U₀ D ×₁ U₁ (D = the core with its kept block zeroed) and U₀ orthogonal,
    tr(Δ G Δᵀ) = tr(D G' Dᵀ), G' = G rotated into U₁'s basis on the channel index. Per core row i,
    B_i[j, k] = Σ_{t,u} C[i,j,t] G'[j,t,k,u] C[i,k,u] and its tail sums S_i(r₁) = Σ_{j,k≥r₁}
    B_i[j,k] give E(r₀, r₁) = Σ_{i<r₀} S_i(r₁) + Σ_{i≥r₀} S_i(0) for all pairs at the cost of
    one quadratic form. Rows are processed in chunks of ≤ ``chunk_entries`` intermediate entries.
    """
    core = bases.core
    n, c = core.shape[:2]
    s = core[0, 0].numel()
    flat = core.reshape(n, c, s)
    g = gram.detach().to(dtype=torch.float64).reshape(c, s, c, s)
    rotated = torch.einsum("aj,atbu,bk->jtku", bases.u1, g, bases.u1)
    step = max(1, chunk_entries // (c * c * s))
    tails = []
    for lo in range(0, n, step):
        part = flat[lo : lo + step]
        mixed = torch.einsum("ijt,jtku->ijku", part, rotated)
        block = torch.einsum("ijku,iku->ijk", mixed, part)  # B_i[j, k]
        tail = block.flip(1).flip(2).cumsum(1).cumsum(2).flip(1).flip(2)
        tails.append(tail.diagonal(dim1=1, dim2=2))  # S_i(r₁) for r₁ = 0 … c − 1
        del mixed, block, tail
    per_row = torch.cat(tails)  # (n, c)
    per_row = torch.cat([per_row, per_row.new_zeros(n, 1)], dim=1)  # S_i(c) = 0
    total = float(per_row[:, 0].sum())
    if total <= 0.0:
        return torch.zeros(n + 1, c + 1, dtype=torch.float64)
    head = torch.cat([per_row.new_zeros(1, c + 1), per_row.cumsum(0)])  # Σ_{i<r₀} S_i(r₁)
    rest = total - torch.cat([per_row.new_zeros(1), per_row[:, 0].cumsum(0)])  # Σ_{i≥r₀} S_i(0)
    return ((head + rest[:, None]).clamp_min(0.0) / total).sqrt()
