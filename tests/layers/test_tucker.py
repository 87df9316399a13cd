"""TuckerConv2d: exact at full ranks for any geometry, FLOPs vs the counter, structure."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import counted_flops
from tensorslim.errors import TensorslimError
from tensorslim.layers.tucker import TuckerConv2d

conv_geometry = st.fixed_dictionaries(
    {
        "c": st.integers(1, 6),
        "n": st.integers(1, 7),
        "kh": st.integers(1, 4),
        "kw": st.integers(1, 4),
        "sh": st.integers(1, 3),
        "sw": st.integers(1, 3),
        "ph": st.integers(0, 2),
        "pw": st.integers(0, 2),
        "dh": st.integers(1, 2),
        "dw": st.integers(1, 2),
        "bias": st.booleans(),
        "mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    }
)


def make_conv(g: dict) -> nn.Conv2d:
    return nn.Conv2d(
        g["c"],
        g["n"],
        (g["kh"], g["kw"]),
        (g["sh"], g["sw"]),
        (g["ph"], g["pw"]),
        (g["dh"], g["dw"]),
        bias=g["bias"],
        padding_mode=g["mode"],
    ).double()


def input_for(g: dict, seed: int) -> torch.Tensor:
    # Big enough for every kernel/dilation and for reflect padding (pad < size).
    h = g["dh"] * (g["kh"] - 1) + 4
    w = g["dw"] * (g["kw"] - 1) + 5
    return torch.randn(
        2, g["c"], h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@given(g=conv_geometry, seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_full_ranks_reproduce_the_conv(g: dict, seed: int) -> None:
    torch.manual_seed(seed)
    conv = make_conv(g)
    x = input_for(g, seed)
    layer = TuckerConv2d.from_dense(conv, g["n"], g["c"])
    with torch.no_grad():
        y, ref = layer(x), conv(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.to_dense().weight, conv.weight, rtol=1e-9, atol=1e-10)
    assert (layer.last.bias is not None) == g["bias"]


@given(g=conv_geometry, seed=st.integers(0, 1000), data=st.data())
@settings(max_examples=25, deadline=None)
def test_truncated_layer_equals_its_dense_and_flops_match(g: dict, seed: int, data) -> None:
    torch.manual_seed(seed)
    conv = make_conv(g)
    ro = data.draw(st.integers(1, g["n"]))
    ri = data.draw(st.integers(1, g["c"]))
    layer = TuckerConv2d.from_dense(conv, ro, ri, hooi_iters=2)
    x = input_for(g, seed)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-9, atol=1e-10)
    assert layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)
    assert layer.config() == {"rank_out": ro, "rank_in": ri}
    bias = g["n"] if g["bias"] else 0
    assert layer.analytic_params() == g["c"] * ri + ri * ro * g["kh"] * g["kw"] + ro * g["n"] + bias


def test_same_padding_and_weight_error() -> None:
    conv = nn.Conv2d(8, 12, 3, padding="same", bias=False).double()
    x = torch.randn(1, 8, 9, 9, dtype=torch.float64)
    layer = TuckerConv2d.from_dense(conv, 12, 8)
    torch.testing.assert_close(layer(x), conv(x))
    assert layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)
    small = TuckerConv2d.from_dense(conv, 4, 3)
    err = float(((small.to_dense().weight - conv.weight).norm() / conv.weight.norm()).detach())
    assert 0 < err < 1


def test_structure_only_layer_has_the_right_parameters() -> None:
    layer = TuckerConv2d(4, 6, (3, 1), 5, 2, stride=2, padding=(1, 0))
    assert [tuple(p.shape) for p in layer.parameters()] == [
        (2, 4, 1, 1),
        (5, 2, 3, 1),
        (6, 5, 1, 1),
        (6,),
    ]


@pytest.mark.parametrize(("ro", "ri"), [(0, 1), (7, 1), (1, 5)])
def test_bad_ranks(ro: int, ri: int) -> None:
    with pytest.raises(TensorslimError, match="impossible"):
        TuckerConv2d(4, 6, 3, ro, ri)


def test_grouped_conv_is_refused() -> None:
    with pytest.raises(TensorslimError, match="grouped"):
        TuckerConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2, 2)
