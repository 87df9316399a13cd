"""CP-ALS: exact recovery, parity with TensorLy's parafac, stopping rule, degeneracy handling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import parafac

from tensorslim.decompose.cp import (
    CPDegeneracyWarning,
    cp_als,
    cp_error,
    cp_to_tensor,
    khatri_rao,
)
from tensorslim.errors import TensorslimError


def random_cp(shape: tuple[int, ...], rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(s, rank, generator=g, dtype=torch.float64) for s in shape]
    return cp_to_tensor(torch.ones(rank, dtype=torch.float64), factors)


def border_rank_tensor() -> torch.Tensor:
    """a∘b∘c' + a∘b'∘c + a'∘b∘c: rank 3 but border rank 2, so no best rank-2 CP exists."""
    g = torch.Generator().manual_seed(1)
    a, b, c = (
        torch.linalg.qr(torch.randn(s, 2, generator=g, dtype=torch.float64))[0] for s in (4, 5, 3)
    )

    def outer(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("i,j,k->ijk", x, y, z)

    return (
        outer(a[:, 0], b[:, 0], c[:, 1])
        + outer(a[:, 0], b[:, 1], c[:, 0])
        + outer(a[:, 1], b[:, 0], c[:, 0])
    )


def test_khatri_rao_matches_kron_columns() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(s, 3, generator=g) for s in (2, 4, 3))
    kr = khatri_rao([a, b, c])
    for r in range(3):
        torch.testing.assert_close(kr[:, r], torch.kron(torch.kron(a[:, r], b[:, r]), c[:, r]))


@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (7, 4, 5), (9, 8)])
def test_recovers_exact_low_rank_tensor(shape: tuple[int, ...]) -> None:
    x = random_cp(shape, 3, seed=len(shape))
    result = cp_als(x, 3, tol=1e-12, max_iter=2000)
    assert result.rel_error < 1e-6
    # The cheap error formula agrees with an explicit reconstruction.
    assert abs(cp_error(x, result) - result.rel_error) < 1e-8
    assert all(torch.allclose(f.norm(dim=0), torch.ones(3, dtype=f.dtype)) for f in result.factors)


@pytest.mark.parametrize("rank", [4, 12])
def test_error_within_one_percent_of_tensorly(rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(24, 20, 3, 3, generator=g, dtype=torch.float64)
    ours = cp_als(x, rank)
    tl.set_backend("numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorly warns that 3×3 modes have < rank vectors
        cp = parafac(x.numpy(), rank, init="svd", n_iter_max=100)
    theirs = np.linalg.norm(tl.cp_to_tensor(cp) - x.numpy()) / np.linalg.norm(x.numpy())
    assert ours.rel_error <= theirs * 1.01, (ours.rel_error, theirs)
    assert cp_error(x, ours) == pytest.approx(ours.rel_error, abs=1e-9)


def test_stopping_rule_on_relative_error_change() -> None:
    g = torch.Generator().manual_seed(3)
    x = random_cp((10, 9, 3, 3), 6, seed=5) + 0.3 * torch.randn(
        10, 9, 3, 3, generator=g, dtype=torch.float64
    )
    loose = cp_als(x, 6, tol=1e-2, extrapolate=False)
    tight = cp_als(x, 6, tol=1e-7, extrapolate=False, max_iter=5000)
    assert loose.converged and tight.converged
    assert loose.iterations < tight.iterations
    assert tight.rel_error <= loose.rel_error + 1e-12
    # The rule as documented: the last step changed the error by less than tol relative.
    e = loose.errors
    assert abs(e[-2] - e[-1]) < 1e-2 * e[-2]
    assert all(abs(e[i - 1] - e[i]) >= 1e-2 * e[i - 1] for i in range(1, len(e) - 1))


def test_extrapolation_never_worse_per_sweep_budget() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 12, 3, 3, generator=g, dtype=torch.float64)
    plain = cp_als(x, 10, max_iter=60, tol=0, extrapolate=False)
    fast = cp_als(x, 10, max_iter=60, tol=0, extrapolate=True)
    assert fast.rel_error <= plain.rel_error + 1e-9
    # errors are monotone: an extrapolated step is only kept if it lowers the error
    assert all(b <= a + 1e-12 for a, b in zip(fast.errors, fast.errors[1:], strict=False))


def test_degeneracy_is_detected_and_warned() -> None:
    x = border_rank_tensor()
    with pytest.warns(CPDegeneracyWarning, match="degenerate"):
        raw = cp_als(x, 2, init="random", seed=3, max_iter=2000, on_degenerate="warn")
    assert raw.degenerate
    # Diverging components: each is far larger than the whole tensor, yet they cancel.
    assert raw.cancellation > 20
    assert float(raw.weights.max()) > 3 * float(x.norm())


def test_degeneracy_stabilised_solve_bounds_the_components() -> None:
    x = border_rank_tensor()
    with pytest.warns(CPDegeneracyWarning):
        fixed = cp_als(x, 2, init="random", seed=3, max_iter=2000, on_degenerate="stabilize")
    assert fixed.stabilized and not fixed.degenerate
    assert fixed.cancellation < 5
    assert float(fixed.weights.max()) < 3 * float(x.norm())
    assert fixed.rel_error < 0.2


def test_degeneracy_smaller_rank_fallback_keeps_shape() -> None:
    x = border_rank_tensor()
    with pytest.warns(CPDegeneracyWarning, match="smaller rank"):
        fixed = cp_als(x, 2, init="random", seed=3, max_iter=2000, on_degenerate="reduce_rank")
    assert fixed.rank == 1 and not fixed.degenerate
    assert [tuple(f.shape) for f in fixed.factors] == [(4, 2), (5, 2), (3, 2)]
    assert float(fixed.weights[1]) == 0.0
    assert cp_error(x, fixed) == pytest.approx(fixed.rel_error, abs=1e-9)


def test_degeneracy_can_raise() -> None:
    with pytest.raises(TensorslimError, match="degenerate"):
        cp_als(border_rank_tensor(), 2, init="random", seed=3, max_iter=2000, on_degenerate="raise")


def test_well_posed_problem_is_not_flagged() -> None:
    x = random_cp((8, 7, 3, 3), 4, seed=9) + 0.01 * torch.randn(
        8, 7, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", CPDegeneracyWarning)
        result = cp_als(x, 4)
    assert not result.degenerate and result.cancellation < 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "positive integer"),
        ({"rank": 2, "init": "magic"}, "init"),
        ({"rank": 2, "on_degenerate": "ignore"}, "on_degenerate"),
        ({"rank": 2, "max_iter": 0}, "max_iter"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(TensorslimError, match=match):
        cp_als(torch.randn(3, 3, 3), **kwargs)


def test_zero_tensor() -> None:
    result = cp_als(torch.zeros(3, 4, 2), 2)
    assert result.rel_error == 0.0
    assert torch.count_nonzero(result.to_tensor()) == 0
