"""Energy pruning of singular values and the energy search for a cost target."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorslim.errors import TensorslimError
from tensorslim.rank.energy_prune import (
    check_energy,
    energy_keep_count,
    energy_keep_mask,
    energy_thresholds,
    search_energy,
)


def test_constructed_spectrum() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 (total 22)
    assert energy_keep_count(s, 0.0) == 4
    assert energy_keep_count(s, 0.99 / 22) == 4
    assert energy_keep_count(s, 1 / 22) == 3
    assert energy_keep_count(s, 2 / 22) == 2
    assert energy_keep_count(s, 5.99 / 22) == 2
    assert energy_keep_count(s, 6 / 22) == 1
    assert energy_keep_count(s, 0.999) == 1  # never below rank 1
    assert energy_keep_count(torch.zeros(3), 0.5) == 1
    assert energy_thresholds(s) == pytest.approx([1 / 22, 2 / 22, 6 / 22])


def test_mask_keeps_the_largest_magnitudes_in_storage_order() -> None:
    s = torch.tensor([1.0, -4.0, 0.5, 2.0])
    assert energy_keep_mask(s, 0.5 / 21.25).tolist() == [True, True, False, True]
    assert energy_keep_mask(s, 1.5 / 21.25).tolist() == [False, True, False, True]
    assert energy_keep_mask(s, 0.3).tolist() == [False, True, False, False]


@pytest.mark.parametrize("bad", [1.0, -0.01, 1.5, float("nan"), True, "0.1"])
def test_energy_outside_range_is_an_error(bad) -> None:
    with pytest.raises(TensorslimError, match="energy"):
        check_energy(bad)
    with pytest.raises(TensorslimError, match="energy"):
        energy_keep_count(torch.ones(3), bad)


def test_non_finite_spectrum_is_an_error() -> None:
    with pytest.raises(TensorslimError, match="conv3: singular values contain NaN"):
        energy_keep_count(torch.tensor([1.0, float("nan")]), 0.1, "conv3")


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30),
    energy=st.floats(0.0, 0.999),
)
def test_removes_the_largest_set_within_the_energy(values: list[float], energy: float) -> None:
    s = torch.tensor(values, dtype=torch.float64)
    k = energy_keep_count(s, energy)
    assert 1 <= k <= len(values)
    squares = sorted((v * v for v in values), reverse=True)
    total = sum(squares)
    if total == 0:
        assert k == 1
        return
    removed = sum(squares[k:])
    assert removed <= energy * total * (1 + 1e-9) + 1e-12
    if k > 1:  # removing one more (the next smallest) would exceed e
        assert removed + squares[k - 1] > energy * total * (1 - 1e-9)
    mask = energy_keep_mask(s, energy)
    assert int(mask.sum()) == k
    if k < len(values):
        assert float(s[mask].abs().min()) >= float(s[~mask].abs().max())


def _costs(spectra):
    # a layer costs its kept rank times its width, dense cost caps it
    widths = [3, 5, 2]
    return [lambda k, w=w: min(k * w, 8 * w) for w in widths[: len(spectra)]]


def test_search_energy_is_minimal_and_meets_the_target() -> None:
    torch.manual_seed(0)
    spectra = [torch.rand(10) * torch.logspace(0, -2, 10) for _ in range(3)]
    costs = _costs(spectra)
    fixed, total = 20, 20 + 8 * (3 + 5 + 2)

    def cost_at(e: float) -> int:
        return fixed + sum(
            fn(energy_keep_count(s, e)) for s, fn in zip(spectra, costs, strict=True)
        )

    for target in (0.9, 0.6, 0.45):
        energy, reached = search_energy(spectra, costs, fixed, total, target)
        assert reached <= target
        assert cost_at(energy) / total == pytest.approx(reached)
        # every smaller threshold that changes a rank misses the target
        smaller = [e for s in spectra for e in energy_thresholds(s) if e < energy]
        for e in [0.0, *smaller]:
            assert cost_at(e) / total > target or math.isclose(e, energy)


def test_search_energy_unreachable_target() -> None:
    spectra = [torch.tensor([3.0, 2.0, 1.0])]
    with pytest.raises(TensorslimError, match="not reachable"):
        search_energy(spectra, [lambda k: 10 * k], 90, 120, 0.5)
    with pytest.raises(TensorslimError, match="in \\(0, 1\\]"):
        search_energy(spectra, [lambda k: 10 * k], 0, 30, 1.5)
