"""Tensor-train (TT) matrices: factorising dimensions into modes, TT-SVD, reconstruction.

A matrix W of shape (M, N) with M = Π m_k and N = Π n_k (k = 1 … d) is a TT-matrix
(Oseledets 2011; Novikov et al. 2015, "Tensorizing Neural Networks") when

    W[(i₁, …, i_d), (j₁, …, j_d)] = G₁[:, i₁, j₁, :] · G₂[:, i₂, j₂, :] ⋯ G_d[:, i_d, j_d, :],

with cores G_k of shape (r_{k−1}, m_k, n_k, r_k), r₀ = r_d = 1; row index i = (i₁, …, i_d) and
column index j = (j₁, …, j_d) are read with the first mode most significant. It stores
Σ_k r_{k−1} m_k n_k r_k numbers instead of M·N.

TT-SVD: reshape W to the 2d-way tensor (m₁, …, m_d, n₁, …, n_d), interleave to
(m₁ n₁, m₂ n₂, …, m_d n_d) and peel off one core at a time by a truncated SVD of the current
unfolding C (r_{k−1} m_k n_k × rest): C ≈ U S Vᵀ, G_k = U, C ← S Vᵀ. Truncation either keeps
ranks ≤ ``max_rank`` or uses δ = ε‖W‖_F/√(d−1) per step (the smallest rank whose discarded tail
has norm ≤ δ), which guarantees ‖W − Ŵ‖_F ≤ ε‖W‖_F. With no truncation it is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from tensorslim.errors import TensorslimError

# A mode factorisation is "poor" when its largest factor exceeds this multiple of the ideal
# d-th root (and POOR_MIN): then the dimension is padded to a nearby well-factorising size.
POOR_FACTOR = 4.0
POOR_MIN = 16
# Padding may grow a dimension by at most this fraction (searching upward for a good size).
MAX_PAD_FRACTION = 0.25


@lru_cache(maxsize=4096)
def factorize(n: int, d: int) -> tuple[int, ...]:
    """The most balanced ordered factorisation n = f₁·…·f_d with f₁ ≥ … ≥ f_d ≥ 1.

    "Most balanced" = smallest largest factor, then largest smallest factor. Found by a search
    over divisors (dimensions of neural layers are small, so this is instant).
    """
    if n < 1 or d < 1:
        raise TensorslimError(f"cannot factorise {n} into {d} modes: both must be ≥ 1")
    best: tuple[int, ...] | None = None

    def key(f: tuple[int, ...]) -> tuple[int, int]:
        return (max(f), -min(f))

    divisors = _divisors(n)

    def search(rest: int, slots: int, cap: int, prefix: tuple[int, ...]) -> None:
        nonlocal best
        if slots == 1:
            if rest <= cap:
                cand = (*prefix, rest)
                if best is None or key(cand) < key(best):
                    best = cand
            return
        # Next factor f: a divisor of rest with rest^(1/slots) ≤ f ≤ cap (descending order).
        low = rest ** (1 / slots) - 1e-9
        for f in divisors:
            if f < low or rest % f:
                continue
            if f > cap or (best is not None and f > max(best)):
                break  # ascending: every later f is even less balanced
            search(rest // f, slots - 1, f, (*prefix, f))

    search(n, d, n, ())
    assert best is not None
    return best


def _divisors(n: int) -> list[int]:
    """All divisors of n, ascending (trial division up to √n)."""
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i * i != n:
                large.append(n // i)
        i += 1
    return small + large[::-1]


def choose_modes(n: int, d: int) -> tuple[tuple[int, ...], int]:
    """Modes for a dimension ``n`` split into ``d`` factors, and the (possibly padded) size.

    Any n is factorised as it is (:func:`factorize`). Only when that factorisation is poor —
    largest factor above ``POOR_FACTOR``·n^(1/d) and above ``POOR_MIN``, which happens for large
    primes and numbers with a large prime factor (e.g. 1021 or 2·509) — is n padded up to the
    size (within +25 %) whose largest mode is at most twice the rounded-up d-th root.
    """
    modes = factorize(n, d)
    if not _poor(modes, n, d):
        return modes, n
    # The smallest padding whose factorisation is well balanced (largest mode at most twice the
    # rounded-up d-th root): 1021 → 1024 = 16·8·8, 97 → 98 = 7·7·2.
    for padded in range(n + 1, int(n * (1 + MAX_PAD_FRACTION)) + 2):
        cand = factorize(padded, d)
        if max(cand) <= 2 * math.ceil(padded ** (1 / d) - 1e-9):
            return cand, padded
    return modes, n


def _poor(modes: tuple[int, ...], n: int, d: int) -> bool:
    return max(modes) > max(POOR_FACTOR * n ** (1 / d), POOR_MIN)


@dataclass
class TTResult:
    """Cores G_k (r_{k−1}, m_k, n_k, r_k) of a TT-matrix and the error of the approximation."""

    cores: list[torch.Tensor]
    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    rel_error: float

    @property
    def ranks(self) -> tuple[int, ...]:
        """(r₀, r₁, …, r_d) with r₀ = r_d = 1."""
        return (1, *(c.shape[-1] for c in self.cores))


def tt_to_matrix(cores: list[torch.Tensor]) -> torch.Tensor:
    """Multiply the cores out to the dense (Π m_k) × (Π n_k) matrix."""
    out_modes = [c.shape[1] for c in cores]
    in_modes = [c.shape[2] for c in cores]
    acc = cores[0].reshape(cores[0].shape[1] * cores[0].shape[2], cores[0].shape[3])
    for core in cores[1:]:
        r0, m, n, r1 = core.shape
        acc = (acc @ core.reshape(r0, m * n * r1)).reshape(-1, r1)
    # acc rows are (m₁, n₁, m₂, n₂, …); de-interleave to (m₁, …, m_d, n₁, …, n_d).
    d = len(cores)
    t = acc.reshape([s for pair in zip(out_modes, in_modes, strict=True) for s in pair])
    perm = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    return t.permute(perm).reshape(math.prod(out_modes), math.prod(in_modes))


def tt_svd(
    matrix: torch.Tensor,
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    *,
    max_rank: int | None = None,
    eps: float | None = None,
    ranks: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float64,
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> TTResult:
    """TT-SVD of ``matrix`` (Π out_modes × Π in_modes) with rank caps and/or δ-truncation.

    ``max_rank`` caps every TT rank; ``ranks`` = (1, r₁, …, r_{d−1}, 1) caps each bond
    separately (to rebuild a stored structure); ``eps`` is the relative accuracy ε of the
    δ-truncation (see the module docstring). None of them → exact TT (full ranks). A bond never
    gets more rank than the unfolding has, so asking for more than that yields the exact TT.
    ``rel_error`` is measured by multiplying the cores out (exact, not the bound).
    ``first``: the SVD of the first unfolding (:func:`first_unfolding_svd`), which does not
    depend on the truncation, so a ladder of truncations computes it once.
    """
    d = len(out_modes)
    if d != len(in_modes) or d < 1:
        raise TensorslimError(f"TT needs as many out modes as in modes: {out_modes}, {in_modes}")
    big_m, big_n = math.prod(out_modes), math.prod(in_modes)
    if tuple(matrix.shape) != (big_m, big_n):
        raise TensorslimError(
            f"TT modes {out_modes}×{in_modes} need a {big_m}×{big_n} matrix, got "
            f"{tuple(matrix.shape)}"
        )
    if max_rank is not None and max_rank < 1:
        raise TensorslimError(f"TT max_rank must be ≥ 1, got {max_rank}")
    if ranks is not None and (len(ranks) != d + 1 or min(ranks) < 1):
        raise TensorslimError(f"TT ranks must be (1, r₁, …, 1) with {d + 1} entries ≥ 1: {ranks}")
    if eps is not None and eps < 0:
        raise TensorslimError(f"TT accuracy eps must be ≥ 0, got {eps}")
    w = matrix.detach().to(device="cpu", dtype=dtype)
    norm = float(torch.linalg.vector_norm(w))
    t = _interleaved(w, out_modes, in_modes)
    delta = (eps or 0.0) * norm / math.sqrt(max(d - 1, 1))
    cores = []
    rank = 1
    c = t.reshape(-1)
    for k in range(d - 1):
        rows = rank * out_modes[k] * in_modes[k]
        c = c.reshape(rows, -1)
        u, s, vh = first if k == 0 and first is not None else _svd(c)
        keep = s.shape[0]
        if eps is not None and eps > 0:
            # tail[i] = norm of s[i:], keep the smallest r with tail[r] ≤ δ.
            tail = torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0]).sqrt()
            tail = torch.cat([tail, torch.zeros(1, dtype=tail.dtype)])
            keep = int(torch.nonzero(tail <= delta)[0])
        # Rank zero only for an all-zero matrix; keep one (zero) component so shapes stay valid.
        keep = max(keep, 1)
        if max_rank is not None:
            keep = min(keep, max_rank)
        if ranks is not None:
            keep = min(keep, ranks[k + 1])
        cores.append(u[:, :keep].reshape(rank, out_modes[k], in_modes[k], keep))
        c = s[:keep, None] * vh[:keep]
        rank = keep
    cores.append(c.reshape(rank, out_modes[-1], in_modes[-1], 1))
    approx = tt_to_matrix(cores)
    err = float(torch.linalg.vector_norm(w - approx)) / norm if norm > 0 else 0.0
    return TTResult(cores, tuple(out_modes), tuple(in_modes), err)


def _interleaved(
    w: torch.Tensor, out_modes: tuple[int, ...], in_modes: tuple[int, ...]
) -> torch.Tensor:
    """The matrix as a tensor with modes (m₁, n₁, m₂, n₂, …)."""
    d = len(out_modes)
    t = w.reshape(*out_modes, *in_modes)
    return t.permute([i for k in range(d) for i in (k, d + k)])


def _svd(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(c, full_matrices=False)


def first_unfolding_svd(
    matrix: torch.Tensor,
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the first TT unfolding, (m₁·n₁) × (the rest), shared by every truncation."""
    w = matrix.detach().to(device="cpu", dtype=dtype)
    t = _interleaved(w, out_modes, in_modes)
    return _svd(t.reshape(out_modes[0] * in_modes[0], -1))


def full_tt_ranks(out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> tuple[int, ...]:
    """The ranks of an exact TT of a generic matrix: r_k = min(Π_{≤k} m n, Π_{>k} m n)."""
    sizes = [m * n for m, n in zip(out_modes, in_modes, strict=True)]
    d = len(sizes)
    return (
        1,
        *(min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(d - 1)),
        1,
    )
