"""Matrix views of conv kernels, spectra, truncated SVD (full and randomized), balanced factors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorslim.decompose.svd import (
    balanced_factors,
    conv_weight_to_matrix,
    gram_factorization,
    matrix_to_conv_weight,
    singular_values,
    truncated_svd,
)
from tensorslim.errors import TensorslimError

DOUBLE = torch.float64


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4)),
    scheme=st.sampled_from(["channel", "spatial"]),
)
def test_matrix_views_invert_and_place_entries(shape: tuple[int, int, int, int], scheme) -> None:
    n, c, kh, kw = shape
    kernel = torch.arange(n * c * kh * kw, dtype=DOUBLE).reshape(shape)
    matrix = conv_weight_to_matrix(kernel, scheme)
    if scheme == "channel":
        assert matrix.shape == (n, c * kh * kw)
        assert matrix[n - 1, ((c - 1) * kh + kh - 1) * kw + kw - 1] == kernel[n - 1, c - 1, -1, -1]
    else:
        assert matrix.shape == (n * kw, c * kh)
        # rows are (n, w), columns (c, h)
        for i, ci, h, w in [(0, 0, 0, 0), (n - 1, c - 1, kh - 1, kw - 1), (n - 1, 0, kh - 1, 0)]:
            assert matrix[i * kw + w, ci * kh + h] == kernel[i, ci, h, w]
    assert torch.equal(matrix_to_conv_weight(matrix, shape, scheme), kernel)


def test_unknown_scheme_is_an_error() -> None:
    with pytest.raises(TensorslimError, match="scheme"):
        conv_weight_to_matrix(torch.zeros(2, 2, 3, 3), "diagonal")  # type: ignore[arg-type]


def test_singular_values_are_float64_descending_and_exact() -> None:
    q1, _ = torch.linalg.qr(torch.randn(8, 8, dtype=DOUBLE))
    q2, _ = torch.linalg.qr(torch.randn(5, 5, dtype=DOUBLE))
    sigma = torch.tensor([9.0, 4.0, 2.0, 0.5, 0.0], dtype=DOUBLE)
    matrix = (q1[:, :5] * sigma) @ q2.T
    got = singular_values(matrix.float())
    assert got.dtype == DOUBLE
    assert torch.all(got[:-1] >= got[1:])
    torch.testing.assert_close(got, sigma, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("driver", ["full", "randomized", "auto"])
def test_truncated_svd_returns_the_top_singular_triplets(driver: str) -> None:
    # A decaying spectrum (0.7^i): the randomized driver's accuracy is then a property of the
    # method, not of the draw; its sketch draws from the global generator, so fix that too.
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(40, 30, generator=g, dtype=DOUBLE))
    q2, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=DOUBLE))
    matrix = (q1 * 0.7 ** torch.arange(30, dtype=DOUBLE)) @ q2.T
    with torch.random.fork_rng():
        torch.manual_seed(0)
        u, s, v = truncated_svd(matrix, 30 if driver != "randomized" else 5, driver)  # type: ignore[arg-type]
    r = s.numel()
    assert u.shape == (40, r) and v.shape == (30, r)
    torch.testing.assert_close(
        s, singular_values(matrix)[:r], rtol=1e-6 if driver == "randomized" else 1e-10, atol=1e-8
    )
    torch.testing.assert_close(u.T @ u, torch.eye(r, dtype=DOUBLE), rtol=0, atol=1e-8)
    torch.testing.assert_close(v.T @ v, torch.eye(r, dtype=DOUBLE), rtol=0, atol=1e-8)
    if r == 30:
        torch.testing.assert_close((u * s) @ v.T, matrix)


def test_auto_driver_uses_the_randomized_path_only_for_large_low_rank_requests(monkeypatch) -> None:
    calls = []
    real = torch.svd_lowrank

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", spy)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(1024, 8, generator=g) @ torch.randn(8, 1024, generator=g)
    u, s, v = truncated_svd(big, 8, "auto")
    assert calls == [(1024, 1024)]
    torch.testing.assert_close((u * s) @ v.T, big.double(), rtol=1e-6, atol=1e-6)
    truncated_svd(torch.randn(100, 100), 4, "auto")  # small: the exact SVD is cheap
    assert len(calls) == 1


@pytest.mark.parametrize("rank", [0, 7])
def test_impossible_rank_is_an_error(rank: int) -> None:
    with pytest.raises(TensorslimError, match="impossible"):
        truncated_svd(torch.randn(6, 4), rank)


def test_unknown_driver_is_an_error() -> None:
    with pytest.raises(TensorslimError, match="driver"):
        truncated_svd(torch.randn(6, 4), 2, "lapack")  # type: ignore[arg-type]


def test_balanced_factors_split_the_singular_values_evenly() -> None:
    g = torch.Generator().manual_seed(3)
    matrix = torch.randn(12, 9, generator=g)
    a, b = balanced_factors(matrix, 4)
    assert a.dtype == matrix.dtype and b.dtype == matrix.dtype
    assert a.shape == (12, 4) and b.shape == (9, 4)
    u, s, v = truncated_svd(matrix, 4, "full")
    torch.testing.assert_close((a @ b.T).double(), (u * s) @ v.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.double().norm(dim=0), s.sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.double().norm(dim=0), s.sqrt(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(300, 260), (260, 300)])
def test_gram_factorization_is_the_best_rank_r_approximation(shape) -> None:
    from tensorslim.decompose.svd import gram_truncated_svd

    g = torch.Generator().manual_seed(0)
    m = torch.randn(*shape, generator=g, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -3, shape[1], dtype=torch.float64)
    )
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    for r in (1, 17, 260):
        a, sr, b = gram_truncated_svd(m, r)
        assert a.shape == (shape[0], r) and b.shape == (shape[1], r)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close((a * sr) @ b.T, best, rtol=0, atol=1e-9 * float(s[0]))
        torch.testing.assert_close(sr, s[:r], rtol=1e-8, atol=1e-9 * float(s[0]))


def test_gram_factorization_keeps_the_numerical_rank_of_an_exactly_low_rank_matrix() -> None:
    """Round-off in the Gram's eigenvalues (≈ n·ε·λ₁) is not read as singular values ≈ √(nε)σ₁:
    a rank-3 matrix has exactly 3 nonzero values, and they match the SVD's."""
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(16, 3, generator=g, dtype=DOUBLE) @ torch.randn(
        3, 8, generator=g, dtype=DOUBLE
    )
    s = gram_factorization(matrix).singular_values
    assert int((s > 0).sum()) == 3
    torch.testing.assert_close(s[:3], singular_values(matrix)[:3], rtol=1e-10, atol=0)
