"""Tucker-2 with HOOI as the reference codes run it (TensorLy's partial_tucker), and MUSCO's
weakened VBMF rank rule — each checked against an independent statement of the official code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tensorslim.decompose.tucker import partial_tucker
from tensorslim.decompose.vbmf import weaken_rank
from tensorslim.methods import get_method

tl = pytest.importorskip("tensorly")
from tensorly.decomposition import partial_tucker as tl_partial_tucker  # noqa: E402


def _kernels() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(32, 16, 3, 3, generator=g, dtype=torch.float64)
    # a kernel with decaying mode spectra, like a trained one
    a = torch.randn(48, 8, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 8)
    b = torch.randn(24, 8, generator=g, dtype=torch.float64)
    core = torch.randn(8, 8, 3, 3, generator=g, dtype=torch.float64)
    structured = torch.einsum("ai,bj,ijhw->abhw", a, b, core) + 0.05 * torch.randn(
        48, 24, 3, 3, generator=g, dtype=torch.float64
    )
    return [noise, structured]


def _tensorly_error(kernel: torch.Tensor, ranks: tuple[int, int]) -> float:
    tl.set_backend("numpy")
    x = kernel.numpy()
    (core, factors), _ = tl_partial_tucker(x, rank=list(ranks), modes=[0, 1], init="svd")
    approx = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    return float(((x - approx) ** 2).sum() ** 0.5 / (x**2).sum() ** 0.5)


@pytest.mark.parametrize("ranks", [(4, 4), (8, 6), (12, 10)])
def test_hooi_error_equals_tensorly_partial_tucker(ranks: tuple[int, int]) -> None:
    for kernel in _kernels():
        ours = partial_tucker(kernel, ranks, (0, 1), hooi_iters=100, tol=1e-4)
        hosvd = partial_tucker(kernel, ranks, (0, 1), hooi_iters=0)
        reconstructed = (kernel - ours.to_tensor()).norm() / kernel.norm()
        assert float(reconstructed) == pytest.approx(ours.rel_error, abs=1e-10)
        assert ours.rel_error == pytest.approx(_tensorly_error(kernel, ranks), abs=1e-4)
        assert ours.rel_error <= hosvd.rel_error + 1e-12


def test_paper_preset_builds_with_hooi() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 48, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(_kernels()[1])
    method = get_method("tucker", preset="paper")
    assert (method.hooi_iters, method.hooi_tol, method.rank_rule) == (100, 1e-4, "vbmf")
    layer = method.build(conv, {"rank_out": 8, "rank_in": 6}, None)
    dense = layer.to_dense().weight.detach()
    weight = conv.weight.detach()
    error = float((dense - weight).norm() / weight.norm())
    assert error == pytest.approx(_tensorly_error(conv.weight.detach(), (8, 6)), abs=1e-4)


def _musco_weaken_rank(rank: int, extreme_rank: int, k: float) -> int:
    """musco-ai/musco-pytorch, rank_selection/estimator.py weaken_rank, re-stated."""
    if rank < 21 or extreme_rank == 0:
        return rank
    return int(rank - k * (rank - extreme_rank))


@pytest.mark.parametrize(
    ("full", "vbmf", "k", "expected"), [(64, 0, 0.8, 64), (256, 37, 0.8, 80), (16, 3, 0.8, 16)]
)
def test_weakened_vbmf_table(full: int, vbmf: int, k: float, expected: int) -> None:
    assert weaken_rank(full, vbmf, k, min_rank=21, rule="musco") == expected
    # the previous (tensorslim) rule differs on exactly these cases
    assert weaken_rank(64, 0, 0.8) == 13 and weaken_rank(16, 3, 0.8) == 6


def test_musco_rule_matches_the_official_function_on_a_grid() -> None:
    for full in (8, 20, 21, 33, 64, 257):
        for vbmf in range(0, full + 1, max(1, full // 9)):
            for k in (0.0, 0.3, 0.8, 1.0):
                ours = weaken_rank(full, vbmf, k, min_rank=21, rule="musco")
                official = _musco_weaken_rank(full, vbmf, k)
                # int() of a float that lands a hair below an integer: ours absorbs the error
                exact = full - k * (full - vbmf)
                if abs(exact - round(exact)) > 1e-6 or full < 21 or vbmf == 0:
                    assert ours == official, (full, vbmf, k)
                else:
                    assert ours == round(exact) and official in (ours, ours - 1)
    assert math.isclose(get_method("tucker", preset="musco").weaken, 0.8)
