"""The warm-started CP rank path: real decompositions whose errors match solving each rank alone,
a single rank identical to cp_als, and the same factors when replayed."""

from __future__ import annotations

import warnings

import pytest
import torch

from tensorslim.decompose.cp import CPDegeneracyWarning, cp_als, cp_error
from tensorslim.decompose.cp_path import cp_als_path
from tensorslim.errors import TensorslimError


def low_rank_kernel(seed: int = 0, rank: int = 6, noise: float = 0.05) -> torch.Tensor:
    """A (12, 10, 3, 3) kernel: a rank-``rank`` CP tensor plus noise (like a trained conv)."""
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(s, rank, generator=g, dtype=torch.float64) for s in (12, 10, 3, 3)]
    x = torch.einsum("ar,br,cr,dr->abcd", *factors)
    return x + noise * x.std() * torch.randn(x.shape, generator=g, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CPDegeneracyWarning)
        yield


def test_path_errors_match_from_scratch_decompositions() -> None:
    x = low_rank_kernel()
    ranks = [2, 4, 6, 9]
    path = cp_als_path(x, ranks, max_iter=300, tol=1e-7)
    for rank in ranks:
        alone = cp_als(x, rank, max_iter=300, tol=1e-7)
        # each path result is a genuine rank-R CP: its reported error is its own
        assert path[rank].rel_error == pytest.approx(cp_error(x, path[rank]), abs=1e-9)
        assert path[rank].weights.numel() == rank
        # and as good as solving the rank on its own, to a small tolerance
        assert path[rank].rel_error <= alone.rel_error + 0.02
        assert path[rank].rel_error >= alone.rel_error - 0.05
    errors = [path[r].rel_error for r in ranks]
    assert errors == sorted(errors, reverse=True)
    # rank 6 = the planted rank: the fit reaches the noise level
    assert path[6].rel_error < 0.1


def test_single_rank_path_is_cp_als() -> None:
    x = low_rank_kernel(1)
    (only,) = cp_als_path(x, [5], max_iter=50, tol=1e-5).values()
    direct = cp_als(x, 5, max_iter=50, tol=1e-5)
    assert only.rel_error == direct.rel_error
    for a, b in zip(only.factors, direct.factors, strict=True):
        assert torch.equal(a, b)


def test_replaying_a_prefix_reproduces_the_factors() -> None:
    x = low_rank_kernel(2)
    full = cp_als_path(x, [2, 5, 8], max_iter=60)
    prefix = cp_als_path(x, [2, 5], max_iter=60)
    for a, b in zip(full[5].factors, prefix[5].factors, strict=True):
        assert torch.equal(a, b)


def test_path_rejects_reduce_rank_and_bad_ranks() -> None:
    x = low_rank_kernel()
    with pytest.raises(TensorslimError, match="reduce_rank"):
        cp_als_path(x, [2], on_degenerate="reduce_rank")
    with pytest.raises(TensorslimError, match="positive"):
        cp_als_path(x, [0, 3])
