"""The adversarial rank loss: choice of k, value, gradient, effect, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tensorslim.analysis.delta_rank import delta_rank, normalized_singular_values
from tensorslim.errors import TensorslimError
from tensorslim.train.rank_loss import (
    adversarial_rank_loss,
    best_rank_k,
    choose_k,
    layer_rank_loss,
)


def test_choose_k_picks_the_tail_energy_closest_to_partial_k() -> None:
    sv = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()  # σ̄² sums to 1
    # tails for k = 0..3: 1.0, 0.5, 0.2, 0.05 (k = 4 would discard nothing: never chosen, as
    # in the official find_k)
    assert choose_k(sv, 0.1) == 3
    assert choose_k(sv, 0.2) == 2
    assert choose_k(sv, 0.3) == 2
    assert choose_k(sv, 0.4) == 1
    assert choose_k(sv, 0.0) == 3
    assert choose_k(sv, 1.0) == 0
    assert choose_k(sv, 0.125) == 3  # tie (0.05 vs 0.2 → gaps 0.075 both): larger k
    with pytest.raises(TensorslimError, match="partial_k"):
        choose_k(sv, 1.5)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(2, 12),
    cols=st.integers(2, 12),
    partial=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_loss_is_minus_the_discarded_tail_energy(
    rows: int, cols: int, partial: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 3.0
    sv = normalized_singular_values(w)
    k = choose_k(sv, partial)
    tail = float((sv[k:] ** 2).sum())
    loss = layer_rank_loss(w, partial)
    assert float(loss) == pytest.approx(-tail, abs=1e-9)
    assert -1.0 - 1e-9 <= float(loss) <= 0.0


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    partial=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_gram_route_equals_the_truncated_svd(
    rows: int, cols: int, partial: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    wbar = w / torch.linalg.matrix_norm(w)
    u, s, vh = torch.linalg.svd(wbar, full_matrices=False)
    k = choose_k(s, partial)
    expected = (u[:, :k] * s[:k]) @ vh[:k]
    torch.testing.assert_close(best_rank_k(wbar, partial), expected, atol=1e-7, rtol=1e-6)


def test_gradient_matches_finite_differences_and_the_closed_form() -> None:
    # Danskin: the gradient through the detached best rank-k approximation is the gradient of
    # −min_{rank k} ‖W̄ − X‖², so finite differences of the whole loss agree with autograd.
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer_rank_loss(t, 0.2), (w,), eps=1e-6, atol=1e-6)
    loss = layer_rank_loss(w, 0.2)
    loss.backward()
    with torch.no_grad():
        norm = torch.linalg.matrix_norm(w)
        wbar = w / norm
        u, s, vh = torch.linalg.svd(wbar, full_matrices=False)
        k = choose_k(s, 0.2)
        residual = wbar - (u[:, :k] * s[:k]) @ vh[:k]
        tail = (residual**2).sum()
        expected = -(2 / norm) * (residual - tail * wbar)
    torch.testing.assert_close(w.grad, expected)


def test_conv_weight_is_viewed_out_channels_by_rest() -> None:
    torch.manual_seed(0)
    kernel = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    matrix = kernel.reshape(6, 27)
    assert float(layer_rank_loss(kernel, 0.1)) == pytest.approx(float(layer_rank_loss(matrix, 0.1)))


def test_descending_the_rank_loss_raises_the_tail_energy_and_the_delta_rank() -> None:
    torch.manual_seed(0)
    # A decaying spectrum: σ_i = 0.5^i, most energy in a few directions.
    u, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(24, 16, dtype=torch.float64))
    spectrum = 0.5 ** torch.arange(16, dtype=torch.float64)
    w = ((u * spectrum) @ v.T).requires_grad_(True)
    before = normalized_singular_values(w)
    k = choose_k(before, 0.1)
    opt = torch.optim.SGD([w], lr=0.05)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = layer_rank_loss(w, 0.1)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    after = normalized_singular_values(w)
    assert losses[-1] < losses[0]
    assert float((after[k:] ** 2).sum()) > 1.5 * float((before[k:] ** 2).sum())
    assert delta_rank(w, 0.05) > delta_rank(((u * spectrum) @ v.T), 0.05)


def test_adversarial_rank_loss_averages_layers() -> None:
    torch.manual_seed(0)
    layers = [("a", nn.Linear(8, 4)), ("b", nn.Conv2d(2, 5, 3))]
    expected = (
        layer_rank_loss(layers[0][1].weight, 0.1) + layer_rank_loss(layers[1][1].weight, 0.1)
    ) / 2
    torch.testing.assert_close(adversarial_rank_loss(layers, 0.1), expected)
    with pytest.raises(TensorslimError, match="no layers"):
        adversarial_rank_loss([], 0.1)


def test_zero_and_nan_weights() -> None:
    zero = torch.zeros(3, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="fc9 has all weights zero"):
        loss = layer_rank_loss(zero, 0.1, "fc9")
    assert float(loss.detach()) == 0.0
    loss.backward()  # still differentiable, zero gradient
    assert torch.all(zero.grad == 0)
    bad = torch.ones(3, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(TensorslimError, match="conv2 has NaN"):
        layer_rank_loss(bad, 0.1, "conv2")
