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
