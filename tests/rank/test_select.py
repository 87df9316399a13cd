"""Per-layer rank rules on constructed spectra: fixed, ratio, energy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorslim.errors import TensorslimError
from tensorslim.rank.select import (
    energy_kept,
    rank_from_energy,
    rank_from_ratio,
    validate_fixed_rank,
)


def spectrum(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_fixed_rank_accepts_1_to_full_and_names_the_layer_otherwise() -> None:
    assert validate_fixed_rank(1, 8) == 1
    assert validate_fixed_rank(8, 8) == 8
    for bad in (0, 9, -3, 2.0, True, "4"):
        with pytest.raises(TensorslimError, match=r"features\.3.*1\.\.8"):
            validate_fixed_rank(bad, 8, "features.3")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ratio", "full", "want"),
    [(1.0, 10, 10), (0.5, 10, 5), (0.25, 10, 3), (0.01, 10, 1), (0.3, 10, 3), (0.7, 3, 3)],
)
def test_ratio_is_the_ceiling_of_the_fraction(ratio: float, full: int, want: int) -> None:
    # 0.3·10 is 3.0000000000000004 in floating point: the rule must still give 3
    assert rank_from_ratio(ratio, full) == want


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01])
def test_ratio_outside_0_1_is_an_error(ratio: float) -> None:
    with pytest.raises(TensorslimError, match="ratio"):
        rank_from_ratio(ratio, 10)


def test_energy_kept_is_the_cumulative_fraction() -> None:
    kept = energy_kept(spectrum(3.0, 2.0, 1.0, 1.0, 1.0))  # energies 9, 4, 1, 1, 1 of 16
    torch.testing.assert_close(kept, spectrum(9, 13, 14, 15, 16) / 16)
    assert torch.equal(energy_kept(spectrum(0.0, 0.0)), spectrum(1.0, 1.0))


@pytest.mark.parametrize(
    ("keep", "want"),
    [(0.5, 1), (9 / 16, 1), (0.57, 2), (13 / 16, 2), (0.9, 4), (15 / 16, 4), (0.99, 5)],
)
def test_energy_rule_keeps_the_smallest_rank_reaching_the_fraction(keep: float, want: int) -> None:
    assert rank_from_energy(spectrum(3.0, 2.0, 1.0, 1.0, 1.0), keep) == want


def test_energy_keep_one_keeps_every_nonzero_value_and_no_zero_one() -> None:
    assert rank_from_energy(spectrum(3.0, 2.0, 1.0), 1.0) == 3
    assert rank_from_energy(spectrum(3.0, 2.0, 0.0, 0.0), 1.0) == 2
    # a tiny but nonzero value (energy 1e-12 of the total) is still energy: keep=1.0 keeps it
    assert rank_from_energy(spectrum(10.0, 1e-5), 1.0) == 2
    assert rank_from_energy(spectrum(*([100.0] * 29), 1e-5), 1.0) == 30
    # …but what an SVD returns for an exactly rank-2 matrix beyond its rank is noise, not energy
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(40, 2, generator=g, dtype=torch.float64) for _ in range(2))
    noisy = torch.linalg.svdvals(a @ b.T)
    assert noisy[2] > 0
    assert rank_from_energy(noisy, 1.0) == 2
    # rounding in the cumulative sum must not push keep=1.0 past the last value
    values = torch.rand(300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rank_from_energy(torch.sort(values, descending=True).values, 1.0) == 300


def test_energy_on_a_flat_spectrum_is_proportional() -> None:
    flat = torch.ones(10, dtype=torch.float64)
    assert [rank_from_energy(flat, k / 10) for k in range(1, 11)] == list(range(1, 11))
    assert rank_from_energy(flat, 0.55) == 6


def test_energy_with_one_dominant_value_keeps_rank_one() -> None:
    dominant = spectrum(100.0, *([1e-3] * 63))
    assert rank_from_energy(dominant, 0.999) == 1
    assert rank_from_energy(dominant, 1.0) == 64


def test_energy_of_an_all_zero_spectrum_is_rank_one() -> None:
    assert rank_from_energy(torch.zeros(5, dtype=torch.float64), 0.9) == 1


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5])
def test_energy_outside_0_1_is_an_error(keep: float) -> None:
    with pytest.raises(TensorslimError, match="energy"):
        rank_from_energy(spectrum(1.0, 0.5), keep)


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=40),
    keep=st.floats(1e-3, 1.0),
)
def test_energy_rule_is_minimal_on_random_spectra(values: list[float], keep: float) -> None:
    s = torch.sort(torch.tensor(values, dtype=torch.float64), descending=True).values
    k = rank_from_energy(s, keep)
    energy = s**2
    assert 1 <= k <= s.numel()
    assert energy[:k].sum() >= (keep - 1e-9) * energy.sum()
    if k > 1:
        assert energy[: k - 1].sum() < keep * energy.sum()
