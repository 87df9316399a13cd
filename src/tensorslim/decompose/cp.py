"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares, on torch tensors.

A tensor X of shape (I_0, …, I_{N−1}) is approximated by R rank-one terms

    X ≈ X̂ = Σ_r λ_r · f⁰_r ∘ f¹_r ∘ … ∘ f^{N−1}_r,     ‖fᵏ_r‖ = 1,

with factor matrices Fₖ = [fᵏ_1 … fᵏ_R] of shape (I_k, R) and weights λ (R,).

ALS updates one factor at a time by solving its linear least-squares problem exactly:

    Fₙ ← Mₙ · Vₙ⁻¹,   Mₙ = X_(n) · ⊙_{k≠n} Fₖ  (the MTTKRP, I_n × R),
                      Vₙ = ∗_{k≠n} FₖᵀFₖ      (Hadamard product of Gram matrices, R × R).

Cost. The MTTKRP is the expensive part (2·|X|·R FLOPs each if done naively). The modes are
split into a left half L and a right half Rt; P = X contracted with the right factors (shape
I_L × R) serves every left-mode MTTKRP, and Q = X contracted with the (freshly updated) left
factors serves every right-mode one, so a sweep costs about 4·|X|·R FLOPs instead of 2·N·|X|·R.
For a conv kernel (n, c, kh, kw) the right half is the small kh×kw block, which is contracted
with its Khatri–Rao product in one matmul.

Error without reconstruction. With unit factor columns,
‖X − X̂‖² = ‖X‖² − 2⟨X, X̂⟩ + λᵀ(∗ₖ FₖᵀFₖ)λ and ⟨X, X̂⟩ = Σ_r λ_r Σ_i M_{N−1}[i, r] F_{N−1}[i, r],
both available after the last update of a sweep, so the stopping rule costs O(R²·N). (This
formula subtracts nearly equal squares, so it resolves errors only down to ~1e-8; the final
reported error is computed by one explicit reconstruction.)

Stopping rule: stop when the relative error e_k = ‖X − X̂‖/‖X‖ improves by less than ``tol``
relative to itself, |e_{k−1} − e_k| < tol · e_{k−1}, or after ``max_iter`` sweeps.

Degeneracy (Kruskal, Harshman, Lundy 1989; de Silva & Lim 2008): when no best rank-R
approximation exists, ALS drives two or more components to large norms of opposite sign that
cancel. It is detected by the cancellation ratio κ = Σ λ_r² / ‖X̂‖² (≈ 1 for well separated
components; it grows without bound when components cancel) together with the most negative
component congruence Π_k ⟨fᵏ_r, fᵏ_s⟩. On detection a :class:`CPDegeneracyWarning` is issued and,
depending on ``on_degenerate``, ALS is restarted with Tikhonov-regularised normal equations
(Vₙ + μ·I, which penalises ‖Fₙ‖ and bounds the components; Navasca, De Lathauwer, Kindermann
2008), or with a smaller rank.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from tensorslim.errors import TensorslimError

OnDegenerate = Literal["stabilize", "reduce_rank", "warn", "raise"]


class CPDegeneracyWarning(UserWarning):
    """CP-ALS found diverging, cancelling components (a degenerate CP problem)."""


@dataclass
class CPResult:
    """A CP decomposition Σ_r λ_r f⁰_r ∘ … ∘ f^{N−1}_r.

    ``weights`` (R,), ``factors`` [(I_k, R)] with unit-norm columns (zero columns for components
    dropped by a rank reduction); ``rel_error`` = ‖X − X̂‖_F / ‖X‖_F of the returned factors;
    ``errors`` the relative error after every sweep; ``rank`` the number of nonzero components.
    """

    weights: torch.Tensor
    factors: list[torch.Tensor]
    rel_error: float
    iterations: int
    converged: bool
    degenerate: bool = False
    stabilized: bool = False
    rank: int = 0
    errors: list[float] = field(default_factory=list)
    cancellation: float = 1.0

    def to_tensor(self) -> torch.Tensor:
        """The reconstructed tensor X̂ (shape (I_0, …, I_{N−1}))."""
        return cp_to_tensor(self.weights, self.factors)


