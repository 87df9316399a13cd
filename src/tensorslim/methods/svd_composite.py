"""The svd method on composite layers (recurrent modules, multi-head attention).

One option per rank r: every weight matrix of the layer at rank min(r, its full rank), kept
dense where the factorization would not pay (:mod:`tensorslim.layers.factor`). The error is
the weight-space error over all matrices stacked (these layers have no single input Gram).
The per-layer rules map to one rank: ``rank`` as given, ``ratio`` of the largest full rank,
``energy`` the largest of the matrices' own energy ranks (each matrix keeps that fraction).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tensorslim.decompose.svd import SvdDriver, singular_values
from tensorslim.errors import TensorslimError
from tensorslim.facts import Config, LayerInfo, Option
from tensorslim.layers.attention import LowRankMultiheadAttention
from tensorslim.layers.composite import (
    composite_cost,
    composite_matrices,
    truncation_error,
    useful_rank_limit,
)
from tensorslim.layers.recurrent import LowRankRNN
from tensorslim.rank.select import rank_from_energy, rank_from_ratio, validate_fixed_rank

if TYPE_CHECKING:
    from tensorslim.methods.svd import SVDMethod


def composite_candidates(
    method: SVDMethod, module: nn.Module, info: LayerInfo, ladder: list[int]
) -> list[Option]:
    """The options of a composite layer (``ladder``: the ranks offered without a rule)."""
    matrices = composite_matrices(module)
    spectra = [singular_values(w) for w in matrices]
    shapes = [tuple(w.shape) for w in matrices]
    limit = useful_rank_limit(module)
    if limit < 1:
        return []
    full = max(s.numel() for s in spectra)
    if method.has_rule:
        ranks = [_rule_rank(method, spectra, full, info.fqn)]
    else:
        ranks = [r for r in ladder if r <= limit]
    options = []
    for rank in ranks:
        params, flops = composite_cost(module, rank, info.input_shape, info_other_shapes(info))
        options.append(
            Option(
                method=method.name,
                config={"rank": rank},
                params=params,
                flops=flops * info.calls,
                error=truncation_error(spectra, shapes, rank),  # type: ignore[arg-type]
                label=f"rank {rank}/{full} ({len(matrices)} matrices)",
                extra={"full_rank": full},
            )
        )
    return options


def info_other_shapes(info: LayerInfo) -> tuple[tuple[int, ...], ...]:
    """The shapes of the call's further inputs (attention keys and values), if recorded."""
    return tuple(getattr(info, "other_shapes", ()) or ())


def _rule_rank(method: SVDMethod, spectra: list[torch.Tensor], full: int, fqn: str) -> int:
    if method.rank is not None:
        return validate_fixed_rank(method.rank, full, fqn)
    if method.ratio is not None:
        return rank_from_ratio(method.ratio, full)
    return max(rank_from_energy(s, float(method.energy)) for s in spectra)  # type: ignore[arg-type]


def build_composite(
    module: nn.Module, config: Config, *, init: bool, driver: SvdDriver
) -> nn.Module:
    """The factorized layer of ``config`` (weights from the SVD when ``init``)."""
    rank = config.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TensorslimError(f"rank {rank!r} in the plan is not a positive integer")
    if isinstance(module, nn.RNNBase):
        if init:
            return LowRankRNN.from_dense(module, rank, driver=driver)
        return LowRankRNN.like(module, rank)
    if isinstance(module, nn.MultiheadAttention):
        if init:
            return LowRankMultiheadAttention.from_dense(module, rank, driver=driver)
        return LowRankMultiheadAttention.like(module, rank)
    raise TensorslimError(f"svd does not factorize {type(module).__name__} layers")
