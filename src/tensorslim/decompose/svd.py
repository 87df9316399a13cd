"""SVD of dense weights, and the two ways of viewing a conv kernel as a matrix.

Conv kernel K has shape (n, c, kh, kw) (out channels, in channels, height, width).

- channel-wise (Zhang et al. 2015): M = K viewed n × (c·kh·kw); M ≈ U Vᵀ becomes a conv
  c→r with the full kh×kw kernel followed by a 1×1 conv r→n.
- spatial-wise (Jaderberg et al. 2014): M[(n, w), (c, h)] = K[n, c, h, w], an (n·kw) × (c·kh)
  matrix; M ≈ U Vᵀ becomes a conv c→r with a kh×1 kernel followed by a conv r→n with 1×kw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tensorslim.errors import TensorslimError

Scheme = Literal["channel", "spatial"]
SvdDriver = Literal["auto", "full", "randomized", "gram"]

# Randomized SVD (Halko, Martinsson, Tropp) pays off only on large matrices with a small rank.
RANDOMIZED_MIN_DIM = 1024
RANDOMIZED_MAX_RANK_FRACTION = 0.25


def conv_weight_to_matrix(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """View a conv kernel (n, c, kh, kw) as the matrix the scheme factorizes.

    channel → (n, c·kh·kw); spatial → (n·kw, c·kh) with rows (n, w) and columns (c, h).
    """
    n, c, kh, kw = weight.shape
    if scheme == "channel":
        return weight.reshape(n, c * kh * kw)
    if scheme == "spatial":
        return weight.permute(0, 3, 1, 2).reshape(n * kw, c * kh)
    raise TensorslimError(f"unknown SVD scheme '{scheme}': use 'channel' or 'spatial'")


def matrix_to_conv_weight(
    matrix: torch.Tensor, shape: tuple[int, int, int, int], scheme: Scheme
) -> torch.Tensor:
    """Inverse of :func:`conv_weight_to_matrix`."""
    n, c, kh, kw = shape
    if scheme == "channel":
        return matrix.reshape(n, c, kh, kw)
    return matrix.reshape(n, kw, c, kh).permute(0, 2, 3, 1).contiguous()


# Above this many entries a spectrum is computed in float32: its energies (what ranks and errors
# are read from) stay within ~1e-7 of Σσ², and LAPACK runs about twice as fast.
FLOAT32_SPECTRUM_MIN_ENTRIES = 1 << 20
# From this many entries a planning factorization (:func:`gram_factorization`) runs in float32:
# its eigendecomposition is 2× (one thread) to 5× (two busy threads) faster than in float64, and
# the energies it yields stay within k·ε₃₂·σ_max²/‖M‖²_F of the exact ones (see there).
FLOAT32_FACTORIZATION_MIN_ENTRIES = 1 << 18
# From this size of the smaller side a factorization goes through the Gram matrix (below).
GRAM_MIN_DIM = 256


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values, descending, as float64 (computed in float32 for large matrices)."""
    work = matrix.detach()
    dtype = torch.float32 if work.numel() >= FLOAT32_SPECTRUM_MIN_ENTRIES else torch.float64
    return torch.linalg.svdvals(work.to(dtype)).double()