def cp_to_tensor(weights: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """Σ_r weights[r] · F₀[:, r] ∘ F₁[:, r] ∘ … (shape (I_0, …, I_{N−1}))."""
    shape = [f.shape[0] for f in factors]
    # Build the Khatri–Rao product of all but the first factor, then one matmul.
    kr = khatri_rao(factors[1:]) if len(factors) > 1 else None
    first = factors[0] * weights
    if kr is None:
        return first.sum(1)
    return (first @ kr.T).reshape(shape)


def khatri_rao(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product: rows indexed (i_0, i_1, …) with i_0 most significant.

    For matrices of shapes (I_k, R) the result is (Π I_k, R) with
    out[(i_0, …, i_m), r] = Π_k M_k[i_k, r].
    """
    out = matrices[0]
    rank = out.shape[1]
    for m in matrices[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, rank)
    return out


def _init_factors(
    x: torch.Tensor, rank: int, init: str, generator: torch.Generator
) -> list[torch.Tensor]:
    """SVD (HOSVD) initialisation: leading left singular vectors of each unfolding.

    A mode with fewer than ``rank`` rows (e.g. a 3-wide kernel mode at rank 64) cannot supply
    ``rank`` singular vectors; its remaining columns are random, as is common practice.
    """
    factors = []
    for mode, size in enumerate(x.shape):
        rnd = torch.randn(size, rank, generator=generator, dtype=x.dtype)
        if init == "random":
            factors.append(rnd)
            continue
        unfolding = x.movedim(mode, 0).reshape(size, -1)
        # Left singular vectors from the small Gram matrix: eigh of (I_k × I_k) is much cheaper
        # than an SVD of the (I_k × |X|/I_k) unfolding and exact enough for a starting point.
        gram = unfolding @ unfolding.T
        evals, evecs = torch.linalg.eigh(gram)
        order = torch.argsort(evals, descending=True)
        k = min(rank, size)
        u = evecs[:, order[:k]]
        if k < rank:
            u = torch.cat([u, rnd[:, k:] / math.sqrt(size)], dim=1)
        factors.append(u)
    return factors


class _Contractor:
    """MTTKRPs of one tensor, reusing the half-contractions described in the module docstring."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.shape = tuple(x.shape)
        self.ndim = x.ndim
        # Split where the larger half is smallest: both half-contractions then cost 2·|X|·R
        # and the Khatri–Rao product of the right half stays small.
        total = x.numel()
        split = min(
            range(1, self.ndim),
            key=lambda s: max(math.prod(self.shape[s:]), total // math.prod(self.shape[s:])),
        )
        self.split = split
        self.left_size = math.prod(self.shape[:split])
        self.right_size = math.prod(self.shape[split:])
        self.matrix = x.reshape(self.left_size, self.right_size)

    def left_partial(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """P[i_L, r] = Σ_{i_Rt} X[i_L, i_Rt] Π_{k∈Rt} F_k[i_k, r]  (shape (*I_L, R))."""
        kr = khatri_rao(factors[self.split :])  # (Π I_Rt, R)
        p = self.matrix @ kr
        return p.reshape(*self.shape[: self.split], -1)

    def right_partial(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """Q[i_Rt, r] = Σ_{i_L} X[i_L, i_Rt] Π_{k∈L} F_k[i_k, r]  (shape (*I_Rt, R)).

        Contract the first (largest) left mode by a matmul, then the rest one by one, so no
        (Π I_L × R) Khatri–Rao product is ever formed.
        """
        rank = factors[0].shape[1]
        first = self.shape[0]
        rest = self.x.numel() // first
        t = factors[0].T @ self.x.reshape(first, rest)  # (R, I_1 … I_{N−1})
        t = t.reshape(rank, *self.shape[1:])
        for k in range(1, self.split):
            # t: (R, I_k, …) → multiply by F_k[:, r] along I_k and sum it out.
            f = factors[k].T.reshape(rank, self.shape[k], *([1] * (t.ndim - 2)))
            t = (t * f).sum(1)
        return t.movedim(0, -1)  # (*I_Rt, R)

    @staticmethod
    def finish(
        partial: torch.Tensor, factors: list[torch.Tensor], modes: list[int], target: int
    ) -> torch.Tensor:
        """Contract a partial (*I_group, R) with the group's factors except ``target``."""
        t = partial
        # Axis j of t corresponds to modes[j]; contract all but target, keeping R last.
        keep = modes.index(target)
        for j in reversed(range(len(modes))):
            if j == keep:
                continue
            f = factors[modes[j]]  # (I, R)
            shape = [1] * t.ndim
            shape[j] = f.shape[0]
            shape[-1] = f.shape[1]
            t = (t * f.reshape(shape)).sum(j)
        return t  # (I_target, R)


def _gram_hadamard(grams: list[torch.Tensor], skip: int | None) -> torch.Tensor:
    out = torch.ones_like(grams[0])
    for k, g in enumerate(grams):
        if k != skip:
            out = out * g
    return out


def _solve(m: torch.Tensor, v: torch.Tensor, mu: float) -> torch.Tensor:
    """F = M (V + μ I)⁻¹ for symmetric positive semidefinite V, Cholesky with a safe fallback.

    μ is relative to the mean diagonal of V. A tiny μ only guards round-off; a larger μ is the
    Tikhonov stabilisation used against degeneracy.
    """
    rank = v.shape[0]
    scale = float(v.diagonal().mean().clamp_min(1e-300))
    a = v + (mu * scale) * torch.eye(rank, dtype=v.dtype)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(m.T, chol).T
    # V singular (e.g. duplicate components): least squares through the pseudo-inverse.
    return (torch.linalg.pinv(a, hermitian=True) @ m.T).T


def _normalise(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = torch.linalg.vector_norm(f, dim=0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return f / safe, norms


def _cancellation(weights: torch.Tensor, grams: list[torch.Tensor]) -> tuple[float, float]:
    """(κ = Σλ²/‖X̂‖², most negative congruence between two components)."""
    h = _gram_hadamard(grams, None)
    fit = float(weights @ h @ weights)
    kappa = float((weights**2).sum()) / max(fit, 1e-300)
    rank = h.shape[0]
    if rank > 1:
        off = h - torch.diag(torch.diagonal(h)) + 2 * torch.eye(rank, dtype=h.dtype)
        congruence = float(off.min())
    else:
        congruence = 1.0
    return kappa, congruence


@dataclass
class _AlsOutcome:
    weights: torch.Tensor
    factors: list[torch.Tensor]
    errors: list[float]
    converged: bool
    degenerate: bool
    kappa: float


def _split_weights(factors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Working form (unit columns except the last factor) → (λ, all-unit factors)."""
    last, weights = _normalise(factors[-1])
    return weights, [*factors[:-1], last]


@dataclass
class _AlsState:
    """The working form of one ALS run: factors (unit columns except the last), their Grams,
    and the right-half contraction P the next sweep starts from (None: compute it)."""

    factors: list[torch.Tensor]
    grams: list[torch.Tensor]
    p: torch.Tensor | None = None


def _als(
    x: torch.Tensor,
    factors: list[torch.Tensor],
    norm_x2: float,
    *,
    max_iter: int,
    tol: float,
    mu: float,
    kappa_limit: float,
    stop_on_degenerate: bool,
    extrapolate: bool,
) -> _AlsOutcome:
    """ALS sweeps from ``factors`` (see the module docstring).

    Working form: the factors of modes 0 … N−2 have unit columns and the last factor carries the
    weights, so the error after a sweep comes from the last MTTKRP alone.
    """
    contractor = _Contractor(x)
    factors = [_normalise(f)[0] for f in factors[:-1]] + [factors[-1].clone()]
    state = _AlsState(factors, [f.T @ f for f in factors])
    errors: list[float] = []
    converged = degenerate = False
    kappa_history: list[float] = []
    step = 0.5
    previous: list[torch.Tensor] | None = None
    for _ in range(max_iter):
        err = _sweep(contractor, state, norm_x2, mu)
        if extrapolate and previous is not None:
            err, step = _extrapolate(contractor, state, previous, err, step, norm_x2)
        previous = [f.clone() for f in state.factors]
        errors.append(err)
        kappa_history.append(_cancellation(state))
        if _is_degenerate(kappa_history, kappa_limit):
            degenerate = True
            if stop_on_degenerate:
                break
        if len(errors) >= 2 and abs(errors[-2] - errors[-1]) < tol * max(errors[-2], 1e-300):
            converged = True
            break
        if err < 1e-12:
            converged = True
            break
    weights, unit = _split_weights(state.factors)
    # The Gram-based error loses digits below ~1e-8 (it subtracts nearly equal squares); the
    # reported final error comes from one explicit reconstruction (about one MTTKRP of work).
    if errors:
        errors[-1] = float(torch.linalg.vector_norm(x - cp_to_tensor(weights, unit))) / math.sqrt(
            norm_x2
        )
    kappa = kappa_history[-1] if kappa_history else 1.0
    return _AlsOutcome(weights, unit, errors, converged, degenerate, kappa)


def _relative_error(norm_x2: float, inner: float, fit2: float) -> float:
    """‖X − X̂‖/‖X‖ from ⟨X, X̂⟩ and ‖X̂‖² (no reconstruction)."""
    return math.sqrt(max(norm_x2 - 2 * inner + fit2, 0.0) / norm_x2)


def _sweep(contractor: _Contractor, state: _AlsState, norm_x2: float, mu: float) -> float:
    """One ALS sweep over every mode (left half from P, right half from Q); its error."""
    factors, grams = state.factors, state.grams
    n_modes, split = len(factors), contractor.split
    m = None
    for modes, partial in (
        (list(range(split)), state.p if state.p is not None else contractor.left_partial(factors)),
        (list(range(split, n_modes)), None),
    ):
        if partial is None:
            partial = contractor.right_partial(factors)
        for mode in modes:
            m = _Contractor.finish(partial, factors, modes, mode)
            f = _solve(m, _gram_hadamard(grams, mode), mu)
            factors[mode] = f if mode == n_modes - 1 else _normalise(f)[0]
            grams[mode] = factors[mode].T @ factors[mode]
    assert m is not None
    state.p = None
    # Error from the last MTTKRP (see module docstring): no reconstruction needed.
    inner = float((m * factors[-1]).sum())
    return _relative_error(norm_x2, inner, float(_gram_hadamard(grams, None).sum()))


def _extrapolate(
    contractor: _Contractor,
    state: _AlsState,
    previous: list[torch.Tensor],
    err: float,
    step: float,
    norm_x2: float,
) -> tuple[float, float]:
    """Bro (1998)'s line search with an adaptive step; returns (error, next step).

    After a sweep that moved the factors from F_old to F_new, try F_old + (1 + s)(F_new − F_old)
    for all modes at once and keep it if its error is lower. Its error needs P (the right-half
    contraction), which is exactly what the next sweep starts with, so an accepted step costs
    nothing extra.
    """
    trial = [
        old + (1 + step) * (new - old) for old, new in zip(previous, state.factors, strict=True)
    ]
    # Back to working form: left/middle norms pushed into the last factor.
    scale = torch.ones(trial[0].shape[1], dtype=trial[0].dtype)
    for k in range(len(trial) - 1):
        trial[k], norms = _normalise(trial[k])
        scale = scale * norms
    trial[-1] = trial[-1] * scale
    trial_grams = [f.T @ f for f in trial]
    p_trial = contractor.left_partial(trial)
    t = p_trial
    for j in reversed(range(contractor.split)):
        f = trial[j]
        shape = [1] * t.ndim
        shape[j], shape[-1] = f.shape[0], f.shape[1]
        t = (t * f.reshape(shape)).sum(j)
    trial_err = _relative_error(
        norm_x2, float(t.sum()), float(_gram_hadamard(trial_grams, None).sum())
    )
    if trial_err < err:
        state.factors, state.grams, state.p = trial, trial_grams, p_trial
        return trial_err, min(step * 1.5, 8.0)
    return err, max(step * 0.5, 0.125)


def _cancellation(state: _AlsState) -> float:
    """κ = Σλ² / ‖X̂‖²: how much the components' energy exceeds the fit's."""
    weights = torch.linalg.vector_norm(state.factors[-1], dim=0)
    fit2 = float(_gram_hadamard(state.grams, None).sum())
    return float((weights**2).sum()) / max(fit2, 1e-300)


def _is_degenerate(kappa_history: list[float], kappa_limit: float) -> bool:
    """The components' energy dwarfs the fit's, and has kept growing."""
    return (
        kappa_history[-1] > kappa_limit
        and len(kappa_history) >= 3
        and kappa_history[-1] > kappa_history[-3]
    )


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    *,
    max_iter: int = 500,
    tol: float = 1e-5,
    init: Literal["svd", "random"] = "svd",
    seed: int = 0,
    extrapolate: bool = True,
    on_degenerate: OnDegenerate = "stabilize",
    stabilize_mu: float = 1e-2,
    kappa_limit: float = 20.0,
    ridge: float = 1e-10,
    dtype: torch.dtype = torch.float64,
) -> CPResult:
    """Rank-``rank`` CP decomposition of ``tensor`` by ALS (see the module docstring).

    Args:
        tensor: any real tensor with at least 2 modes.
        rank: number of rank-one components R ≥ 1.
        max_iter: maximum number of ALS sweeps.
        tol: stop when the relative error changes by less than ``tol`` × itself in one sweep.
        init: ``"svd"`` (leading singular vectors of each unfolding) or ``"random"``.
        seed: seeds the random columns of the initialisation.
        extrapolate: try an extrapolated step after every sweep (kept only if it lowers the
            error); this usually cuts the number of sweeps several-fold.
        on_degenerate: what to do when diverging, cancelling components are detected:
            ``"stabilize"`` warn and re-run from the initialisation with Tikhonov-regularised
            normal equations (μ = ``stabilize_mu`` relative to diag(Vₙ));
            ``"reduce_rank"`` warn and retry with rank R − 1, R − 2, … until not degenerate
            (dropped components are returned as zero columns so the layer shape is kept);
            ``"warn"`` only warn; ``"raise"`` raise :class:`TensorslimError`.
        stabilize_mu: the Tikhonov load of the stabilised re-solve.
        kappa_limit: cancellation ratio κ = Σλ²/‖X̂‖² above which (and growing) the solution
            is called degenerate.
        ridge: tiny relative diagonal load that only guards round-off in the normal equations.
        dtype: working precision (float64 by default; factors are returned in it).

    Returns:
        :class:`CPResult` with unit-norm factor columns and the weights.
    """
    _check_cp_arguments(tensor, rank, init, on_degenerate, max_iter)
    x = tensor.detach().to(device="cpu", dtype=dtype)
    norm_x2 = float((x * x).sum())
    if norm_x2 == 0.0:
        zeros = [torch.zeros(s, rank, dtype=dtype) for s in x.shape]
        return CPResult(torch.zeros(rank, dtype=dtype), zeros, 0.0, 0, True, rank=0)
    init_factors = _init_factors(x, rank, init, torch.Generator().manual_seed(seed))

    run = als_runner(
        x, norm_x2, max_iter=max_iter, tol=tol, kappa_limit=kappa_limit, extrapolate=extrapolate
    )
    out = run(init_factors, ridge, on_degenerate in ("stabilize", "reduce_rank", "raise"))
    if not out.degenerate:
        return _result(out, rank)
    message = (
        f"CP-ALS rank {rank} on shape {tuple(x.shape)}: degenerate solution (components with "
        f"diverging norms cancel; Σλ²/‖X̂‖² = {out.kappa:.3g} after {len(out.errors)} sweeps)"
    )
    if on_degenerate == "raise":
        raise TensorslimError(message + "; lower the rank or use on_degenerate='stabilize'")
    if on_degenerate == "warn":
        warnings.warn(message, CPDegeneracyWarning, stacklevel=2)
        return _result(out, rank)
    if on_degenerate == "stabilize":
        warnings.warn(
            message + "; re-solving with Tikhonov-regularised ALS",
            CPDegeneracyWarning,
            stacklevel=2,
        )
        fix = run(init_factors, stabilize_mu, False)
        return _result(fix, rank, history=out.errors, stabilized=True)
    warnings.warn(message + "; retrying with a smaller rank", CPDegeneracyWarning, stacklevel=2)
    for smaller in range(rank - 1, 0, -1):
        fix = run([f[:, :smaller] for f in init_factors], ridge, True)
        if not fix.degenerate:
            return _padded(_result(fix, smaller, history=out.errors), rank)
    # Rank 1 is never degenerate (one component cannot cancel), so the loop always returns.
    raise AssertionError("unreachable")  # pragma: no cover


def als_runner(
    x: torch.Tensor,
    norm_x2: float,
    *,
    max_iter: int,
    tol: float,
    kappa_limit: float,
    extrapolate: bool,
) -> Callable[[list[torch.Tensor], float, bool], _AlsOutcome]:
    """ALS on ``x`` (‖x‖² = ``norm_x2``) as a function of what a retry changes: the starting
    factors, the ridge μ and whether to stop at a degenerate sweep."""

    def run(start: list[torch.Tensor], mu: float, stop: bool) -> _AlsOutcome:
        return _als(
            x,
            start,
            norm_x2,
            max_iter=max_iter,
            tol=tol,
            mu=mu,
            kappa_limit=kappa_limit,
            stop_on_degenerate=stop,
            extrapolate=extrapolate,
        )

    return run


def _check_cp_arguments(
    tensor: torch.Tensor, rank: int, init: str, on_degenerate: str, max_iter: int
) -> None:
    if tensor.ndim < 2:
        raise TensorslimError(f"CP needs a tensor with ≥ 2 modes, got shape {tuple(tensor.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise TensorslimError(f"CP rank must be a positive integer, got {rank!r}")
    if init not in ("svd", "random"):
        raise TensorslimError(f"unknown CP init '{init}': use 'svd' or 'random'")
    if on_degenerate not in ("stabilize", "reduce_rank", "warn", "raise"):
        raise TensorslimError(
            f"unknown on_degenerate '{on_degenerate}': use stabilize, reduce_rank, warn or raise"
        )
    if max_iter < 1:
        raise TensorslimError(f"CP max_iter must be ≥ 1, got {max_iter}")


def _result(
    out: _AlsOutcome,
    rank: int,
    history: list[float] = (),
    stabilized: bool = False,  # type: ignore[assignment]
) -> CPResult:
    """The public result of one ALS run (``history``: errors of earlier, abandoned runs)."""
    return CPResult(
        out.weights,
        out.factors,
        out.errors[-1],
        len(out.errors),
        out.converged,
        degenerate=out.degenerate,
        stabilized=stabilized,
        rank=rank,
        errors=[*history, *out.errors],
        cancellation=out.kappa,
    )


def _padded(result: CPResult, rank: int) -> CPResult:
    """``result`` with zero components appended up to ``rank`` (the layer keeps its shape)."""
    pad = rank - result.weights.numel()
    dtype = result.weights.dtype
    factors = [torch.cat([f, torch.zeros(f.shape[0], pad, dtype=dtype)], 1) for f in result.factors]
    return dataclasses.replace(
        result, weights=torch.cat([result.weights, torch.zeros(pad, dtype=dtype)]), factors=factors
    )


def cp_error(tensor: torch.Tensor, result: CPResult) -> float:
    """Relative Frobenius error ‖X − X̂‖/‖X‖ by explicit reconstruction (for checking)."""
    x = tensor.detach().to(result.weights.dtype)
    return float(torch.linalg.vector_norm(x - result.to_tensor()) / torch.linalg.vector_norm(x))
