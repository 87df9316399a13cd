"""Weighted truncated SVD: the numerics shared by ASVD, SVD-LLM and FWSVD.

A weight M (out × d) maps input rows x to M·x. Each data-aware method picks an invertible
row weighting R (out × out, diagonal) and column transform T (d × d) and truncates the SVD of

    M̃ = R · M · T = U Σ Vᵀ,        M̂_r = R⁻¹ U_r Σ_r V_rᵀ T⁻¹,

so the truncation is optimal in the norm ‖R (M − M̂) T‖_F:

- ASVD (Yuan et al. 2023): R = I, T = S = diag(mean|x_j|^α) (per input channel j);
- SVD-LLM (Wang et al. 2024): R = I, T = L, the lower Cholesky factor of the input Gram
  G = XᵀX = L Lᵀ; then ‖(M − M̂)L‖²_F = tr(Δ G Δᵀ) = ‖(M − M̂)Xᵀ‖²_F, so the dropped σ_i² are
  exactly the output error;
- FWSVD (Hsu et al. 2022): R = diag(√(Σ_j F_ij)) from the Fisher diagonal F of the weight, T = I.

The factors are split as √σ into both sides: A = R⁻¹ U_r Σ_r^½ (out × r),
B = T⁻ᵀ V_r Σ_r^½ (d × r), M̂_r = A Bᵀ. All computation is in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensorslim.errors import TensorslimError

# relative ridge steps tried (× tr(G)/d) when the Gram is not positive definite
RIDGE_STEPS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)
# a diagonal weight below this fraction of its largest entry is raised to it (keeps R, S invertible)
MIN_RELATIVE_WEIGHT = 1e-6


@dataclass(frozen=True)
class Weighting:
    """R = diag(``rows``) (None: I) and T = diag(``columns``) or the lower-triangular
    ``cholesky`` (None: I); at most one of ``columns`` and ``cholesky``. ``ridge`` is the
    absolute ridge λ added to the Gram before its Cholesky factorisation (0: none)."""

    rows: torch.Tensor | None = None
    columns: torch.Tensor | None = None
    cholesky: torch.Tensor | None = None
    ridge: float = 0.0

    def transform(self, matrix: torch.Tensor) -> torch.Tensor:
        """R · M · T (float64)."""
        m = matrix.double()
        if self.rows is not None:
            m = self.rows.double()[:, None] * m
        if self.columns is not None:
            m = m * self.columns.double()[None, :]
        if self.cholesky is not None:
            m = m @ self.cholesky.double()
        return m

    def left_back(self, u: torch.Tensor) -> torch.Tensor:
        """R⁻¹ U (out × k)."""
        return u if self.rows is None else u / self.rows.double()[:, None]

    def right_back(self, v: torch.Tensor) -> torch.Tensor:
        """T⁻ᵀ V (d × k): the right singular vectors mapped back to the input space."""
        if self.columns is not None:
            return v / self.columns.double()[:, None]
        if self.cholesky is not None:
            # T⁻ᵀ V = L⁻ᵀ V: solve Lᵀ Y = V (upper triangular)
            return torch.linalg.solve_triangular(self.cholesky.double().T, v, upper=True)
        return v


def positive_weights(values: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` (≥ 0) with entries under 1e-6 × max raised to it, so the weighting inverts."""
    values = values.detach().double()
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise TensorslimError(f"the {what} holds negative or non-finite values")
    top = float(values.max()) if values.numel() else 0.0
    if top <= 0.0:
        raise TensorslimError(f"the {what} is all zeros: the calibration data never reached it")
    return values.clamp_min(top * MIN_RELATIVE_WEIGHT)


def activation_scaling(abs_mean: torch.Tensor, alpha: float) -> Weighting:
    """ASVD's T = diag(mean|x_j|^α) (α = 0: T = I, plain SVD)."""
    if alpha == 0:
        return Weighting()
    return Weighting(columns=positive_weights(abs_mean, "mean |x| per input channel") ** alpha)


def whitening(gram: torch.Tensor) -> Weighting:
    """SVD-LLM's T = L with L Lᵀ = G + λI; λ = 0 unless G is not positive definite, then the
    smallest of ``RIDGE_STEPS`` · tr(G)/d that makes it so."""
    g = gram.detach().double()
    g = (g + g.T) / 2  # a sum of x xᵀ is symmetric up to rounding; Cholesky reads one triangle
    scale = float(torch.diagonal(g).mean())
    if scale <= 0.0:
        raise TensorslimError("the input Gram is zero: the calibration data never reached it")
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    for step in RIDGE_STEPS:
        ridge = step * scale
        factor, info = torch.linalg.cholesky_ex(g + ridge * eye)
        if int(info) == 0:
            return Weighting(cholesky=factor, ridge=ridge)
    raise TensorslimError("the input Gram is not positive definite even with a 1e-2 ridge")


def fisher_row_weights(fisher: torch.Tensor) -> Weighting:
    """FWSVD's R = diag(√(Σ_j F_ij)) for a Fisher diagonal F shaped like the weight (out × d)."""
    rows = fisher.detach().double().reshape(fisher.shape[0], -1).sum(dim=1).sqrt()
    return Weighting(rows=positive_weights(rows, "Fisher information per output row"))


def weighted_svd(
    matrix: torch.Tensor, weighting: Weighting
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out × k), σ (k), V (d × k) of R · M · T, k = min(out, d), σ descending."""
    u, s, vh = torch.linalg.svd(weighting.transform(matrix), full_matrices=False)
    return u, s, vh.T


def weighted_factors(
    matrix: torch.Tensor, weighting: Weighting, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (out × r), B (d × r) with A Bᵀ = R⁻¹ U_r Σ_r V_rᵀ T⁻¹, √σ in both (float64)."""
    full = min(matrix.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise TensorslimError(f"rank {rank} is impossible for a {tuple(matrix.shape)} weight")
    u, s, v = weighted_svd(matrix, weighting)
    root = s[:rank].sqrt()
    return weighting.left_back(u[:, :rank]) * root, weighting.right_back(v[:, :rank]) * root


def weighted_output_errors(
    matrix: torch.Tensor, weighting: Weighting, gram: torch.Tensor
) -> torch.Tensor:
    """‖(M − M̂_r)Xᵀ‖_F / ‖MXᵀ‖_F for r = 0 … k from the Gram G = XᵀX alone (float64).

    With Ũ = R⁻¹ U Σ and Ṽ = T⁻ᵀ V, M − M̂_r = Σ_{i>r} ũ_i ṽ_iᵀ, so
    tr(Δ G Δᵀ) = Σ_{i,j>r} (ŨᵀŨ)_ij (ṼᵀGṼ)_ij: the trailing block sums of one k × k matrix,
    read for every r from a reversed 2-D cumulative sum. (For SVD-LLM without ridge ṼᵀGṼ = I
    and the error is √(Σ_{i>r} σ_i² / Σ σ_i²).)
    """
    m = matrix.double()
    g = gram.double()
    reference = float(((m @ g) * m).sum())
    u, s, v = weighted_svd(m, weighting)
    left = weighting.left_back(u) * s
    right = weighting.right_back(v)
    products = (left.T @ left) * (right.T @ g @ right)  # k × k
    tails = products.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1)  # [r, r] = Σ_{i,j≥r}
    k = s.numel()
    energy = torch.cat([torch.diagonal(tails), products.new_zeros(1)])[: k + 1]
    if reference <= 0.0:
        return torch.zeros(k + 1, dtype=torch.float64)
    return (energy.clamp_min(0.0) / reference).sqrt()