def gram_truncated_svd(
    matrix: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors from the eigendecomposition of the smaller Gram matrix.

    For M (m × n) with n ≤ m: MᵀM = V Λ Vᵀ, σ = √λ (descending); the rank-r approximation is
    M V_r V_rᵀ (the projection on the top right singular subspace, optimal by Eckart–Young), so
    U_r = M V_r / σ_r. (n > m: the same on Mᵀ.) In float64 the eigenvalues carry an absolute
    error of ~1e-16·‖M‖², so the kept subspace is exact to that level; about 3× cheaper than a
    full SVD with vectors for the layer shapes of transformers.
    """
    work = matrix.detach().double()
    if work.shape[1] > work.shape[0]:
        v, s, u = gram_truncated_svd(work.T, rank)
        return u, s, v
    lam, vecs = torch.linalg.eigh(work.T @ work)  # ascending
    v = vecs[:, -rank:].flip(1)
    s = lam[-rank:].flip(0).clamp_min(0.0).sqrt()
    u = (work @ v) / s.clamp_min(torch.finfo(work.dtype).tiny)
    return u, s, v


def truncated_svd(
    matrix: torch.Tensor, rank: int, driver: SvdDriver = "auto", niter: int = 6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``matrix`` (m × n): U (m × r), S (r), V (n × r).

    ``driver="full"`` uses ``torch.linalg.svd``; ``"randomized"`` uses ``torch.svd_lowrank``
    (subspace iteration, ``niter`` power steps); ``"gram"`` the eigendecomposition of the smaller
    Gram matrix (:func:`gram_truncated_svd`); ``"auto"`` picks randomized for matrices with both
    sides ≥ 1024 and a rank under a quarter of the smaller side, gram when the smaller side is
    ≥ 256, full otherwise.
    """
    m, n = matrix.shape
    full_rank = min(m, n)
    if not 1 <= rank <= full_rank:
        raise TensorslimError(f"rank {rank} is impossible for a {m}×{n} matrix (1..{full_rank})")
    if driver not in ("auto", "full", "randomized", "gram"):
        raise TensorslimError(f"unknown SVD driver '{driver}': use auto, full, randomized or gram")
    work = matrix.detach().double()
    use_randomized = driver == "randomized" or (
        driver == "auto"
        and min(m, n) >= RANDOMIZED_MIN_DIM
        and rank <= RANDOMIZED_MAX_RANK_FRACTION * full_rank
    )
    if use_randomized:
        q = min(full_rank, rank + 10)
        u, s, v = torch.svd_lowrank(work, q=q, niter=niter)
    elif driver == "gram" or (driver == "auto" and full_rank >= GRAM_MIN_DIM):
        return gram_truncated_svd(work, rank)
    else:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        v = vh.mH
    return u[:, :rank], s[:rank], v[:, :rank]


def balanced_factors(
    matrix: torch.Tensor, rank: int, driver: SvdDriver = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m × r), B (n × r) with A Bᵀ the best rank-r approximation, √σ split into both."""
    u, s, v = truncated_svd(matrix, rank, driver)
    root = s.sqrt()
    return (u * root).to(matrix.dtype), (v * root).to(matrix.dtype)


@dataclass
class GramFactorization:
    """The SVD of a matrix M (m × n) through the eigendecomposition of its smaller Gram matrix.

    ``side="right"`` (n ≤ m): MᵀM = V Λ Vᵀ and ``vectors`` = V; ``side="left"`` (m < n):
    MMᵀ = U Λ Uᵀ and ``vectors`` = U; columns ordered by descending σ = √λ (``singular_values``,
    float64). Computed in float32 for matrices of at least ``FLOAT32_FACTORIZATION_MIN_ENTRIES``
    entries, else float64. Eigenvalues of the float32 Gram carry an absolute error of about
    k·ε₃₂·σ_max² (k = min(m, n)), so a rank's kept-energy fraction Σ_{i≤r} σ_i²/Σσ² — and thus
    the squared relative error e_r² — is off by at most ~k·ε₃₂·σ_max²/‖M‖²_F (≤ k·ε₃₂ ≈ 6e-8·k,
    typically far less since σ_max² ≪ ‖M‖²_F; tested against a float64 SVD); the float64 path is
    exact to ~1e-15.
    Every rank's truncation comes from this one factorization (Eckart–Young: the best rank-r
    approximation is M V_r V_rᵀ = U_r U_rᵀ M).
    """

    vectors: torch.Tensor
    singular_values: torch.Tensor
    side: str

    def balanced(self, matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (m × r), B (n × r), A Bᵀ the best rank-``rank`` approximation, √σ in both.

        Components with σ below round-off (a rank-deficient M) are set to zero rather than
        divided by ~0; they carry no energy.
        """
        full = self.singular_values.numel()
        if not 1 <= rank <= full:
            raise TensorslimError(
                f"rank {rank} is impossible for a {tuple(matrix.shape)} matrix (1..{full})"
            )
        work = matrix.detach().to(self.vectors.dtype)
        basis = self.vectors[:, :rank]
        s = self.singular_values[:rank].to(self.vectors.dtype)
        floor = float(self.singular_values[0]) * full * torch.finfo(self.vectors.dtype).eps
        inv_root = torch.where(s > floor, s.clamp_min(floor).rsqrt(), torch.zeros_like(s))
        root = torch.where(s > floor, s.sqrt(), torch.zeros_like(s))
        if self.side == "right":  # A = M V_r / √σ, B = V_r √σ
            a, b = (work @ basis) * inv_root, basis * root
        else:  # A = U_r √σ, B = Mᵀ U_r / √σ
            a, b = basis * root, (work.T @ basis) * inv_root
        return a.to(matrix.dtype), b.to(matrix.dtype)

    def output_energies(self, matrix: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """e_i = σ_i² v_iᵀ G v_i for every component (float64): the output energy the i-th
        singular triple carries for inputs with Gram G (see analysis/output_error.py)."""
        work = matrix.detach().double()
        vectors = self.vectors.double()
        # the columns σ_i v_i: σ_i · V[:, i] on the right side, Mᵀ u_i on the left
        scaled = vectors * self.singular_values if self.side == "right" else work.T @ vectors
        g = gram.detach().double()
        return ((scaled.T @ g) * scaled.T).sum(dim=1)


def gram_factorization(matrix: torch.Tensor) -> GramFactorization:
    """:class:`GramFactorization` of ``matrix`` (one Gram product and one eigendecomposition)."""
    work = matrix.detach()
    big = work.numel() >= FLOAT32_FACTORIZATION_MIN_ENTRIES
    work = work.to(torch.float32 if big else torch.float64)
    side = "right" if work.shape[1] <= work.shape[0] else "left"
    gram = work.T @ work if side == "right" else work @ work.T
    lam, vecs = torch.linalg.eigh(gram)  # ascending
    del gram
    lam = lam.flip(0).double()
    # eigh resolves eigenvalues of the Gram to about n·ε·λ₁: anything below that is round-off
    # (it would read as σ ≈ √(n·ε)·σ₁, far above an SVD's own noise floor), so it is zero
    floor = lam.numel() * torch.finfo(work.dtype).eps * float(lam[0].clamp_min(0.0))
    s = torch.where(lam > floor, lam, torch.zeros_like(lam)).sqrt()
    return GramFactorization(vecs.flip(1).contiguous(), s, side)
