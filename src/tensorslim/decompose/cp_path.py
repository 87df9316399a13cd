"""CP decompositions at several ranks along one warm-started ALS path.

Planning offers a ladder of CP ranks R₁ < R₂ < … per layer. Solving each rank from scratch
repeats the work of the smaller ones; instead the path solves R₁ from the HOSVD start (as
:func:`tensorslim.decompose.cp.cp_als` does) and starts every next rank from the previous
solution plus R_{k+1} − R_k new components taken from the residual E = X − X̂_k:

    new directions fᵏ_j = leading left singular vectors of the unfoldings E_(k)  (HOSVD of E),
    new weights   λ_j  = ⟨E, f⁰_j ∘ f¹_j ∘ …⟩     (the best scale of each rank-one term alone).

The old components are already near a stationary point, so ALS from this start converges in a
fraction of the sweeps a cold start needs. Each rank is then refined by ALS with the same
stopping rule and degeneracy policy as :func:`cp_als`; each result is a true CP decomposition of
its rank and its error is measured by explicit reconstruction.

Determinism: the path is a pure function of (X, ranks, settings), so replaying it up to rank R
reproduces the rank-R factors exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from tensorslim.decompose.cp import (
    CPDegeneracyWarning,
    CPResult,
    OnDegenerate,
    _AlsOutcome,
    _init_factors,
    _result,
    als_runner,
    cp_to_tensor,
    khatri_rao,
)
from tensorslim.errors import TensorslimError


def _extend(
    x: torch.Tensor, previous: CPResult | None, rank: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Starting factors for ``rank``: the previous solution plus residual components.

    Returned in :func:`_als`'s working form (unit columns, the last factor carries λ).
    """
    if previous is None:
        return _init_factors(x, rank, "svd", generator)
    old = previous.weights.numel()
    extra = rank - old
    residual = x - cp_to_tensor(previous.weights, previous.factors)
    new = _init_factors(residual, extra, "svd", generator)
    new = [f / torch.linalg.vector_norm(f, dim=0).clamp_min(1e-300) for f in new]
    # best scale of each new rank-one term on its own: ⟨E, f⁰ ∘ f¹ ∘ …⟩
    scale = residual.reshape(-1) @ khatri_rao(new)
    new[-1] = new[-1] * scale
    start = [*previous.factors[:-1], previous.factors[-1] * previous.weights]
    return [torch.cat([s, n], dim=1) for s, n in zip(start, new, strict=True)]


def cp_als_path(
    tensor: torch.Tensor,
    ranks: Sequence[int],
    *,
    max_iter: int = 150,
    tol: float = 1e-4,
    seed: int = 0,
    on_degenerate: OnDegenerate = "stabilize",
    stabilize_mu: float = 1e-2,
    kappa_limit: float = 20.0,
    ridge: float = 1e-10,
    dtype: torch.dtype = torch.float64,
) -> dict[int, CPResult]:
    """CP decompositions of ``tensor`` at every rank of ``ranks``, warm-started in order.

    Settings mean what they mean in :func:`cp_als`; ``on_degenerate="reduce_rank"`` is not
    offered on a path (a dropped component would break the warm start): use ``cp_als``.
    Returns rank → :class:`CPResult` (``errors`` holds the sweeps of that rank only).
    """
    order = sorted({int(r) for r in ranks})
    if not order or order[0] < 1:
        raise TensorslimError(f"CP path ranks must be positive integers, got {list(ranks)}")
    if on_degenerate not in ("stabilize", "warn", "raise"):
        raise TensorslimError(
            f"a CP rank path supports on_degenerate stabilize, warn or raise, not "
            f"'{on_degenerate}' (use cp_als per rank)"
        )
    x = tensor.detach().to(device="cpu", dtype=dtype)
    norm_x2 = float((x * x).sum())
    generator = torch.Generator().manual_seed(seed)
    als = als_runner(
        x, norm_x2, max_iter=max_iter, tol=tol, kappa_limit=kappa_limit, extrapolate=True
    )
    results: dict[int, CPResult] = {}
    previous: CPResult | None = None
    for rank in order:
        if norm_x2 == 0.0:
            zeros = [torch.zeros(s, rank, dtype=dtype) for s in x.shape]
            results[rank] = CPResult(torch.zeros(rank, dtype=dtype), zeros, 0.0, 0, True)
            continue
        start = _extend(x, previous, rank, generator)

        def run(mu: float, stop: bool, start: list[torch.Tensor] = start) -> _AlsOutcome:
            return als(start, mu, stop)

        out = run(ridge, on_degenerate != "warn")
        result = _result(out, rank)
        if out.degenerate:
            result = _degenerate(out, rank, tuple(x.shape), on_degenerate, run, stabilize_mu)
        results[rank] = result
        previous = result
    return results


def _degenerate(
    out: _AlsOutcome,
    rank: int,
    shape: tuple[int, ...],
    policy: str,
    run: Callable[[float, bool], _AlsOutcome],
    mu: float,
) -> CPResult:
    """The degeneracy policy of :func:`cp_als` applied to one rank of the path."""
    message = (
        f"CP-ALS rank {rank} on shape {shape}: degenerate solution (components with diverging "
        f"norms cancel; Σλ²/‖X̂‖² = {out.kappa:.3g} after {len(out.errors)} sweeps)"
    )
    if policy == "raise":
        raise TensorslimError(message + "; lower the rank or use on_degenerate='stabilize'")
    if policy == "warn":
        warnings.warn(message, CPDegeneracyWarning, stacklevel=3)
        return _result(out, rank)
    warnings.warn(
        message + "; re-solving with Tikhonov-regularised ALS", CPDegeneracyWarning, stacklevel=3
    )
    fix = run(mu, False)
    return _result(fix, rank, history=out.errors, stabilized=True)
