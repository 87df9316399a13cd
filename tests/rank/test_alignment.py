"""Aligned ranks: the masks, the config alignment, and that the ladders offer them."""

from __future__ import annotations

import torch

from tensorslim.methods.svd import _ladder
from tensorslim.rank.alignment import aligned, alignment_for


def test_alignment_for_picks_the_largest_multiple_that_fits() -> None:
    assert [alignment_for(s) for s in (0.5, 1, 3, 7.9, 8, 15, 16, 400)] == [
        1,
        1,
        2,
        4,
        8,
        8,
        16,
        16,
    ]


def test_aligned_mask_keeps_multiples_and_the_full_rank() -> None:
    mask = aligned(64)  # 64 / 8 channels → multiples of 8
    assert torch.nonzero(mask).reshape(-1).add(1).tolist() == [8, 16, 24, 32, 40, 48, 56, 64]
    assert aligned(3).all()  # too small to align: every rank
    assert torch.nonzero(aligned(100)).reshape(-1).add(1).tolist()[-2:] == [96, 100]


def test_svd_ladder_large_ranks_are_aligned() -> None:
    ladder = _ladder(512)
    assert ladder[0] == 1 and ladder[-1] == 512
    assert all(r % 8 == 0 for r in ladder if r >= 128)
    assert sum(r % 8 == 0 for r in ladder) >= 0.75 * len(ladder)
