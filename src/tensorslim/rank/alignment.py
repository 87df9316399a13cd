"""Ranks that fill the CPU's vector blocks.

oneDNN's CPU convolutions and GEMMs work on blocks of 8 (AVX2) or 16 (AVX-512) channels, so a
factor's latency is close to a step function of its rank: on this project's AVX-512 machine a
(8, 256, 14, 14) 3×3 conv to 79 channels took 6.9 ms and to 80 channels 2.9 ms, and every rank
from 20 to 32 of a 64-channel conv cost the same. Offering ranks that are multiples
of 16 (8, 4, … where a layer is too small for that) buys each rank's error at the latency the
kernel charges anyway.
"""

from __future__ import annotations

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


__all__ = ["ALIGNMENTS", "aligned", "alignment_for"]
