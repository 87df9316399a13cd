"""Fit a DeBut chain to a dense weight: alternating least squares, or Adam on the factors.

Target W (out × in), chain F_K ⋯ F_1 (input side first). Objective ‖W − F_K ⋯ F_1‖²_F.

**ALS.** One factor at a time, the others fixed: with L = F_K ⋯ F_(k+1) (out × p_k) and
R = F_(k−1) ⋯ F_1 (q_k × in) the objective is a least-squares problem in F_k's nonzeros,
‖W − L F_k R‖². F_k's nonzeros fall into channels (b, d) — the r×s dense grid M_bd that maps
inputs C_bd = {b·s·t + j·t + d} to outputs O_bd = {b·r·t + i·t + d} — and the normal equations
of one channel with the others fixed are

    (L_Oᵀ L_O) M_bd (R_C R_Cᵀ) = L_Oᵀ (W − Σ_(other channels) …) R_Cᵀ,

solved block by block, batched over all channels: M = G_L⁻¹ B G_R⁻¹ with
G_L = L_Oᵀ L_O (r×r), G_R = R_C R_Cᵀ (s×s), B = (Lᵀ W Rᵀ) restricted to the channel. When all
neighbours of the chain merge exactly (t_(k+1) = r_k t_k, e.g. every generated chain) each weight
entry depends on one nonzero of F_k only, the channels do not interact, and this one batched
block solve *is* the exact least-squares update. Otherwise the channels are coupled and the
update runs preconditioned conjugate gradients on the factor's full normal equations with that
block solve as preconditioner, warm-started from the current factor — every CG step lowers the
objective, so ALS never increases the error either way.

Sweeps alternate direction: left to right (input side first), then right to left, … (or
output side first, ``first="output"``, as the official code's list runs), R (or L)
is updated incrementally along the sweep; the other side is precomputed for the sweep. Lᵀ W,
L(·) and Lᵀ(·) are applied with the fast chain multiply (cost columns × nonzeros), never as
dense products. After each sweep the relative Frobenius error ‖W − Ŵ‖_F / ‖W‖_F is recorded.

**Gradient fit.** Adam on all factors' nonzeros minimising ‖W − Ŵ‖²_F / ‖W‖²_F, Ŵ built by the
fast multiply (cost in × nonzeros per step).

Computation is in float64 on the weight's device; results are returned in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tensorslim.errors import TensorslimError
from tensorslim.layers.debut_chain import DeButChain, DeButFactor
from tensorslim.layers.debut_multiply import (
    apply_factor,
    chain_dense,
    chain_multiply,
    random_factor_weights,
    transpose_chain,
)

_DTYPE = torch.float64


def _check_target(
    weight: torch.Tensor, chain: DeButChain, dtype: torch.dtype = _DTYPE
) -> torch.Tensor:
    if weight.dim() != 2:
        raise TensorslimError(
            f"DeBut fit needs a 2-D weight (out × in), got shape {tuple(weight.shape)}"
        )
    chain.check_shape(weight.shape[0], weight.shape[1], "the weight")
    return weight.detach().to(dtype)


def relative_error(
    weight: torch.Tensor, chain: DeButChain, weights: Sequence[torch.Tensor]
) -> float:
    """‖W − F_K ⋯ F_1‖_F / ‖W‖_F."""
    target = weight.detach().to(_DTYPE)
    approx = chain_dense(chain.factors, [w.detach().to(_DTYPE) for w in weights])
    return float(
        torch.linalg.vector_norm(target - approx)
        / torch.linalg.vector_norm(target).clamp_min(1e-300)
    )


def _apply_chain_t(
    factors: Sequence[DeButFactor], weights: Sequence[torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """(F_K ⋯ F_1)ᵀ X for X (p_K × M); identity for an empty chain."""
    if not factors:
        return x
    tf, tw = transpose_chain(factors, weights)
    return chain_multiply(tf, tw, x)


def _apply_chain(
    factors: Sequence[DeButFactor], weights: Sequence[torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    if not factors:
        return x
    return chain_multiply(factors, weights, x)


def _times(spec: DeButFactor, w: torch.Tensor, mat: torch.Tensor | None) -> torch.Tensor:
    """F · mat, where ``None`` stands for the identity (then F itself, p × q)."""
    return spec.dense(w) if mat is None else apply_factor(spec, w, mat)


def _times_t(spec: DeButFactor, w: torch.Tensor, mat: torch.Tensor | None) -> torch.Tensor:
    """Fᵀ · mat, where ``None`` stands for the identity (then Fᵀ, q × p)."""
    if mat is None:
        return spec.dense(w).T
    return apply_factor(spec.transpose(), w.transpose(1, 2), mat)


def _channel_products(
    left: torch.Tensor, right: torch.Tensor | None, spec: DeButFactor
) -> torch.Tensor:
    """C[b,i,j,d] = Σ_n left[b·rt+i·t+d, n] · right[b·st+j·t+d, n], shape (B, r, s, t).

    ``left`` is p × n, ``right`` is q × n (``None``: the identity, then C gathers ``left`` at
    the pattern); a batched matmul over (b, d).
    """
    if right is None:
        rows, cols = spec.indices(left.device)
        return left[rows, cols]
    blocks, r, s, t = spec.weight_shape
    n = left.shape[1]
    lv = left.reshape(blocks, r, t, n).transpose(1, 2).reshape(blocks * t, r, n)
    rv = right.reshape(blocks, s, t, n).transpose(1, 2).reshape(blocks * t, s, n)
    return torch.bmm(lv, rv.transpose(1, 2)).reshape(blocks, t, r, s).permute(0, 2, 3, 1)


def _channel_grams(
    lt: torch.Tensor | None, right: torch.Tensor | None, spec: DeButFactor
) -> tuple[torch.Tensor, torch.Tensor]:
    """G_L (B·t, r, r) from Lᵀ (p × out) and G_R (B·t, s, s) from R (q × in), regularised."""
    blocks, r, s, t = spec.weight_shape
    like = lt if lt is not None else right
    assert like is not None
    if lt is None:
        lt = torch.eye(spec.p, dtype=like.dtype, device=like.device)
    if right is None:
        right = torch.eye(spec.q, dtype=like.dtype, device=like.device)
    lv = lt.reshape(blocks, r, t, -1).transpose(1, 2).reshape(blocks * t, r, -1)
    rv = right.reshape(blocks, s, t, -1).transpose(1, 2).reshape(blocks * t, s, -1)
    gl = torch.bmm(lv, lv.transpose(1, 2))
    gr = torch.bmm(rv, rv.transpose(1, 2))
    return _ridge(gl), _ridge(gr)


def _diagonal_grams(
    lt: torch.Tensor | None, right: torch.Tensor | None, spec: DeButFactor, like: torch.Tensor
) -> torch.Tensor:
    """diag(G_L)[b,i,d] · diag(G_R)[b,j,d] in weight layout (B, r, s, t), floored above 0."""
    blocks, r, s, t = spec.weight_shape
    ones = torch.ones((), dtype=like.dtype, device=like.device)
    # ‖column (b,i,d) of L‖² and ‖row (b,j,d) of R‖² (1 for an identity)
    left_sq = ones if lt is None else (lt * lt).sum(1).reshape(blocks, r, 1, t)
    right_sq = ones if right is None else (right * right).sum(1).reshape(blocks, 1, s, t)
    prod = (left_sq * right_sq).expand(spec.weight_shape)
    info = torch.finfo(prod.dtype)
    return prod + (1e-30 * prod.mean().clamp_min(info.tiny) + info.tiny)


def _ridge(g: torch.Tensor) -> torch.Tensor:
    # a ridge relative to each diagonal entry (scale-free per coordinate) keeps the solve well
    # posed without visibly moving it; the tiny floor makes channels whose L or R columns
    # vanish solvable (their update is ~0)
    diag = torch.diagonal(g, dim1=-2, dim2=-1)
    info = torch.finfo(g.dtype)
    floor = 1e-30 * diag.mean().clamp_min(info.tiny) + info.tiny
    return g + torch.diag_embed(100 * info.eps * diag + floor)


def _block_solve(
    gl: torch.Tensor, gr: torch.Tensor, rhs: torch.Tensor, spec: DeButFactor
) -> torch.Tensor:
    """Per channel: M = G_L⁻¹ · RHS · G_R⁻¹; rhs and result in weight layout (B, r, s, t)."""
    blocks, r, s, t = spec.weight_shape
    b = rhs.permute(0, 3, 1, 2).reshape(blocks * t, r, s)
    x = torch.linalg.solve(gl, b)
    x = torch.linalg.solve(gr, x.transpose(1, 2)).transpose(1, 2)  # G_R symmetric
    return x.reshape(blocks, t, r, s).permute(0, 2, 3, 1)


def _update_factor(
    k: int,
    chain: DeButChain,
    weights: list[torch.Tensor],
    target: torch.Tensor,
    right: torch.Tensor | None,
    lt: torch.Tensor | None,
    cg_iters: int,
) -> None:
    """Least-squares update of factor k in place, given R = F_(k−1)⋯F_1 and Lᵀ = (F_K⋯F_(k+1))ᵀ."""
    spec = chain[k]
    after_f, after_w = chain.factors[k + 1 :], weights[k + 1 :]
    lt_w = _apply_chain_t(after_f, after_w, target)  # Lᵀ W (p_k × in)
    rhs = _channel_products(lt_w, right, spec)
    if chain.single_path:
        # one path per weight entry: the columns of L_O (and rows of R_C) of one channel have
        # disjoint supports, so G_L and G_R are diagonal and the block solve is a division
        weights[k] = rhs / _diagonal_grams(lt, right, spec, rhs)
        return
    gl, gr = _channel_grams(lt, right, spec)

    def normal_op(w: torch.Tensor) -> torch.Tensor:
        # P(Lᵀ L F(w) R Rᵀ): the normal-equation operator restricted to the pattern
        fr = _times(spec, w, right)
        lfr = _apply_chain(after_f, after_w, fr)
        return _channel_products(_apply_chain_t(after_f, after_w, lfr), right, spec)

    w = weights[k]
    residual = rhs - normal_op(w)
    z = _block_solve(gl, gr, residual, spec)
    direction = z
    rz = float((residual * z).sum())
    start = math.sqrt(float((residual * residual).sum()))
    for _ in range(cg_iters):
        if rz <= 0 or start == 0.0:
            break
        a_dir = normal_op(direction)
        curvature = float((direction * a_dir).sum())
        if curvature <= 0:
            break
        alpha = rz / curvature
        w = w + alpha * direction
        residual = residual - alpha * a_dir
        if math.sqrt(float((residual * residual).sum())) <= 1e-10 * start:
            break
        z = _block_solve(gl, gr, residual, spec)
        rz_new = float((residual * z).sum())
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    weights[k] = w


def _starting_factors(
    chain: DeButChain,
    init: Sequence[torch.Tensor] | None,
    start: str,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """Copies of ``init``, or factors drawn by ``start`` ("normal" or "uniform")."""
    if init is None and start == "uniform":
        return [
            torch.rand(spec.weight_shape, generator=generator, dtype=dtype).to(device)
            for spec in chain
        ]
    if init is None:
        return [
            w.to(device) for w in random_factor_weights(chain, generator=generator, dtype=dtype)
        ]
    weights = [w.detach().to(device=device, dtype=dtype).clone() for w in init]
    for spec, w in zip(chain, weights, strict=True):
        if tuple(w.shape) != spec.weight_shape:
            raise TensorslimError(
                f"initial factor for ({spec.text}) has shape {tuple(w.shape)}, "
                f"needs {spec.weight_shape}"
            )
    return weights


def als_fit(
    weight: torch.Tensor,
    chain: DeButChain | str,
    *,
    sweeps: int = 6,
    init: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    cg_iters: int = 25,
    tol: float = 0.0,
    dtype: torch.dtype = _DTYPE,
    start: str = "normal",
    first: str = "input",
    balance: bool = True,
) -> tuple[list[torch.Tensor], list[float]]:
    """ALS fit of ``chain`` to ``weight`` (out × in).

    Returns the factors' nonzeros (float64, shapes (B, r, s, t), input side first) and the
    relative Frobenius error after each sweep (sweeps alternate left→right, right→left).
    ``init``: starting factors, else drawn by ``start``: "normal" (variance-preserving
    N(0, 1/s_k), default) or "uniform" (U[0, 1), the official ``Generate_Chain``). ``first``:
    the side the first sweep starts from ("input", or "output" as the official code).
    ``balance``: rescale per intermediate feature, then to equal factor norms at the end (the
    product is unchanged; the official code does not). Stops early when a sweep improves the
    error by less than ``tol`` (relative). ``dtype``: float64 (default) for initialisation;
    float32 halves the time of quick error estimates.
    """
    chain = DeButChain.parse(chain)
    if sweeps < 1:
        raise TensorslimError(f"ALS needs at least one sweep, got {sweeps}")
    if start not in ("normal", "uniform"):
        raise TensorslimError(f"unknown ALS start '{start}': use normal or uniform")
    if first not in ("input", "output"):
        raise TensorslimError(f"unknown ALS first sweep '{first}': use input or output")
    target = _check_target(weight, chain, dtype)
    weights = _starting_factors(chain, init, start, generator, dtype, target.device)
    n_factors = len(chain)
    # the identity ends of the sweep stay implicit (None): no in×in / out×out products with it
    norm = float(torch.linalg.vector_norm(target)) or 1.0
    errors: list[float] = []
    parity = 0 if first == "input" else 1
    for sweep in range(sweeps):
        if sweep % 2 == parity:  # left to right: Lᵀ for every k from the current factors
            lts: list[torch.Tensor | None] = [None] * n_factors
            for k in range(n_factors - 2, -1, -1):
                lts[k] = _times_t(chain[k + 1], weights[k + 1], lts[k + 1])
            right: torch.Tensor | None = None
            for k in range(n_factors):
                _update_factor(k, chain, weights, target, right, lts[k], cg_iters)
                right = _times(chain[k], weights[k], right)
            assert right is not None
            approx = right
        else:  # right to left: R for every k from the current factors
            rights: list[torch.Tensor | None] = [None] * n_factors
            for k in range(1, n_factors):
                rights[k] = _times(chain[k - 1], weights[k - 1], rights[k - 1])
            lt: torch.Tensor | None = None
            for k in range(n_factors - 1, -1, -1):
                _update_factor(k, chain, weights, target, rights[k], lt, cg_iters)
                lt = _times_t(chain[k], weights[k], lt)
            assert lt is not None
            approx = lt.t()  # Lᵀ for k = 0 covers the whole chain: (F_K⋯F_1)ᵀ
        errors.append(float(torch.linalg.vector_norm(target - approx)) / norm)
        if tol > 0 and len(errors) > 1 and errors[-2] - errors[-1] < tol * errors[-2]:
            break
    if balance:
        _balance(chain, weights)
    return weights, errors


def _balance_features(chain: DeButChain, weights: list[torch.Tensor], passes: int = 3) -> None:
    """Equalise, for every intermediate feature, its row in F_k and its column in F_(k+1).

    F_(k+1) F_k = (F_(k+1) D⁻¹)(D F_k) for any positive diagonal D, so the product is unchanged;
    D_ii = √(‖column i of F_(k+1)‖ / ‖row i of F_k‖) makes both norms their geometric mean.
    ALS leaves this split arbitrary per feature, and a feature with a huge row and a tiny
    column (seen at 4× on LeNet's 5-factor fc1: nonzeros up to 94 at std 3) makes fine-tuning
    unstable.
    """
    for _ in range(passes):
        for k in range(len(chain) - 1):
            first, second = chain[k], chain[k + 1]
            rows, _ = first.indices(weights[k].device)
            _, cols = second.indices(weights[k + 1].device)
            row_sq = (
                weights[k]
                .new_zeros(first.p)
                .index_add_(0, rows.reshape(-1), weights[k].reshape(-1) ** 2)
            )
            col_sq = (
                weights[k + 1]
                .new_zeros(second.q)
                .index_add_(0, cols.reshape(-1), weights[k + 1].reshape(-1) ** 2)
            )
            ok = (row_sq > 0) & (col_sq > 0)
            scale = torch.where(ok, (col_sq / row_sq.where(ok, 1.0)) ** 0.25, 1.0)
            weights[k] = weights[k] * scale[rows]
            weights[k + 1] = weights[k + 1] / scale[cols]


def _balance(chain: DeButChain, weights: list[torch.Tensor]) -> None:
    """Rescale per feature (``_balance_features``), then factors to equal
    Frobenius-norm-per-√nonzero; the product is unchanged.

    ALS leaves the scale split between factors arbitrary; equal scales keep gradients of
    later fine-tuning balanced across the chain.
    """
    _balance_features(chain, weights)
    norms = [float(torch.linalg.vector_norm(w)) / math.sqrt(w.numel()) for w in weights]
    if any(n == 0.0 or not math.isfinite(n) for n in norms):
        return
    geo = math.exp(sum(math.log(n) for n in norms) / len(norms))
    for k, n in enumerate(norms):
        weights[k] = weights[k] * (geo / n)


def grad_fit(
    weight: torch.Tensor,
    chain: DeButChain | str,
    *,
    steps: int = 300,
    lr: float = 0.02,
    init: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    report_every: int | None = None,
) -> tuple[list[torch.Tensor], list[float]]:
    """Adam on the factors' nonzeros minimising ‖W − Ŵ‖²/‖W‖² (cosine-decayed learning rate).

    Returns the factors (float64) and the relative error every ``report_every`` steps
    (default: 10 reports) and at the end.
    """
    chain = DeButChain.parse(chain)
    if steps < 1:
        raise TensorslimError(f"gradient fit needs at least one step, got {steps}")
    target = _check_target(weight, chain)
    device = target.device
    if init is None:
        start = random_factor_weights(chain, generator=generator, dtype=_DTYPE)
    else:
        start = [w.detach().to(_DTYPE) for w in init]
    params = [w.to(device).clone().requires_grad_(True) for w in start]
    norm2 = float((target * target).sum()) or 1.0
    # start from the best single scale of the random product (a cheap, exact 1-D fit)
    with torch.no_grad():
        approx = chain_dense(chain.factors, params)
        scale = float((approx * target).sum()) / max(float((approx * approx).sum()), 1e-300)
        if scale != 0.0:
            per = abs(scale) ** (1.0 / len(params))
            for k, p in enumerate(params):
                p.mul_(per * (math.copysign(1.0, scale) if k == 0 else 1.0))
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    every = report_every or max(1, steps // 10)
    errors: list[float] = []
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        approx = chain_dense(chain.factors, params)
        loss = ((approx - target) ** 2).sum() / norm2
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == steps:
            errors.append(math.sqrt(max(float(loss.detach()), 0.0)))
    weights = [p.detach() for p in params]
    errors[-1] = relative_error(target, chain, weights)
    return weights, errors


def bp_fit(
    weight: torch.Tensor,
    chain: DeButChain | str,
    *,
    steps: int = 300,
    lr: float = 0.1,
    lr_decay: float = 0.5,
    init: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], list[float]]:
    """The official gradient initialisation (``ALS_Initialization/main.py --type_init BP``).

    From U[0, 1) factors (``Generate_Chain``), each step draws one probe x ~ U[0, 1)^in and
    takes a plain gradient step w ← w − lr·∂‖Wx − F_K ⋯ F_1 x‖₂/∂w on the nonzeros. The first
    step uses ``lr``; the official code then sets ``lr = 0.5 · lr_decay`` (its decay line
    assigns instead of multiplying), which every later step uses. Returns the factors (float64)
    and the relative Frobenius error after every step. ``grad_fit`` minimises the full
    ‖W − Ŵ‖_F with Adam instead, which fits far better per step.
    """
    chain = DeButChain.parse(chain)
    if steps < 1:
        raise TensorslimError(f"gradient fit needs at least one step, got {steps}")
    target = _check_target(weight, chain)
    device = target.device
    start = _starting_factors(chain, init, "uniform", generator, _DTYPE, device)
    params = [w.clone().requires_grad_(True) for w in start]
    errors: list[float] = []
    for step in range(steps):
        x = torch.rand(chain.in_features, 1, generator=generator, dtype=_DTYPE).to(device)
        loss = torch.linalg.vector_norm(target @ x - chain_multiply(chain.factors, params, x))
        grads = torch.autograd.grad(loss, params)
        rate = lr if step == 0 else 0.5 * lr_decay
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(rate * g)
        errors.append(relative_error(target, chain, params))
    return [p.detach() for p in params], errors
