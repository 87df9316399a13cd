"""Tucker-2: HOSVD exactness, HOOI monotonicity, the one-shot error table, parity with TensorLy."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker as tl_partial_tucker

from tensorslim.decompose.tucker import (
    leading_left_singular,
    mode_product,
    partial_tucker,
    tucker2_error_table,
    unfolding,
)
from tensorslim.errors import TensorslimError


def kernel(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_mode_product_matches_einsum() -> None:
    x = kernel((4, 5, 3, 2))
    m = kernel((7, 5), seed=1)
    torch.testing.assert_close(mode_product(x, m, 1), torch.einsum("abcd,jb->ajcd", x, m))
    assert unfolding(x, 2).shape == (3, 40)


def test_full_ranks_are_exact() -> None:
    x = kernel((6, 5, 3, 3))
    result = partial_tucker(x, (6, 5))
    assert result.rel_error < 1e-12
    torch.testing.assert_close(result.to_tensor(), x, rtol=0, atol=1e-12)
    for u in result.factors:
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype))


def test_recovers_exact_multilinear_rank() -> None:
    g = torch.Generator().manual_seed(2)
    core = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    u0 = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64))[0]
    u1 = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))[0]
    x = mode_product(mode_product(core, u0, 0), u1, 1)
    assert partial_tucker(x, (3, 2)).rel_error < 1e-10


def test_error_is_reported_exactly_and_hooi_only_helps() -> None:
    x = kernel((12, 10, 3, 3), seed=3)
    hosvd = partial_tucker(x, (4, 3))
    explicit = float((x - hosvd.to_tensor()).norm() / x.norm())
    assert hosvd.rel_error == pytest.approx(explicit, abs=1e-10)
    hooi = partial_tucker(x, (4, 3), hooi_iters=10)
    assert hooi.rel_error <= hosvd.rel_error + 1e-12
    assert hooi.rel_error == pytest.approx(
        float((x - hooi.to_tensor()).norm() / x.norm()), abs=1e-10
    )


def test_error_table_matches_every_truncated_hosvd() -> None:
    x = kernel((7, 5, 3, 3), seed=4)
    table = tucker2_error_table(x)
    assert table.shape == (8, 6)
    assert table[0, 0] == pytest.approx(1.0) and table[7, 5] == pytest.approx(0.0, abs=1e-7)
    for r0 in (1, 3, 7):
        for r1 in (1, 2, 5):
            # The table is sqrt(1 − kept energy): where the true error is ~0 (full ranks) the
            # subtraction leaves float64 round-off of ~1e-16 in the *squared* error, which the
            # square root lifts to ~1e-8. Compare squared errors, at a few ulps of ‖x‖² = 1.
            reconstructed = partial_tucker(x, (r0, r1)).rel_error
            assert float(table[r0, r1]) ** 2 == pytest.approx(reconstructed**2, abs=1e-13)
    # Monotone in both ranks.
    assert torch.all(table[1:, :].diff(dim=0) <= 1e-12)
    assert torch.all(table[:, 1:].diff(dim=1) <= 1e-12)


def test_error_matches_tensorly_partial_tucker() -> None:
    x = kernel((16, 12, 3, 3), seed=5)
    ours = partial_tucker(x, (6, 5), hooi_iters=20)
    tl.set_backend("numpy")
    (core, factors), _ = tl_partial_tucker(x.numpy(), rank=[6, 5], modes=[0, 1], init="svd")
    rec = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    theirs = np.linalg.norm(rec - x.numpy()) / np.linalg.norm(x.numpy())
    assert ours.rel_error <= theirs * 1.001


def test_leading_left_singular_matches_svd() -> None:
    a = kernel((6, 40), seed=6)
    u, s = leading_left_singular(a, 3)
    u_ref, s_ref, _ = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(s, s_ref[:3])
    torch.testing.assert_close(
        (u.T @ u_ref[:, :3]).abs(), torch.eye(3, dtype=u.dtype), atol=1e-8, rtol=0
    )


@pytest.mark.parametrize(
    ("ranks", "modes", "match"),
    [
        ((0, 2), (0, 1), "impossible"),
        ((7, 2), (0, 1), "impossible"),
        ((2,), (0, 1), "ranks"),
        ((2, 2), (0, 0), "bad modes"),
    ],
)
def test_bad_ranks(ranks: tuple, modes: tuple, match: str) -> None:
    with pytest.raises(TensorslimError, match=match):
        partial_tucker(kernel((6, 5, 3, 3)), ranks, modes)
