"""LowRankConv1d: exact at full rank, best rank-r kernel, FLOPs as the counter sees them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import counted_flops
from tensorslim.analysis.calibration import input_rows
from tensorslim.analysis.flops import dense_layer_flops
from tensorslim.decompose.svd import singular_values
from tensorslim.errors import TensorslimError
from tensorslim.layers.lowrank_conv1d import LowRankConv1d

DOUBLE = torch.float64

GEOMETRIES = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 5, "stride": 2, "dilation": 2},
    {"kernel_size": 4, "padding": "same"},
    {"kernel_size": 1, "bias": False},
    {"kernel_size": 3, "padding": "valid", "stride": 3},
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_full_rank_reproduces_the_dense_conv(geometry: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(5, 7, dtype=DOUBLE, **geometry)
    full = min(7, 5 * conv.kernel_size[0])
    low = LowRankConv1d.from_dense(conv, full)
    x = torch.randn(3, 5, 17, dtype=DOUBLE)
    torch.testing.assert_close(low(x), conv(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(low.to_dense().weight, conv.weight, rtol=1e-10, atol=1e-10)
    assert low.to_dense()(x).shape == conv(x).shape


def test_truncation_error_is_the_discarded_spectrum() -> None:
    torch.manual_seed(1)
    conv = nn.Conv1d(6, 8, 3, dtype=DOUBLE)
    s = singular_values(conv.weight.detach().reshape(8, -1))
    low = LowRankConv1d.from_dense(conv, 3)
    error = torch.linalg.matrix_norm((low.dense_weight() - conv.weight).reshape(8, -1))
    torch.testing.assert_close(error, s[3:].pow(2).sum().sqrt().to(DOUBLE))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_analytic_flops_match_the_counter(geometry: dict) -> None:
    conv = nn.Conv1d(5, 7, **geometry)
    low = LowRankConv1d.from_dense(conv, 2)
    x = torch.randn(2, 5, 19)
    assert low.analytic_flops(tuple(x.shape)) == counted_flops(low, x)
    assert dense_layer_flops(conv, tuple(x.shape)) == counted_flops(conv, x)
    bias = 7 if conv.bias is not None else 0
    assert low.analytic_params() == 2 * (5 * conv.kernel_size[0] + 7) + bias


def test_impossible_rank_and_unfactorizable_conv_are_clear_errors() -> None:
    with pytest.raises(TensorslimError, match=r"choose 1\.\.6"):
        LowRankConv1d(2, 6, 3, rank=7)
    with pytest.raises(TensorslimError, match="grouped conv"):
        LowRankConv1d.from_dense(nn.Conv1d(4, 4, 3, groups=2), 1)


CIRCULAR = {"kernel_size": 3, "padding": 2, "padding_mode": "circular"}


@pytest.mark.parametrize("geometry", [*GEOMETRIES, CIRCULAR])
def test_calibration_rows_reproduce_the_conv(geometry: dict) -> None:
    """The unfolded rows times the kernel matrix are the conv's output (bias aside)."""
    torch.manual_seed(2)
    conv = nn.Conv1d(3, 4, dtype=DOUBLE, **geometry)
    x = torch.randn(2, 3, 15, dtype=DOUBLE)
    rows = torch.cat(list(input_rows(conv, x)))
    bias = conv.bias if conv.bias is not None else torch.zeros(4, dtype=DOUBLE)
    out = (conv(x) - bias[:, None]).transpose(1, 2).reshape(-1, 4)
    torch.testing.assert_close(rows @ conv.weight.reshape(4, -1).T, out)
