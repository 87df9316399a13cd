"""EVBMF: the threshold equation, rank recovery on low-rank-plus-noise, weakening, Tucker-2."""

from __future__ import annotations

import math

import pytest
import torch

from tensorslim.decompose.tucker import mode_product
from tensorslim.decompose.vbmf import (
    evbmf,
    tau_threshold,
    tucker2_vbmf_ranks,
    weaken_rank,
)
from tensorslim.errors import TensorslimError


def low_rank_plus_noise(rows: int, cols: int, rank: int, sigma: float, seed: int) -> torch.Tensor:
    """U diag(s) Vᵀ + σ·N(0, 1), signal singular values 1.5–3× the noise edge σ(√rows + √cols)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64))[0]
    edge = sigma * (math.sqrt(rows) + math.sqrt(cols))
    s = torch.linspace(3.0, 1.5, rank, dtype=torch.float64) * edge
    return u @ torch.diag(s) @ v.T + sigma * torch.randn(
        rows, cols, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1])
def test_tau_threshold_solves_its_equation(alpha: float) -> None:
    tau = tau_threshold(alpha)
    assert tau - math.log1p(tau) - alpha * math.log1p(tau / alpha) == pytest.approx(0, abs=1e-10)
    # The approximation τ̲ ≈ 2.5129·√α used in practice is close (within a few per cent).
    assert tau == pytest.approx(2.5129 * math.sqrt(alpha), rel=0.05)


@pytest.mark.parametrize(
    ("rows", "cols", "rank", "sigma", "seed"),
    [(40, 60, 5, 1.0, 0), (100, 50, 10, 0.5, 1), (64, 576, 8, 0.1, 2), (30, 30, 3, 2.0, 3)],
)
def test_recovers_true_rank_and_noise(
    rows: int, cols: int, rank: int, sigma: float, seed: int
) -> None:
    result = evbmf(low_rank_plus_noise(rows, cols, rank, sigma, seed))
    assert result.rank == rank
    assert result.sigma2 == pytest.approx(sigma**2, rel=0.1)
    # Kept values are shrunk, never inflated.
    assert torch.all(result.shrunk_values <= result.singular_values[:rank])


def test_pure_noise_has_rank_zero() -> None:
    noise = torch.randn(50, 80, generator=torch.Generator().manual_seed(7))
    assert evbmf(noise).rank == 0


def test_known_noise_variance_and_orientation() -> None:
    x = low_rank_plus_noise(30, 70, 4, 1.0, 8)
    assert evbmf(x, sigma2=1.0).rank == 4
    assert evbmf(x.T).rank == 4


@pytest.mark.parametrize(
    ("full", "vbmf", "k", "min_rank", "expected"),
    [
        (64, 10, 1.0, 1, 10),
        (64, 10, 0.0, 1, 64),
        (64, 10, 0.5, 1, 37),
        (64, 0, 1.0, 4, 4),
        (3, 0, 1.0, 8, 3),
    ],
)
def test_weakening(full: int, vbmf: int, k: float, min_rank: int, expected: int) -> None:
    assert weaken_rank(full, vbmf, k, min_rank) == expected


def test_weakening_rejects_bad_factor() -> None:
    with pytest.raises(TensorslimError, match="weakening"):
        weaken_rank(10, 3, 1.5)


def test_tucker2_ranks_of_a_low_multilinear_rank_kernel() -> None:
    g = torch.Generator().manual_seed(9)
    core = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) * 10
    u0 = torch.linalg.qr(torch.randn(48, 6, generator=g, dtype=torch.float64))[0]
    u1 = torch.linalg.qr(torch.randn(32, 4, generator=g, dtype=torch.float64))[0]
    k = mode_product(mode_product(core, u0, 0), u1, 1)
    k = k + 0.01 * torch.randn(k.shape, generator=g, dtype=torch.float64)
    assert tucker2_vbmf_ranks(k) == (6, 4)
    assert tucker2_vbmf_ranks(k, weaken=0.5) == (27, 18)
