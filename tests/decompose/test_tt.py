"""TT-SVD: mode factorisation and padding, exactness at full rank, δ-truncation bound, caps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorslim.decompose.tt import (
    choose_modes,
    factorize,
    full_tt_ranks,
    tt_svd,
    tt_to_matrix,
)
from tensorslim.errors import TensorslimError


@given(n=st.integers(1, 5000), d=st.integers(1, 4))
@settings(max_examples=60, deadline=None)
def test_factorize_is_a_balanced_factorisation(n: int, d: int) -> None:
    modes = factorize(n, d)
    assert len(modes) == d and math.prod(modes) == n
    assert list(modes) == sorted(modes, reverse=True)
    # No other ordered factorisation has a smaller largest factor (brute force for small n).
    if n <= 400 and d == 2:
        best = min(max(a, n // a) for a in range(1, n + 1) if n % a == 0)
        assert max(modes) == best


@pytest.mark.parametrize(
    ("n", "d", "modes", "padded"),
    [
        (784, 3, (14, 8, 7), 784),
        (128, 3, (8, 4, 4), 128),
        (10, 3, (5, 2, 1), 10),
        (11, 3, (11, 1, 1), 11),
        (1021, 3, (16, 8, 8), 1024),
        (97, 3, (7, 7, 2), 98),
    ],
)
def test_choose_modes_pads_only_bad_sizes(n: int, d: int, modes: tuple, padded: int) -> None:
    assert choose_modes(n, d) == (modes, padded)


@given(
    out_modes=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    in_seed=st.integers(0, 10**6),
)
@settings(max_examples=25, deadline=None)
def test_exact_at_full_ranks(out_modes: list[int], in_seed: int) -> None:
    g = torch.Generator().manual_seed(in_seed)
    in_modes = [int(v) for v in torch.randint(1, 5, (len(out_modes),), generator=g)]
    w = torch.randn(math.prod(out_modes), math.prod(in_modes), generator=g, dtype=torch.float64)
    result = tt_svd(w, tuple(out_modes), tuple(in_modes))
    assert result.rel_error < 1e-12
    torch.testing.assert_close(tt_to_matrix(result.cores), w)
    assert result.ranks == full_tt_ranks(tuple(out_modes), tuple(in_modes))


@pytest.mark.parametrize("eps", [0.05, 0.3, 0.7])
def test_delta_truncation_meets_its_accuracy(eps: float) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g, dtype=torch.float64)
    result = tt_svd(w, (4, 4, 4), (6, 4, 4), eps=eps)
    assert result.rel_error <= eps + 1e-12
    full = tt_svd(w, (4, 4, 4), (6, 4, 4))
    assert sum(c.numel() for c in result.cores) <= sum(c.numel() for c in full.cores)


def test_rank_caps() -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    capped = tt_svd(w, (4, 4, 4), (6, 4, 4), max_rank=5)
    assert max(capped.ranks) == 5
    again = tt_svd(w, (4, 4, 4), (6, 4, 4), ranks=capped.ranks)
    torch.testing.assert_close(tt_to_matrix(again.cores), tt_to_matrix(capped.cores))
    looser = tt_svd(w, (4, 4, 4), (6, 4, 4), max_rank=10)
    assert looser.rel_error < capped.rel_error


def test_bad_inputs() -> None:
    with pytest.raises(TensorslimError, match="matrix"):
        tt_svd(torch.randn(5, 6), (2, 2), (3, 2))
    with pytest.raises(TensorslimError, match="as many"):
        tt_svd(torch.randn(4, 6), (2, 2), (6,))
    with pytest.raises(TensorslimError, match="max_rank"):
        tt_svd(torch.randn(4, 6), (2, 2), (3, 2), max_rank=0)
