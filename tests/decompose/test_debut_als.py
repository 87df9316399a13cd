"""ALS and gradient fits of DeBut chains to dense weights."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorslim.decompose.debut_als import als_fit, grad_fit, relative_error
from tensorslim.errors import TensorslimError
from tensorslim.layers.debut import chain_dense, random_factor_weights
from tensorslim.layers.debut_chain import DeButChain, chain_from_parts, generate_chains

DT = torch.float64
# coupled channels (several paths per weight entry): ALS needs its CG inner solve here
MULTI_PATH = DeButChain.parse("6 6 3 3 1  6 6 2 2 1  6 6 3 3 1")


def non_increasing(errors: list[float]) -> bool:
    # relative slack for rounding, absolute slack for fits that are already exact (~1e-12)
    return all(b <= a * (1 + 1e-9) + 1e-9 for a, b in itertools.pairwise(errors))


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=2, max_size=4),
    st.data(),
    st.integers(0, 10_000),
)
def test_als_error_never_increases_on_random_targets(
    rs: list[int], data: st.DataObject, seed: int
) -> None:
    ss = data.draw(st.lists(st.integers(1, 4), min_size=len(rs), max_size=len(rs)))
    chain = chain_from_parts(rs, ss)
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(chain.out_features, chain.in_features, generator=gen, dtype=DT)
    weights, errors = als_fit(target, chain, sweeps=5, generator=gen)
    assert len(errors) == 5
    assert non_increasing(errors)
    assert errors[-1] == pytest.approx(relative_error(target, chain, weights), rel=1e-9)
    assert errors[-1] <= 1.0 + 1e-9  # never worse than the zero matrix


def test_als_is_exact_when_the_target_is_a_product_of_the_chain() -> None:
    for chain in (
        DeButChain.parse("16 24 4 6 1  16 16 2 2 4  16 16 2 2 8"),
        generate_chains(30, 42, ratio=2, limit=1)[0].chain,
    ):
        gen = torch.Generator().manual_seed(1)
        target = chain_dense(chain.factors, random_factor_weights(chain, generator=gen, dtype=DT))
        weights, errors = als_fit(target, chain, sweeps=3, generator=gen)
        assert errors[-1] < 1e-8
        torch.testing.assert_close(chain_dense(chain.factors, weights), target)


def test_als_on_coupled_channels_is_monotone_and_fits_its_own_products() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(6, 6, generator=gen, dtype=DT)
    _, errors = als_fit(target, MULTI_PATH, sweeps=6, generator=gen)
    assert non_increasing(errors)
    own = chain_dense(
        MULTI_PATH.factors, random_factor_weights(MULTI_PATH, generator=gen, dtype=DT)
    )
    _, errors = als_fit(own, MULTI_PATH, sweeps=30, generator=gen)
    assert non_increasing(errors)
    assert errors[-1] < 0.05 * errors[0]


def test_als_early_stop_and_warm_start() -> None:
    chain = generate_chains(16, 16, ratio=2, limit=1)[0].chain
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(16, 16, generator=gen, dtype=DT)
    weights, errors = als_fit(target, chain, sweeps=50, tol=1e-3, generator=gen)
    assert len(errors) < 50
    _, again = als_fit(target, chain, sweeps=1, init=weights)
    assert again[0] <= errors[-1] * (1 + 1e-9)


def test_grad_fit_improves_on_its_start_and_approaches_als() -> None:
    chain = generate_chains(12, 18, ratio=2, limit=1)[0].chain
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(12, 18, generator=gen, dtype=DT)
    weights, errors = grad_fit(target, chain, steps=250, report_every=10, generator=gen)
    assert non_increasing(errors[5:])  # Adam wobbles early; with the cosine decay it settles
    assert errors[-1] < 0.9 * errors[0]
    assert errors[-1] == pytest.approx(relative_error(target, chain, weights), rel=1e-9)
    _, als_errors = als_fit(target, chain, sweeps=10, generator=gen)
    assert errors[-1] < als_errors[-1] * 1.3


def test_bad_targets_are_clear_errors() -> None:
    chain = DeButChain.parse("4 4 4 4 1")
    with pytest.raises(TensorslimError, match="2-D"):
        als_fit(torch.zeros(4, 4, 1), chain)
    with pytest.raises(TensorslimError, match="4 → 4 but the weight is 5 → 4"):
        als_fit(torch.zeros(4, 5), chain)
    with pytest.raises(TensorslimError, match="sweep"):
        als_fit(torch.zeros(4, 4), chain, sweeps=0)
    with pytest.raises(TensorslimError, match="shape"):
        als_fit(torch.zeros(4, 4), chain, init=[torch.zeros(2, 2, 2, 2)])
    # a zero target is fitted exactly (and without dividing by zero)
    _, errors = als_fit(torch.zeros(4, 4), chain, sweeps=1)
    assert errors == [0.0]


def test_single_path_channel_grams_are_diagonal() -> None:
    # the reason the single-path update may divide instead of solving block systems
    from tensorslim.decompose.debut_als import _channel_grams
    from tensorslim.layers.debut import apply_factor

    chain = generate_chains(24, 36, ratio=2, num_factors=3, limit=1)[0].chain
    assert chain.single_path
    gen = torch.Generator().manual_seed(2)
    weights = random_factor_weights(chain, generator=gen, dtype=DT)
    right = torch.eye(36, dtype=DT)
    right = apply_factor(chain[0], weights[0], right)  # R for factor 1
    lt = apply_factor(chain[2].transpose(), weights[2].transpose(1, 2), torch.eye(24, dtype=DT))
    gl, gr = _channel_grams(lt, right, chain[1])
    for g in (gl, gr):
        off = g - torch.diag_embed(torch.diagonal(g, dim1=-2, dim2=-1))
        assert float(off.abs().max()) < 1e-12 * float(g.abs().max())


# ------------------------------------------------------------- the official ALS procedure


def official_pattern(spec: tuple[int, ...]) -> list[tuple[int, int]]:
    """Nonzero positions of one factor, as ``Generate_Chain`` places them (row-major)."""
    p, _, r, s, t = spec
    return [
        (j * r * t + m * t + d, j * s * t + n * t + d)
        for j in range(p // (r * t))
        for m in range(r)
        for d in range(t)
        for n in range(s)
    ]


def official_als(
    target: torch.Tensor, specs_out_first: list[tuple[int, ...]], start: list[torch.Tensor], sweeps
):
    """ALS_Initialization/main.py (type ALS): factors B_0 … B_(K−1), output side first,
    D ≈ B_0 ⋯ B_(K−1); each update solves vec(D) = [vec(A[:, o] C[c, :])]_(o,c) · b by
    pseudo-inverse, sweeps alternate starting at B_0; the relative error after each sweep."""
    factors = [m.clone() for m in start]
    n = len(factors)
    errors = []
    for sweep in range(sweeps):
        order = range(n) if sweep % 2 == 0 else range(n - 1, -1, -1)
        for k in order:
            a = torch.eye(target.shape[0], dtype=DT)
            for m in factors[:k]:
                a = a @ m
            c = torch.eye(factors[k].shape[1], dtype=DT)
            for m in factors[k + 1 :]:
                c = c @ m
            positions = official_pattern(specs_out_first[k])
            design = torch.stack([torch.outer(a[:, o], c[q, :]).reshape(-1) for o, q in positions])
            values = torch.linalg.pinv(design.T) @ target.reshape(-1)
            new = torch.zeros_like(factors[k])
            for (o, q), v in zip(positions, values, strict=True):
                new[o, q] = v
            factors[k] = new
        product = factors[0]
        for m in factors[1:]:
            product = product @ m
        errors.append(float(torch.linalg.norm(product - target) / torch.linalg.norm(target)))
    return factors, errors


@pytest.mark.parametrize("text", ["8 12 2 3 1  8 8 4 4 2", "12 12 3 3 1  12 12 2 2 3  12 12 2 2 6"])
def test_paper_options_follow_the_official_als_sweep_for_sweep(text: str) -> None:
    chain = DeButChain.parse(text)
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(chain.out_features, chain.in_features, generator=gen, dtype=DT)
    start = [torch.rand(spec.weight_shape, generator=gen, dtype=DT) for spec in chain]
    dense_start = [spec.dense(w) for spec, w in zip(chain, start, strict=True)][::-1]
    specs_out_first = [(f.p, f.q, f.r, f.s, f.t) for f in chain][::-1]
    official_factors, official_errors = official_als(target, specs_out_first, dense_start, 3)
    weights, errors = als_fit(target, chain, sweeps=3, init=start, first="output", balance=False)
    assert errors == pytest.approx(official_errors, rel=1e-7, abs=1e-10)
    for spec, w, m in zip(chain, weights, official_factors[::-1], strict=True):
        torch.testing.assert_close(spec.dense(w), m)


def test_uniform_start_is_the_official_generate_chain_draw() -> None:
    chain = DeButChain.parse("8 12 2 3 1  8 8 4 4 2")
    target = torch.randn(8, 12, dtype=DT)
    drawn = als_fit(
        target, chain, sweeps=2, start="uniform", generator=torch.Generator().manual_seed(3)
    )
    gen = torch.Generator().manual_seed(3)
    start = [torch.rand(spec.weight_shape, generator=gen, dtype=DT) for spec in chain]
    given_start = als_fit(target, chain, sweeps=2, init=start)
    assert drawn[1] == pytest.approx(given_start[1], rel=1e-12)
    with pytest.raises(TensorslimError, match="ALS start"):
        als_fit(target, chain, start="zeros")
    with pytest.raises(TensorslimError, match="first sweep"):
        als_fit(target, chain, first="middle")


def test_bp_fit_is_the_official_probe_gradient_step() -> None:
    # re-implemented: dense factors (output side first), one U[0,1) probe per step, loss
    # ‖Dx − B_0⋯B_(K−1) x‖ (not squared), w ← w − lr·grad on the pattern, lr 0.1 then 0.25
    from tensorslim.decompose.debut_als import bp_fit

    chain = DeButChain.parse("8 12 2 3 1  8 8 4 4 2")
    target = torch.randn(8, 12, generator=torch.Generator().manual_seed(1), dtype=DT)
    gen = torch.Generator().manual_seed(7)
    start = [torch.rand(spec.weight_shape, generator=gen, dtype=DT) for spec in chain]
    probes = [torch.rand(12, 1, generator=gen, dtype=DT) for _ in range(4)]
    factors = [spec.dense(w).requires_grad_(True) for spec, w in zip(chain, start, strict=True)]
    masks = [spec.dense(torch.ones(spec.weight_shape, dtype=DT)) != 0 for spec in chain]
    for step, x in enumerate(probes):
        out = x
        for m in factors:  # input side first
            out = m @ out
        loss = torch.linalg.norm(target @ x - out)
        grads = torch.autograd.grad(loss, factors)
        lr = 0.1 if step == 0 else 0.25
        factors = [
            (m - lr * g * mask).detach().requires_grad_(True)
            for m, g, mask in zip(factors, grads, masks, strict=True)
        ]
    gen = torch.Generator().manual_seed(7)
    weights, errors = bp_fit(target, chain, steps=4, generator=gen)
    for spec, w, m in zip(chain, weights, factors, strict=True):
        torch.testing.assert_close(spec.dense(w), m.detach())
    assert len(errors) == 4 and errors[-1] == pytest.approx(relative_error(target, chain, weights))


@pytest.mark.parametrize("text", ["8 12 2 3 1  8 8 4 4 2", "6 6 3 3 1  6 6 2 2 1  6 6 3 3 1"])
def test_balance_undoes_a_per_feature_rescaling_without_changing_the_product(text: str) -> None:
    from tensorslim.decompose.debut_als import _balance

    chain = DeButChain.parse(text)
    gen = torch.Generator().manual_seed(2)
    weights = random_factor_weights(chain, generator=gen, dtype=DT)
    product = chain_dense(chain.factors, weights)
    # feature 1 between factors 0 and 1: its row in F_0 ×1e3, its column in F_1 ×1e-3
    rows, _ = chain[0].indices()
    _, cols = chain[1].indices()
    skewed = [w.clone() for w in weights]
    skewed[0][rows == 1] *= 1e3
    skewed[1][cols == 1] *= 1e-3
    torch.testing.assert_close(chain_dense(chain.factors, skewed), product)
    _balance(chain, skewed)
    torch.testing.assert_close(chain_dense(chain.factors, skewed), product)
    biggest = max(float(w.abs().max()) for w in weights)
    assert max(float(w.abs().max()) for w in skewed) < 10 * biggest
