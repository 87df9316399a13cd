"""How a target sparsity is spread over layers: one global ranking, uniform, or Erdős–Rényi-kernel.

- ``global``: one magnitude threshold over all ranked layers (each layer's sparsity is whatever
  the ranking leaves; :func:`tensorslim.train.pruning.global_magnitude_masks`);
- ``layer`` / ``uniform``: every ranked layer at the same sparsity s (RPG's ``--sp-distribution
  uniform``, which also keeps the first layer dense: ``keep_first_dense=True``);
- ``erk`` (Evci et al. 2020, as in RPG's ``get_erdos_renyi_dist``): layer l of shape
  (n_out, n_in, kh, kw) keeps density d_l = ε·r_l with r_l = Σ shape / Π shape; ε is chosen so
  the kept weights total D·N, and a layer whose ε·r_l would exceed 1 is made dense (d_l = 1) and
  ε solved again over the rest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from tensorslim.errors import TensorslimError

DISTRIBUTIONS = ("global", "layer", "uniform", "erk")


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Per-layer densities d_l of the ERK distribution for an overall density ``density``.

    ε = Σ_{l sparse} ⌊n_l·D⌋ − Σ_{l dense} ⌊n_l·(1 − D)⌋, divided by Σ_{l sparse} r_l·n_l (the
    official code's integer counts); layers are made dense, largest r_l first, until every
    ε·r_l ≤ 1. Returns d_l ∈ (0, 1] in the order of ``shapes``.
    """
    if not 0.0 < density <= 1.0:
        raise TensorslimError(f"ERK needs an overall density in (0, 1], got {density}")
    if not shapes:
        raise TensorslimError("ERK needs at least one layer")
    sizes = [math.prod(shape) for shape in shapes]
    raw = [sum(shape) / size for shape, size in zip(shapes, sizes, strict=True)]
    dense: set[int] = set()
    while True:
        kept = sum(int(n * density) for i, n in enumerate(sizes) if i not in dense)
        kept -= sum(int(n * (1.0 - density)) for i, n in enumerate(sizes) if i in dense)
        divisor = sum(raw[i] * n for i, n in enumerate(sizes) if i not in dense)
        if divisor == 0:
            return [1.0] * len(shapes)
        epsilon = kept / divisor
        largest = max(raw[i] for i in range(len(sizes)) if i not in dense)
        if largest * epsilon <= 1.0:
            break
        # every layer at the largest raw probability becomes dense, then ε is solved again
        dense |= {i for i in range(len(sizes)) if i not in dense and raw[i] == largest}
    return [1.0 if i in dense else epsilon * raw[i] for i in range(len(sizes))]


def layer_sparsities(
    distribution: str, schedule: object, step: int, finals: Sequence[float]
) -> list[float]:
    """Each layer's target sparsity at ``step`` for the ``layer``/``uniform``/``erk`` cases.

    ``schedule`` is a :class:`tensorslim.train.pruning.SparsitySchedule` (read for its shape);
    ``finals`` are the layers' final sparsities (all equal for uniform). A layer follows the same
    schedule shape as the whole, from min(s_i, s_l) to its own final s_l.
    """
    if distribution not in DISTRIBUTIONS[1:]:
        raise TensorslimError(f"no per-layer targets for distribution '{distribution}'")
    out = []
    initial = schedule.initial_sparsity  # type: ignore[attr-defined]
    for final in finals:
        own = dataclasses.replace(
            schedule, final_sparsity=final, initial_sparsity=min(initial, final)
        )
        out.append(own.sparsity_at(step))
    return out
