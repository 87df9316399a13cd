"""Seeds derived from a base seed and names, so a stage's randomness does not depend on what ran
before it in the same process."""

from __future__ import annotations

import hashlib


def derive_seed(base_seed: int, *names: object) -> int:
    """A 63-bit seed from ``base_seed`` and ``names`` (stable across processes and platforms).

    SHA-256 of the decimal seed and the names joined by the unit separator, first 8 bytes, shifted
    to 63 bits so it fits ``torch.manual_seed`` and ``numpy`` alike.
    """
    text = "\x1f".join([str(int(base_seed)), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
