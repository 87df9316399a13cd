"""One weight matrix of a composite layer (attention, recurrent) as a rank-r factorization, or kept
dense where the factorization would not pay.

A matrix W (out × in) at rank r costs r·(in + out) parameters and 2·r·(in + out) FLOPs per row
as :class:`~tensorslim.layers.lowrank.LowRankLinear`, against in·out and 2·in·out dense. When
r·(in + out) ≥ in·out (always at full rank) the dense ``nn.Linear`` is cheaper and exact, so a
composite layer keeps that matrix dense; the rule depends only on the shape and the rank, so a
saved plan rebuilds the same structure.
"""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.decompose.svd import SvdDriver
from tensorslim.layers.lowrank import LowRankLinear


def factor_rank(in_features: int, out_features: int, rank: int) -> int | None:
    """The rank the matrix is factorized at (``rank`` capped at the full rank), or ``None`` when
    the dense matrix is no more expensive (it is then kept dense)."""
    kept = min(rank, in_features, out_features)
    return kept if kept * (in_features + out_features) < in_features * out_features else None


def factor_params(in_features: int, out_features: int, rank: int) -> int:
    """Weight parameters of the matrix at ``rank`` (bias excluded)."""
    kept = factor_rank(in_features, out_features, rank)
    return in_features * out_features if kept is None else kept * (in_features + out_features)


def factor_skeleton(
    in_features: int,
    out_features: int,
    rank: int,
    bias: bool,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The (uninitialised) module for one matrix: ``LowRankLinear`` or ``nn.Linear``."""
    kept = factor_rank(in_features, out_features, rank)
    if kept is None:
        return nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
    return LowRankLinear(in_features, out_features, kept, bias, device=device, dtype=dtype)


def factor_from_weight(
    weight: torch.Tensor, bias: torch.Tensor | None, rank: int, driver: SvdDriver = "auto"
) -> nn.Module:
    """The module for W (out × in) and b at ``rank``: truncated SVD, or a dense copy."""
    out_features, in_features = weight.shape
    dense = nn.Linear(
        in_features, out_features, bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        dense.weight.copy_(weight.detach())
        if bias is not None:
            dense.bias.copy_(bias.detach())
    kept = factor_rank(in_features, out_features, rank)
    return dense if kept is None else LowRankLinear.from_dense(dense, kept, driver=driver)


def factor_weight(module: nn.Module) -> torch.Tensor:
    """The (out × in) matrix a factor module computes (multiplied out for a low-rank one)."""
    if isinstance(module, LowRankLinear):
        return module.up.weight @ module.down.weight
    return module.weight


def factor_flops_per_row(module: nn.Module) -> int:
    """FLOPs (2 per multiply-add) of one input row through a factor module."""
    if isinstance(module, LowRankLinear):
        return 2 * module.rank * (module.in_features + module.out_features)
    return 2 * module.in_features * module.out_features
