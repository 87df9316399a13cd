"""LowRankLinear / LowRankConv2d: exactness at full rank, Eckart–Young, FLOPs and params."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import counted_flops
from tensorslim.decompose.svd import conv_weight_to_matrix, singular_values
from tensorslim.errors import TensorslimError
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear

DOUBLE = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-9}


def full_rank(conv: nn.Conv2d, scheme: str) -> int:
    n, c, kh, kw = conv.weight.shape
    return min(n, c * kh * kw) if scheme == "channel" else min(n * kw, c * kh)


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    """A Conv2d geometry with every padding form PyTorch accepts ('same' only at stride 1)."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "same":
        stride: int | tuple[int, int] = 1
    else:
        stride = draw(st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 3), st.integers(1, 2))))
    padding = {
        "int": draw(st.integers(0, 2)),
        "tuple": draw(st.tuples(st.integers(0, 2), st.integers(0, 2))),
        "same": "same",
        "valid": "valid",
    }[padding_kind]
    dilation = draw(st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2))))
    return {
        "c": draw(st.integers(1, 5)),
        "n": draw(st.integers(1, 6)),
        "kernel": (kh, kw),
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "bias": draw(st.booleans()),
        "scheme": draw(st.sampled_from(["channel", "spatial"])),
        # big enough for the largest dilated kernel (2·(3−1)+1 = 5) without padding
        "hw": (draw(st.integers(5, 9)), draw(st.integers(5, 9))),
    }


def make_conv(case: dict) -> nn.Conv2d:
    return nn.Conv2d(
        case["c"],
        case["n"],
        case["kernel"],
        case["stride"],
        case["padding"],
        case["dilation"],
        bias=case["bias"],
        dtype=DOUBLE,
    )


@settings(max_examples=30, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_conv_full_rank_is_exact_and_counts_match_the_flop_counter(case: dict, seed: int) -> None:
    torch.manual_seed(seed)
    conv = make_conv(case)
    rank = full_rank(conv, case["scheme"])
    layer = LowRankConv2d.from_dense(conv, rank, case["scheme"])
    x = torch.randn(2, case["c"], *case["hw"], dtype=DOUBLE)
    want = conv(x)
    got = layer(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)

    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d)
    assert (dense.bias is None) == (conv.bias is None)
    torch.testing.assert_close(dense.weight, conv.weight, **TOL)
    torch.testing.assert_close(dense(x), want, **TOL)

    assert layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)
    n, c, kh, kw = conv.weight.shape
    per_rank = c * kh * kw + n if case["scheme"] == "channel" else c * kh + n * kw
    bias = n if case["bias"] else 0
    assert layer.analytic_params() == rank * per_rank + bias
    assert layer.analytic_params() == sum(p.numel() for p in layer.parameters())
    assert layer.config() == {"rank": rank, "scheme": case["scheme"]}


@settings(max_examples=30, deadline=None)
@given(
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 12),
    bias=st.booleans(),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_linear_full_rank_is_exact_and_counts_match(
    in_features: int, out_features: int, bias: bool, lead: list[int], seed: int
) -> None:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=DOUBLE)
    rank = min(in_features, out_features)
    layer = LowRankLinear.from_dense(linear, rank)
    x = torch.randn(*lead, in_features, dtype=DOUBLE)
    torch.testing.assert_close(layer(x), linear(x), **TOL)
    dense = layer.to_dense()
    torch.testing.assert_close(dense.weight, linear.weight, **TOL)
    torch.testing.assert_close(dense(x), linear(x), **TOL)
    assert (dense.bias is None) == (not bias)
    assert layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)
    assert layer.analytic_flops(tuple(x.shape)) == 2 * math.prod(lead) * rank * (
        in_features + out_features
    )
    assert layer.analytic_params() == rank * (in_features + out_features) + (
        out_features if bias else 0
    )


@settings(max_examples=25, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**16), data=st.data())
def test_truncated_conv_error_is_the_discarded_energy(case: dict, seed: int, data) -> None:
    """Eckart–Young: ‖K − K̂_r‖_F = √(Σ_{i>r} σᵢ²) of the scheme's matrix view."""
    torch.manual_seed(seed)
    conv = make_conv(case)
    scheme = case["scheme"]
    sigma = singular_values(conv_weight_to_matrix(conv.weight.detach(), scheme))
    rank = data.draw(st.integers(1, sigma.numel()))
    layer = LowRankConv2d.from_dense(conv, rank, scheme)
    error = torch.linalg.vector_norm(layer.to_dense().weight - conv.weight)
    discarded = torch.sqrt((sigma[rank:] ** 2).sum())
    torch.testing.assert_close(error, discarded, rtol=1e-7, atol=1e-9)
    x = torch.randn(1, case["c"], *case["hw"], dtype=DOUBLE)
    # the layer's output is exactly that of its own dense product kernel
    torch.testing.assert_close(layer(x), layer.to_dense()(x), **TOL)
    assert layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)


