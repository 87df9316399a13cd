"""Output-space error from the Gram equals ‖(W − Ŵ)X‖/‖WX‖ measured by a forward pass."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tensorslim.analysis.calibration import collect_statistics
from tensorslim.analysis.output_error import (
    relative_output_error,
    svd_output_errors,
    weight_rows_matrix,
)
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear


@torch.no_grad()
def measured_error(dense: nn.Module, approx: nn.Module, data: list[torch.Tensor]) -> float:
    """‖(W − Ŵ)X‖_F / ‖WX‖_F by running both layers (the bias cancels in the difference and is
    left out of the reference)."""
    unbiased = copy.deepcopy(dense)
    unbiased.bias = None
    num = sum(float((dense(x) - approx(x)).pow(2).sum()) for x in data)
    den = sum(float(unbiased(x).pow(2).sum()) for x in data)
    return (num / den) ** 0.5


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_linear_svd_error_table_matches_forward_passes(rank: int) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(10, 8).double()
    mix = torch.randn(10, 10, dtype=torch.double)  # correlated inputs: output ≠ weight error
    data = [torch.randn(32, 10, dtype=torch.double) @ mix for _ in range(3)]
    gram = collect_statistics(dense, data, {"l": dense}, ["gram"], progress=False)["l"].gram
    table = svd_output_errors(weight_rows_matrix(dense), gram)
    approx = LowRankLinear.from_dense(dense, rank)
    assert float(table[rank]) == pytest.approx(measured_error(dense, approx, data), rel=1e-8)
    assert table[0] == pytest.approx(1.0) and table[-1] == pytest.approx(0.0, abs=1e-7)
    assert relative_output_error(
        weight_rows_matrix(dense), approx.to_dense().weight, gram
    ) == pytest.approx(float(table[rank]), rel=1e-8)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_conv_output_error_matches_forward_passes(scheme: str) -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 6, 3, stride=2, padding=1).double()
    data = [torch.randn(4, 3, 9, 9, dtype=torch.double) for _ in range(2)]
    gram = collect_statistics(dense, data, {"c": dense}, ["gram"], progress=False)["c"].gram
    approx = LowRankConv2d.from_dense(dense, 2, scheme)
    got = relative_output_error(weight_rows_matrix(dense), approx.to_dense().weight, gram)
    assert got == pytest.approx(measured_error(dense, approx, data), rel=1e-8)
