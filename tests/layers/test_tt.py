"""TTLinear: exact at full TT ranks (with and without padding), forward without the dense
matrix, FLOPs vs the counter, any batch shape."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import counted_flops
from tensorslim.errors import TensorslimError
from tensorslim.layers.tt import TTLinear, tt_flops_per_row, tt_modes_for


@given(
    in_features=st.integers(1, 70),
    out_features=st.integers(1, 40),
    d=st.integers(2, 3),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
@settings(max_examples=25, deadline=None)
def test_exact_at_full_ranks(
    in_features: int, out_features: int, d: int, bias: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias).double()
    layer = TTLinear.from_dense(lin, d=d)
    x = torch.randn(3, in_features, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.to_dense().weight, lin.weight, rtol=1e-9, atol=1e-10)
    assert layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)


def test_padding_for_a_large_prime() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(97, 10).double()
    layer = TTLinear.from_dense(lin)
    assert layer.in_modes == (7, 7, 2) and layer.padded_in == 98
    assert layer.out_modes == (5, 2, 1) and layer.padded_out == 10
    x = torch.randn(4, 97, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x))


def test_truncated_forward_matches_its_dense_and_never_builds_it() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(784, 128).double()
    layer = TTLinear.from_dense(lin, max_rank=6)
    assert max(layer.ranks) == 6
    x = torch.randn(2, 5, 784, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 5, 128)
    torch.testing.assert_close(y, layer.to_dense()(x))
    # The forward's matmuls are the cores' contractions only, in the cheaper order.
    assert counted_flops(layer, x) == layer.analytic_flops(tuple(x.shape))
    rows = 10
    assert layer.analytic_flops(tuple(x.shape)) == rows * tt_flops_per_row(
        layer.out_modes, layer.in_modes, layer.ranks
    )
    # Parameters are what a TT layer saves: over 40× fewer here (bias included).
    assert layer.analytic_params() * 40 < lin.weight.numel()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_both_contraction_orders_agree(direction: str) -> None:
    torch.manual_seed(3)
    lin = nn.Linear(90, 28).double()
    layer = TTLinear.from_dense(lin, max_rank=5)
    layer.direction = direction
    x = torch.randn(3, 90, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.to_dense()(x))
    assert counted_flops(layer, x) == 3 * tt_flops_per_row(
        layer.out_modes, layer.in_modes, layer.ranks, direction
    )


def test_eps_truncation_bound_holds_for_the_layer() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(64, 48).double()
    layer = TTLinear.from_dense(lin, eps=0.4)
    err = float(((layer.to_dense().weight - lin.weight).norm() / lin.weight.norm()).detach())
    assert err <= 0.4 + 1e-9
    assert layer.analytic_params() < lin.weight.numel() + 48


def test_config_rebuilds_the_structure() -> None:
    lin = nn.Linear(60, 24)
    layer = TTLinear.from_dense(lin, max_rank=4)
    cfg = layer.config()
    again = TTLinear(60, 24, cfg["out_modes"], cfg["in_modes"], cfg["ranks"])
    assert [p.shape for p in again.parameters()] == [p.shape for p in layer.parameters()]
    assert math.prod(cfg["out_modes"]) == 24 and math.prod(cfg["in_modes"]) == 60


def test_modes_helper_and_errors() -> None:
    assert tt_modes_for(1568, 256, 3) == ((8, 8, 4), (14, 14, 8))
    with pytest.raises(TensorslimError, match="ranks"):
        TTLinear(8, 8, (2, 4), (2, 4), (1, 2, 2))
    with pytest.raises(TensorslimError, match="cannot hold"):
        TTLinear(9, 8, (2, 4), (2, 4), (1, 2, 1))
    layer = TTLinear(8, 8, (2, 4), (2, 4), (1, 2, 1))
    with pytest.raises(TensorslimError, match="input features"):
        layer(torch.randn(2, 7))
