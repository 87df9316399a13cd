"""CPConv2d: the four-conv pipeline equals its CP kernel for any geometry; FLOPs vs the counter."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import counted_flops
from tensorslim.decompose.cp import CPDegeneracyWarning, cp_als, cp_to_tensor
from tensorslim.errors import TensorslimError
from tensorslim.layers.cp import CPConv2d

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


@given(g=conv_geometry, seed=st.integers(0, 1000), rank=st.integers(1, 6))
@settings(max_examples=25, deadline=None)
def test_layer_equals_the_conv_with_its_cp_kernel(g: dict, seed: int, rank: int) -> None:
    torch.manual_seed(seed)
    conv = make_conv(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CPDegeneracyWarning)
        result = cp_als(conv.weight, rank, max_iter=30)
        layer = CPConv2d.from_dense(conv, rank, result=result)
    x = input_for(g, seed)
    # The same geometry with the CP kernel multiplied out is the reference.
    ref = make_conv(g)
    with torch.no_grad():
        ref.weight.copy_(cp_to_tensor(result.weights, result.factors))
        if g["bias"]:
            ref.bias.copy_(conv.bias)
        y = layer(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.to_dense()(x), y, rtol=1e-9, atol=1e-10)
    assert layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)
    bias = g["n"] if g["bias"] else 0
    assert layer.analytic_params() == rank * (g["c"] + g["kh"] + g["kw"] + g["n"]) + bias


def test_high_rank_cp_approaches_the_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2).double()
    layer = CPConv2d.from_dense(conv, 36, max_iter=3000, tol=1e-12)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        rel = float((layer(x) - conv(x)).norm() / conv(x).norm())
    assert rel < 1e-3


def test_depthwise_structure_and_scale_balance() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 5, (3, 5), dilation=(2, 1), padding=(2, 2)).double()
    layer = CPConv2d.from_dense(conv, 4)
    assert layer.vertical.groups == 4 and layer.horizontal.groups == 4
    assert layer.vertical.kernel_size == (3, 1) and layer.horizontal.kernel_size == (1, 5)
    assert layer.vertical.dilation == (2, 1) and layer.horizontal.padding == (0, 2)
    # λ^{1/4} in every factor: the four factors of each component have equal norms.
    norms = torch.stack(
        [
            layer.last.weight.reshape(5, 4).norm(dim=0),
            layer.first.weight.reshape(4, 6).norm(dim=1),
            layer.vertical.weight.reshape(4, 3).norm(dim=1),
            layer.horizontal.weight.reshape(4, 5).norm(dim=1),
        ]
    )
    torch.testing.assert_close(norms, norms[:1].expand_as(norms))
    assert layer.config() == {"rank": 4}


def test_wrong_result_shape_is_refused() -> None:
    conv = nn.Conv2d(3, 4, 3)
    result = cp_als(torch.randn(4, 3, 3, 3), 2)
    with pytest.raises(TensorslimError, match="does not fit"):
        CPConv2d.from_dense(conv, 3, result=result)


def test_bad_rank_and_grouped_conv() -> None:
    with pytest.raises(TensorslimError, match="positive integer"):
        CPConv2d(3, 4, 3, 0)
    with pytest.raises(TensorslimError, match="grouped"):
        CPConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=4), 2)
