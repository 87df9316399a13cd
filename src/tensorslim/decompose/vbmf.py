"""Rank selection by analytic empirical variational Bayesian matrix factorisation (EVBMF).

Model (Nakajima, Sugiyama, Babacan, Tomioka, JMLR 2013, "Global analytic solution of
fully-observed variational Bayesian matrix factorization"): an observed L × M matrix V (L ≤ M)
is a low-rank signal plus i.i.d. Gaussian noise of variance σ². With Gaussian priors whose
variances are also estimated (empirical Bayes), the VB solution is a shrunken truncated SVD,
and it has a closed form. Write γ_h for the singular values of V, α = L/M and

    x_h = γ_h² / (M σ²),      τ(x) = ½ (x − (1 + α) + √((x − (1 + α))² − 4α)),
    Δ(τ) = τ − ln(1 + τ) − α ln(1 + τ/α).

Component h is kept iff x_h > x̲ = (1 + τ̲)(1 + α/τ̲), where τ̲ > 0 is the root of Δ(τ̲) = 0
(≈ 2.5129·√α): Δ(τ_h) is exactly the free energy a kept component saves, so components are
kept when that saving is positive. Up to constants, the free energy as a function of σ² is

    F(σ²) = ‖V‖²_F / (M σ²) + L ln σ² − Σ_{h : x_h > x̲} Δ(τ(x_h)),

which is continuous in σ² (Δ(τ̲) = 0); the noise variance is its minimiser on
[σ²_lo, ‖V‖²/(LM)], where at most H̄ = ⌈L/(1 + α)⌉ − 1 components can be kept, giving
σ²_lo = max(γ²_{H̄+1}/(M x̲), mean_{h>H̄} γ_h²/M). The rank is the number of kept components and
each kept singular value shrinks to
γ̂_h = (γ_h/2)(1 − (L+M)σ²/γ_h² + √((1 − (L+M)σ²/γ_h²)² − 4LMσ⁴/γ_h⁴)).

Kim et al. (ICLR 2016) select Tucker-2 ranks of a conv kernel (n, c, kh, kw) by EVBMF on the
mode-0 unfolding (n × c·kh·kw) and the mode-1 unfolding (c × n·kh·kw); MUSCO (Gusak et al. 2019)
weakens the choice, rank = R − k·(R − R_vbmf) with k ∈ [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tensorslim.errors import TensorslimError


@dataclass(frozen=True)
class VBMFResult:
    """EVBMF of one matrix: the selected ``rank``, noise variance, threshold and shrunk values."""

    rank: int
    sigma2: float
    threshold: float  # singular values above this are kept (γ > √(M σ² x̲))
    singular_values: torch.Tensor
    shrunk_values: torch.Tensor  # γ̂_h for the kept components (length ``rank``)


def _delta(tau: torch.Tensor, alpha: float) -> torch.Tensor:
    return tau - torch.log1p(tau) - alpha * torch.log1p(tau / alpha)


def tau_threshold(alpha: float) -> float:
    """τ̲: the positive root of τ − ln(1+τ) − α ln(1+τ/α) = 0, by bisection (0 < α ≤ 1)."""
    if not 0 < alpha <= 1:
        raise TensorslimError(f"EVBMF needs 0 < α = L/M ≤ 1, got {alpha}")
    t = torch.tensor

    def f(v: float) -> float:
        return float(_delta(t(v, dtype=torch.float64), alpha))

    # Δ is negative just above 0 and grows linearly for large τ; bracket the root, then bisect.
    lo, hi = 1e-9, 1.0
    while f(hi) <= 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    b = x - (1 + alpha)
    return 0.5 * (b + torch.sqrt((b * b - 4 * alpha).clamp_min(0)))


def evbmf(matrix: torch.Tensor, sigma2: float | None = None, grid: int = 400) -> VBMFResult:
    """Analytic EVBMF of ``matrix`` (any orientation); see the module docstring.

    ``sigma2``: the noise variance if known; otherwise it is estimated by minimising the free
    energy F(σ²) (a log-spaced grid of ``grid`` points, then golden-section refinement around the
    best grid point — F is not guaranteed unimodal, so a pure local search could stall).
    """
    if matrix.ndim != 2 or min(matrix.shape) < 1:
        raise TensorslimError(f"EVBMF needs a non-empty matrix, got shape {tuple(matrix.shape)}")
    v = matrix.detach().to(device="cpu", dtype=torch.float64)
    if v.shape[0] > v.shape[1]:
        v = v.T
    big_l, big_m = v.shape
    alpha = big_l / big_m
    s = torch.linalg.svdvals(v)
    total = float((s * s).sum())
    if total == 0.0:
        return VBMFResult(0, 0.0, 0.0, s, s[:0])
    tau_bar = tau_threshold(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)

    def free_energy(s2: torch.Tensor) -> torch.Tensor:
        """F at each σ² in ``s2`` (1-D), vectorised over the grid."""
        x = (s * s)[None, :] / (big_m * s2[:, None])
        kept = x > x_bar
        gain = torch.where(kept, _delta(_tau(torch.where(kept, x, x_bar + 1), alpha), alpha), 0)
        return total / (big_m * s2) + big_l * torch.log(s2) - gain.sum(1)

    if sigma2 is None:
        upper = total / (big_l * big_m)
        h_max = max(min(math.ceil(big_l / (1 + alpha)) - 1, big_l - 1), 0)
        tail = s[h_max:]
        lower = max(float(s[h_max]) ** 2 / (big_m * x_bar), float((tail * tail).mean()) / big_m)
        lower = min(lower, upper)
        if lower <= 0:
            lower = upper * 1e-12
        logs = torch.linspace(math.log(lower), math.log(upper), grid, dtype=torch.float64)
        values = free_energy(torch.exp(logs))
        best = int(torch.argmin(values))
        a = float(logs[max(best - 1, 0)])
        b = float(logs[min(best + 1, grid - 1)])
        # Golden-section search on log σ² inside the bracketing grid cell pair.
        ratio = (math.sqrt(5) - 1) / 2
        c, d = b - ratio * (b - a), a + ratio * (b - a)

        def energy_at(u: float) -> float:
            return float(free_energy(torch.tensor([math.exp(u)], dtype=torch.float64))[0])

        fc, fd = energy_at(c), energy_at(d)
        for _ in range(60):
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - ratio * (b - a)
                fc = energy_at(c)
            else:
                a, c, fc = c, d, fd
                d = a + ratio * (b - a)
                fd = energy_at(d)
        candidates = [(float(values[best]), float(logs[best])), (min(fc, fd), (a + b) / 2)]
        sigma2 = math.exp(min(candidates)[1])
    elif sigma2 <= 0:
        raise TensorslimError(f"EVBMF noise variance must be positive, got {sigma2}")
    threshold = math.sqrt(big_m * sigma2 * x_bar)
    rank = int((s > threshold).sum())
    kept = s[:rank]
    ratio_lm = (big_l + big_m) * sigma2 / (kept * kept)
    shrunk = (
        0.5
        * kept
        * (
            1
            - ratio_lm
            + torch.sqrt(
                ((1 - ratio_lm) ** 2 - 4 * big_l * big_m * sigma2**2 / kept**4).clamp_min(0)
            )
        )
    )
    return VBMFResult(rank, float(sigma2), threshold, s, shrunk)


WEAKEN_RULES = ("tensorslim", "musco")


def check_weaken_rule(rule: str, what: str = "weaken_rule") -> str:
    """``rule`` is one of :data:`WEAKEN_RULES`, else a one-line error."""
    if rule not in WEAKEN_RULES:
        raise TensorslimError(f"unknown {what} '{rule}': use {' or '.join(WEAKEN_RULES)}")
    return rule


def weaken_rank(
    full_rank: int,
    vbmf_rank: int,
    weaken: float = 1.0,
    min_rank: int = 1,
    rule: str = "tensorslim",
) -> int:
    """The weakened rank R − k·(R − R_vbmf) of a mode of size R (k = ``weaken``).

    ``rule="tensorslim"``: rounded up and clamped to [min(min_rank, R), R] (a VBMF rank of 0
    gives ``min_rank``). ``rule="musco"`` (MUSCO's ``estimator.weaken_rank``): a mode with
    R < ``min_rank`` (21 there) or a VBMF rank of 0 keeps the full rank R; otherwise the value is
    rounded down (``int``), with no clamp. ``weaken`` = 1 keeps the VBMF rank, 0 the full rank.
    """
    if not 0.0 <= weaken <= 1.0:
        raise TensorslimError(f"weakening factor must be in [0, 1], got {weaken}")
    if min_rank < 1:
        raise TensorslimError(f"min_rank must be ≥ 1, got {min_rank}")
    if check_weaken_rule(rule) == "musco":
        if full_rank < min_rank or vbmf_rank == 0:
            return full_rank
        # a VBMF rank ≥ 1 keeps the value ≥ 1; the small guard absorbs float error at integers
        return max(1, math.floor(full_rank - weaken * (full_rank - vbmf_rank) + 1e-9))
    rank = math.ceil(full_rank - weaken * (full_rank - vbmf_rank) - 1e-9)
    return max(min(rank, full_rank), min(min_rank, full_rank))


def tucker2_vbmf_ranks(
    kernel: torch.Tensor, weaken: float = 1.0, min_rank: int = 1, rule: str = "tensorslim"
) -> tuple[int, int]:
    """(R_out, R_in) for Tucker-2 of a conv kernel (n, c, kh, kw) by EVBMF of its unfoldings.

    Mode 0 (n × c·kh·kw) gives R_out, mode 1 (c × n·kh·kw) gives R_in; each is weakened by
    :func:`weaken_rank` relative to the mode's size.
    """
    if kernel.ndim < 2:
        raise TensorslimError(f"Tucker-2 ranks need a tensor with ≥ 2 modes: {tuple(kernel.shape)}")
    n, c = kernel.shape[0], kernel.shape[1]
    mode0 = kernel.detach().reshape(n, -1)
    mode1 = kernel.detach().movedim(1, 0).reshape(c, -1)
    r_out = weaken_rank(min(mode0.shape), evbmf(mode0).rank, weaken, min_rank, rule)
    r_in = weaken_rank(min(mode1.shape), evbmf(mode1).rank, weaken, min_rank, rule)
    return r_out, r_in
