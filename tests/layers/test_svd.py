"""SVDLinear / SVDConv2d: exactness, pruning by slicing, conversions, FLOPs, init."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tensorslim.errors import TensorslimError
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear
from tensorslim.layers.svd import SVDConv2d, SVDLinear, svd_layers

DOUBLE = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: several threads only add OpenMP contention (badly so on a busy machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def counted_flops(module: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


conv_cases = st.fixed_dictionaries(
    {
        "c": st.integers(1, 5),
        "n": st.integers(1, 6),
        "kh": st.integers(1, 3),
        "kw": st.integers(1, 3),
        "stride": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "padding": st.tuples(st.integers(0, 2), st.integers(0, 2)),
        "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "bias": st.booleans(),
        "scheme": st.sampled_from(["channel", "spatial"]),
        "h": st.integers(6, 10),
        "w": st.integers(6, 10),
    }
)


def make_conv(case: dict) -> nn.Conv2d:
    return nn.Conv2d(
        case["c"],
        case["n"],
        (case["kh"], case["kw"]),
        case["stride"],
        case["padding"],
        case["dilation"],
        bias=case["bias"],
        dtype=DOUBLE,
    )


@settings(max_examples=25, deadline=None)
@given(case=conv_cases, seed=st.integers(0, 2**16))
def test_conv_full_rank_is_exact_and_counts_right(case: dict, seed: int) -> None:
    torch.manual_seed(seed)
    conv = make_conv(case)
    layer = SVDConv2d.from_dense(conv, case["scheme"])
    x = torch.randn(2, case["c"], case["h"], case["w"], dtype=DOUBLE)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.to_dense()(x), conv(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.to_lowrank()(x), conv(x), rtol=1e-10, atol=1e-10)
    assert layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)
    assert layer.dense_flops(tuple(x.shape)) == counted_flops(conv, x)


@settings(max_examples=25, deadline=None)
@given(case=conv_cases, seed=st.integers(0, 2**16), data=st.data())
def test_conv_pruned_matches_truncated_lowrank(case: dict, seed: int, data) -> None:
    torch.manual_seed(seed)
    conv = make_conv(case)
    layer = SVDConv2d.from_dense(conv, case["scheme"])
    k = data.draw(st.integers(1, layer.full_rank))
    layer.keep_top(k)
    x = torch.randn(2, case["c"], case["h"], case["w"], dtype=DOUBLE)
    reference = LowRankConv2d.from_dense(conv, k, case["scheme"])
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.to_lowrank()(x), reference(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.to_dense()(x), reference(x), rtol=1e-9, atol=1e-9)
    assert layer.active_rank() == k
    assert layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)
    assert layer.analytic_flops(tuple(x.shape)) == reference.analytic_flops(tuple(x.shape))


@settings(max_examples=25, deadline=None)
@given(
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 12),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_linear_exact_and_truncated(in_features, out_features, bias, seed, data) -> None:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=DOUBLE)
    layer = SVDLinear.from_dense(linear)
    x = torch.randn(3, 2, in_features, dtype=DOUBLE)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-10, atol=1e-10)
    assert layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)
    k = data.draw(st.integers(1, layer.full_rank))
    layer.keep_top(k)
    reference = LowRankLinear.from_dense(linear, k)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.to_lowrank()(x), reference(x), rtol=1e-9, atol=1e-9)
    assert layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_paper_flops_formula_matches_counter(scheme: str, rank: int) -> None:
    """(n + c·h·w)·r/(n·c·h·w) channel-wise, (n·w + c·h)·r/(n·c·h·w) spatial-wise, measured."""
    n, c, h, w = 8, 6, 3, 5
    conv = nn.Conv2d(c, n, (h, w), padding="same")
    layer = SVDConv2d.from_dense(conv, scheme)
    layer.keep_top(rank)
    x = torch.randn(1, c, 9, 11)
    measured = counted_flops(layer, x) / counted_flops(conv, x)
    if scheme == "channel":
        formula = (n + c * h * w) * rank / (n * c * h * w)
    else:
        formula = (n * w + c * h) * rank / (n * c * h * w)
    assert measured == pytest.approx(formula, rel=1e-12)


def test_pruned_values_are_sliced_out_not_multiplied_by_zero() -> None:
    torch.manual_seed(0)
    layer = SVDConv2d.from_dense(nn.Conv2d(4, 6, 3, padding=1), "channel")
    layer.keep_top(2)
    pruned = (~layer.active).nonzero().squeeze(1)
    with torch.no_grad():
        # NaN·0 is NaN: a masked multiply would poison the output, slicing does not
        layer.U[:, pruned] = float("nan")
        layer.V[:, pruned] = float("nan")
        layer.s[pruned] = float("nan")
    out = layer(torch.randn(2, 4, 5, 5))
    assert torch.isfinite(out).all()
    assert layer.analytic_params() == 2 * (6 + 36 + 1) + 6


def test_forward_uses_abs_of_s_split_as_square_root() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(5, 4, dtype=DOUBLE)
    layer = SVDLinear.from_dense(linear)
    x = torch.randn(3, 5, dtype=DOUBLE)
    expected = layer(x)
    with torch.no_grad():
        layer.s.neg_()  # the sign of s does not matter: the forward uses |s|
    torch.testing.assert_close(layer(x), expected)
    a, b = layer.balanced_factors()
    root = layer.s.detach().abs().sqrt()
    torch.testing.assert_close(a, layer.U * root)
    torch.testing.assert_close(b, layer.V * root)


def test_gradients_reach_u_s_v_and_bias() -> None:
    layer = SVDConv2d.from_shape(3, 5, 3, "spatial", padding=1)
    layer(torch.randn(2, 3, 6, 6)).pow(2).sum().backward()
    for name in ("U", "s", "V", "bias"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_from_shape_is_orthonormal_and_kaiming_scaled(scheme: str) -> None:
    torch.manual_seed(0)
    layer = SVDConv2d.from_shape(64, 64, 3, scheme, padding=1)
    eye = torch.eye(layer.rank)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-4, rtol=0)
    assert bool((layer.s >= 0).all())
    std = float(layer.dense_weight().detach().std())
    assert std == pytest.approx((2.0 / (64 * 9)) ** 0.5, rel=0.05)
    linear = SVDLinear.from_shape(256, 128)
    assert float(linear.weight_matrix().detach().std()) == pytest.approx(
        (2.0 / 256) ** 0.5, rel=0.05
    )


def test_rank_argument_and_bad_input() -> None:
    conv = nn.Conv2d(3, 4, 3)
    assert SVDConv2d.from_dense(conv, "channel").rank == 4  # min(4, 27)
    assert SVDConv2d.from_dense(conv, "spatial").rank == 9  # min(4·3, 3·3)
    assert SVDConv2d.from_dense(conv, "channel", rank=2).rank == 2
    with pytest.raises(TensorslimError, match="rank 5 is impossible"):
        SVDConv2d.from_dense(conv, "channel", rank=5)
    with pytest.raises(TensorslimError, match="rank 0 is impossible"):
        SVDLinear.from_dense(nn.Linear(3, 4), rank=0)
    with pytest.raises(TensorslimError, match="rank 4 is impossible"):
        SVDLinear(3, 5, rank=4)
    with pytest.raises(TensorslimError, match="unknown SVD scheme"):
        SVDConv2d.from_dense(conv, "diagonal")  # type: ignore[arg-type]
    with pytest.raises(TensorslimError, match="grouped"):
        SVDConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), "channel")
    layer = SVDLinear(6, 4)
    with pytest.raises(TensorslimError, match="keep at least rank 1"):
        layer.set_active(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(TensorslimError, match="cannot keep 5"):
        layer.keep_top(5)


def test_truncated_from_dense_keeps_the_largest_singular_values() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 6, dtype=DOUBLE)
    full = torch.linalg.svdvals(linear.weight.detach())
    layer = SVDLinear.from_dense(linear, rank=3)
    torch.testing.assert_close(layer.s.detach(), full[:3])


def test_compact_keeps_the_function_and_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    layer = SVDConv2d.from_dense(nn.Conv2d(4, 6, 3, stride=2, padding=1), "spatial")
    layer.keep_top(3)
    x = torch.randn(2, 4, 7, 7)
    before = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert state["active"].dtype == torch.bool and int(state["active"].sum()) == 3
    # a skeleton of the same rank loads the masked state exactly
    again = SVDConv2d(4, 6, 3, "spatial", 2, 1, init=False)
    again.load_state_dict(state)
    torch.testing.assert_close(again(x), before)
    layer.compact()
    assert layer.rank == 3 and layer.active_rank() == 3 and layer.U.shape == (18, 3)
    torch.testing.assert_close(layer(x), before)
    config = layer.config()
    assert config == {"rank": 3, "scheme": "spatial", "active_rank": 3}
    json.dumps(config)


def test_svd_layers_finds_each_layer_once() -> None:
    shared = SVDLinear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, SVDConv2d(1, 2, 3))
    names = [fqn for fqn, _ in svd_layers(model)]
    assert names == ["0", "3"]