def test_truncated_linear_error_is_the_discarded_energy() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(20, 12, dtype=DOUBLE)
    sigma = singular_values(linear.weight)
    for rank in (1, 5, 11, 12):
        layer = LowRankLinear.from_dense(linear, rank)
        error = torch.linalg.vector_norm(layer.to_dense().weight - linear.weight)
        torch.testing.assert_close(
            error, torch.sqrt((sigma[rank:] ** 2).sum()), rtol=1e-8, atol=1e-10
        )
        # no other rank-r matrix does better than the truncated SVD: try a random one
        other = torch.randn(12, rank, dtype=DOUBLE) @ torch.randn(rank, 20, dtype=DOUBLE)
        assert torch.linalg.vector_norm(other - linear.weight) >= error


def test_factors_are_balanced() -> None:
    """√σ goes into both factors: the i-th column of U and row of Vᵀ have equal norms."""
    torch.manual_seed(0)
    linear = nn.Linear(9, 7, dtype=DOUBLE)
    layer = LowRankLinear.from_dense(linear, 4)
    up_norms = torch.linalg.vector_norm(layer.up.weight, dim=0)
    down_norms = torch.linalg.vector_norm(layer.down.weight, dim=1)
    torch.testing.assert_close(up_norms, down_norms)
    torch.testing.assert_close(up_norms**2, singular_values(linear.weight)[:4])


def test_randomized_driver_matches_full_on_a_large_low_rank_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    out_f, in_f, true_rank = 600, 500, 12
    weight = torch.randn(out_f, true_rank, generator=g) @ torch.randn(true_rank, in_f, generator=g)
    weight += 1e-4 * torch.randn(out_f, in_f, generator=g)
    linear = nn.Linear(in_f, out_f)
    with torch.no_grad():
        linear.weight.copy_(weight)
    full = LowRankLinear.from_dense(linear, true_rank, driver="full").to_dense().weight
    fast = LowRankLinear.from_dense(linear, true_rank, driver="randomized").to_dense().weight
    scale = torch.linalg.vector_norm(full)
    assert torch.linalg.vector_norm(fast - full) / scale < 1e-4
    assert torch.linalg.vector_norm(fast - weight) / scale < 1e-4


def test_randomized_driver_on_a_conv() -> None:
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(64, 96, 3, padding=1, bias=False, dtype=DOUBLE)
    low = torch.randn(96, 6, generator=g, dtype=DOUBLE) @ torch.randn(
        6, 64 * 9, generator=g, dtype=DOUBLE
    )
    with torch.no_grad():
        conv.weight.copy_(low.reshape(96, 64, 3, 3))
    layer = LowRankConv2d.from_dense(conv, 6, "channel", driver="randomized")
    torch.testing.assert_close(layer.to_dense().weight, conv.weight, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("rank", [0, -1, 7, 2.5, True])
def test_impossible_linear_rank_is_a_clear_error(rank) -> None:
    linear = nn.Linear(6, 4)
    with pytest.raises(TensorslimError, match="rank"):
        LowRankLinear.from_dense(linear, rank)


@pytest.mark.parametrize(
    ("scheme", "rank"),
    [("channel", 0), ("channel", 9), ("spatial", 0), ("spatial", 7), ("diagonal", 1)],
)
def test_impossible_conv_rank_or_scheme_is_a_clear_error(scheme: str, rank: int) -> None:
    conv = nn.Conv2d(2, 8, 3)  # channel full rank min(8, 18) = 8; spatial min(24, 6) = 6
    with pytest.raises(TensorslimError):
        LowRankConv2d.from_dense(conv, rank, scheme)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
    ],
    ids=["grouped", "reflect-padding"],
)
def test_unsupported_convs_are_refused(conv: nn.Conv2d) -> None:
    with pytest.raises(TensorslimError, match="cannot factorize"):
        LowRankConv2d.from_dense(conv, 1)


def test_spatial_scheme_is_exact_for_separable_kernels_at_rank_one() -> None:
    """A kernel K[n,c,h,w] = a[n,w]·b[c,h] is rank 1 in the spatial view (not the channel one)."""
    g = torch.Generator().manual_seed(2)
    a, b = (
        torch.randn(5, 3, generator=g, dtype=DOUBLE),
        torch.randn(4, 3, generator=g, dtype=DOUBLE),
    )
    kernel = torch.einsum("nw,ch->nchw", a, b)
    conv = nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False, dtype=DOUBLE)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    layer = LowRankConv2d.from_dense(conv, 1, "spatial")
    x = torch.randn(2, 4, 9, 8, generator=g, dtype=DOUBLE)
    torch.testing.assert_close(layer(x), conv(x), **TOL)
    assert tuple(layer.down.weight.shape) == (1, 4, 3, 1)
    assert tuple(layer.up.weight.shape) == (5, 1, 1, 3)


def test_dtype_and_device_follow_the_dense_layer() -> None:
    conv = nn.Conv2d(3, 4, 3, dtype=DOUBLE)
    layer = LowRankConv2d.from_dense(conv, 2, "spatial")
    assert all(p.dtype == DOUBLE for p in layer.parameters())
    assert layer.to_dense().weight.dtype == DOUBLE
