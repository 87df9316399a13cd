"""The planning factorization (one Gram eigendecomposition): its errors agree with a float64 SVD
within the stated tolerance (float32 for large layers), its factors are the truncated SVD's."""

from __future__ import annotations

import math

import pytest
import torch

from tensorslim.analysis.output_error import errors_from_energies, svd_output_errors
from tensorslim.decompose.svd import FLOAT32_FACTORIZATION_MIN_ENTRIES, gram_factorization


def decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    return (u * torch.logspace(0, -2, k)) @ v.T


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (700, 600), (600, 700)])
def test_squared_errors_within_the_stated_tolerance(shape: tuple[int, int]) -> None:
    m = decaying(*shape)
    f = gram_factorization(m)
    big = m.numel() >= FLOAT32_FACTORIZATION_MIN_ENTRIES
    assert f.vectors.dtype == (torch.float32 if big else torch.float64)
    exact = torch.linalg.svdvals(m.double())
    k = exact.numel()
    tail = lambda s: 1 - (s**2).cumsum(0) / (s**2).sum()  # noqa: E731 - e_r² for r = 1 … k
    bound = k * torch.finfo(torch.float32 if big else torch.float64).eps
    bound *= float(exact[0] ** 2 / (exact**2).sum())
    assert float((tail(f.singular_values) - tail(exact)).abs().max()) <= bound
    for rank in (1, k // 3, k):
        a, b = f.balanced(m, rank)
        err = float((m.double() - (a @ b.T).double()).norm() / m.double().norm())
        expected = math.sqrt(max(float(tail(exact)[rank - 1]), 0.0))
        assert err == pytest.approx(expected, abs=1e-5 if big else 1e-6)  # float32 weights


def test_output_energies_match_the_full_svd_table() -> None:
    m = decaying(30, 50, seed=1).double()
    rows = torch.randn(200, 50, dtype=torch.float64)
    gram = rows.T @ rows
    ours = errors_from_energies(gram_factorization(m).output_energies(m, gram))
    torch.testing.assert_close(ours, svd_output_errors(m, gram), atol=1e-10, rtol=0)


def test_rank_deficient_matrix_has_no_blown_up_factors() -> None:
    m = torch.randn(20, 3, dtype=torch.float64) @ torch.randn(3, 30, dtype=torch.float64)
    a, b = gram_factorization(m).balanced(m, 20)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a @ b.T, m, atol=1e-10, rtol=0)
