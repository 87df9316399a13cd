"""Ranks that fill the CPU's vector blocks.

oneDNN's CPU convolutions and GEMMs work on blocks of 8 (AVX2) or 16 (AVX-512) channels, so a
factor's latency is close to a step function of its rank: on this project's AVX-512 machine a
(8, 256, 14, 14) 3×3 conv to 79 channels took 6.9 ms and to 80 channels 2.9 ms, and every rank
from 20 to 32 of a 64-channel conv cost the same. Offering and timing ranks that are multiples
of 16 (8, 4, … where a layer is too small for that) buys each rank's error at the latency the
kernel charges anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

ALIGNMENTS = (16, 8, 4, 2)  # rank multiples preferred, largest first


def alignment_for(step: float) -> int:
    """The largest of :data:`ALIGNMENTS` that is ≤ ``step`` (1 when none is)."""
    return next((m for m in ALIGNMENTS if m <= step), 1)


def aligned(full: int, granularity: int = 8) -> torch.Tensor:
    """Boolean mask over ranks 1..``full``: multiples of :func:`alignment_for` (``full`` /
    ``granularity``), and the full rank itself. A 64-channel mode keeps multiples of 8, a
    256-channel mode multiples of 16, a 16-channel mode multiples of 2."""
    multiple = alignment_for(full / granularity)
    ranks = torch.arange(1, full + 1)
    return (ranks % multiple == 0) | (ranks == full)


def rank_alignment(config: Mapping[str, Any], cap: int = 16) -> int:
    """The largest power of two ≤ ``cap`` dividing every integer rank in ``config`` (keys
    containing "rank"); 1 for a config without ranks."""
    ranks = [v for k, v in config.items() if "rank" in k and type(v) is int]
    if not ranks:
        return 1
    alignment = cap
    while alignment > 1 and any(r % alignment for r in ranks):
        alignment //= 2
    return alignment


__all__ = ["ALIGNMENTS", "aligned", "alignment_for", "rank_alignment"]
