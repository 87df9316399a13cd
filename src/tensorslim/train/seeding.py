"""Seeds derived from a base seed and names, so a stage's randomness does not depend on what ran
before it in the same process."""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(base_seed: int, *names: object) -> int:
    """A 63-bit seed from ``base_seed`` and ``names`` (stable across processes and platforms).

    SHA-256 of the decimal seed and the names joined by the unit separator, first 8 bytes, shifted
    to 63 bits so it fits ``torch.manual_seed`` and ``numpy`` alike.
    """
    text = "\x1f".join([str(int(base_seed)), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def seed_everything(seed: int) -> None:
    """Seed every global generator a stage may draw from; nothing is saved or restored.

    Seeds torch's default generator on the CPU and on every CUDA device (``torch.manual_seed``),
    numpy's legacy global generator (``numpy.random.seed``, which takes 32 bits: ``seed mod 2³²``)
    and Python's :mod:`random`. Generators a caller owns (a ``torch.Generator`` of its own, a
    ``numpy.random.Generator``) are untouched: they are seeded where they are made.
    """
    # imported here, not at the top: derive_seed alone needs nothing but hashlib
    import random

    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def reseed_loader(loader: object, seed: int) -> None:
    """Restart the shuffling of ``loader`` (a DataLoader) from ``seed``.

    The loader's own generator and its sampler's (a shuffling DataLoader shares one) are
    reseeded, and a ``DistributedSampler`` (its order is ``seed + epoch``) gets ``seed``: the
    batches of the next epochs then depend on ``seed`` alone, not on how many epochs an earlier
    stage drew from the same loader.
    """
    for generator in loader_generators(loader):  # type: ignore[arg-type]
        generator.manual_seed(seed)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch") and hasattr(sampler, "seed"):
        sampler.seed = seed  # type: ignore[union-attr]


def seed_phase(
    base_seed: int, *names: object, loaders: tuple[object, ...] | list[object] = ()
) -> int:
    """Start a phase (a recipe stage, a part of a command) from a state that is its own.

    The phase seed is ``derive_seed(base_seed, *names)``; it seeds the global generators
    (:func:`seed_everything`) and loader ``i`` of ``loaders`` from
    ``derive_seed(phase_seed, "loader", i)``, so shuffling and the model's own draws (dropout,
    random init) are not one stream. The same arguments give the same state whatever ran before
    in the process — a fresh run, a ``--resume``, every rank under torchrun alike. An epoch
    checkpoint restored after this (``fit(resume=True)``) overrides it, as it should.
    Returns the phase seed (to record beside the results).
    """
    seed = derive_seed(base_seed, *names)
    seed_everything(seed)
    for index, loader in enumerate(loaders):
        if loader is not None:
            reseed_loader(loader, derive_seed(seed, "loader", index))
    return seed


class PhaseSeeds:
    """The phases of one run (base training, compress, fine-tune, …), each seeded by its name.

    ``start(name)`` is ``seed_phase(base_seed, name, loaders=loaders)`` and remembers the seed in
    ``seeds`` (name → seed, for results.json). With ``base_seed=None`` it does nothing: a library
    caller who did not ask for phase seeds keeps the random state it set up itself.
    """

    def __init__(
        self, base_seed: int | None, loaders: tuple[object, ...] | list[object] = ()
    ) -> None:
        self.base_seed, self.loaders = base_seed, tuple(loaders)
        self.seeds: dict[str, int] = {}

    def start(self, phase: str) -> int | None:
        """Seed everything for ``phase``; its seed (``None`` without a base seed)."""
        if self.base_seed is None:
            return None
        self.seeds[phase] = seed_phase(self.base_seed, phase, loaders=self.loaders)
        return self.seeds[phase]


def loader_generators(loader: object) -> list[Any]:
    """The ``torch.Generator`` objects a DataLoader (or its sampler) shuffles with, each once."""
    import torch

    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    for owner in (loader, sampler, batch_sampler):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found
