"""δ-rank: definition, invariances, per-layer and average reports."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tensorslim.analysis.delta_rank import (
    average_delta_rank,
    delta_rank,
    layer_delta_ranks,
    normalized_singular_values,
)
from tensorslim.errors import TensorslimError


def test_known_spectrum() -> None:
    w = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.1]))
    # ‖W‖_F = √14.01 ≈ 3.743: σ̄ ≈ 0.801, 0.534, 0.267, 0.0267
    assert delta_rank(w, 0.01) == 4
    assert delta_rank(w, 0.05) == 3
    assert delta_rank(w, 0.3) == 2
    assert delta_rank(w, 0.6) == 1
    assert delta_rank(w, 0.9) == 0


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 10),
    cols=st.integers(1, 10),
    delta=st.floats(0.0, 0.99),
    seed=st.integers(0, 10_000),
)
def test_matches_the_definition_via_truncation(
    rows: int, cols: int, delta: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    w = w * (torch.rand(rows, cols, generator=g) < 0.6)
    rank = delta_rank(w, delta)
    norm = torch.linalg.matrix_norm(w)
    if float(norm) == 0:
        assert rank == 0
        return
    wbar = w / norm
    u, s, vh = torch.linalg.svd(wbar, full_matrices=False)

    def spectral_error(k: int) -> float:
        approx = (u[:, :k] * s[:k]) @ vh[:k]
        return float(torch.linalg.matrix_norm(wbar - approx, ord=2))

    assert spectral_error(rank) <= delta + 1e-9
    if rank > 0:
        assert spectral_error(rank - 1) > delta - 1e-9


def test_scale_invariance_and_conv_view() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    assert delta_rank(w, 0.05) == delta_rank(1000 * w, 0.05)
    # A kernel whose (C_out, C_in·kh·kw) view has rank 2.
    low = (torch.randn(8, 2) @ torch.randn(2, 36)).reshape(8, 4, 3, 3)
    assert delta_rank(low, 1e-6) == 2
    assert normalized_singular_values(low).shape == (8,)


def test_bad_input() -> None:
    assert delta_rank(torch.zeros(3, 5)) == 0
    with pytest.raises(TensorslimError, match="δ"):
        delta_rank(torch.ones(3, 3), 1.0)
    bad = torch.ones(3, 3)
    bad[1, 1] = float("inf")
    with pytest.raises(TensorslimError, match="NaN or Inf"):
        delta_rank(bad)
    with pytest.raises(TensorslimError, match="matrix view"):
        delta_rank(torch.ones(4))


def test_layer_report_and_average() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        model[3].weight.copy_(torch.outer(torch.randn(3), torch.randn(16)))  # rank 1
    report = layer_delta_ranks(model, 0.05)
    assert set(report) == {"0", "3"}
    assert report["3"]["delta_rank"] == 1 and report["3"]["full_rank"] == 3
    assert report["0"]["full_rank"] == 4
    avg = average_delta_rank(model, 0.05)
    assert avg["avg_delta_rank"] == pytest.approx((report["0"]["delta_rank"] + 1) / 2)
    expected_rel = (report["0"]["delta_rank"] / 4 + 1 / 3) / 2
    assert avg["avg_relative_delta_rank"] == pytest.approx(expected_rel)
    only = layer_delta_ranks(model, 0.05, layers=["3"])
    assert set(only) == {"3"}
    with pytest.warns(UserWarning, match="no Linear/Conv2d"):
        layer_delta_ranks(model, 0.05, layers=["3", "nope"])
