"""Composite layers: torch modules that hold several weight matrices and are compressed as one
plan entry (recurrent modules' gate matrices, multi-head attention's q/k/v/out projections);
their matrices are factorized at one rank r, each capped at its own full rank and kept dense
where the factorization would not pay — see :mod:`tensorslim.layers.factor`.

For a rank r this module states, without building anything: the parameters and FLOPs of the
factorized layer, and the weight-space error ‖W − Ŵ‖_F / ‖W‖_F over all its matrices stacked.
A recurrent matrix multiplies one row per input token of the call; attention's q and out
projections one per query token, k and v one per key/value token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tensorslim.layers.attention import attention_projections, projection_rows
from tensorslim.layers.factor import factor_params, factor_rank
from tensorslim.layers.recurrent import RECURRENT, gate_matrices, unsupported_rnn_reason

COMPOSITE = (*RECURRENT, nn.MultiheadAttention)


def is_composite(module: nn.Module) -> bool:
    """Whether ``module`` is a layer this module describes."""
    return isinstance(module, COMPOSITE)


def unsupported_composite_reason(module: nn.Module) -> str | None:
    """Why the composite layer cannot be factorized, or None if it can."""
    if isinstance(module, nn.MultiheadAttention):
        return None
    return unsupported_rnn_reason(module)  # type: ignore[arg-type]


def composite_matrices(module: nn.Module) -> list[torch.Tensor]:
    """Every weight matrix (out × in) of the layer, detached."""
    if isinstance(module, nn.MultiheadAttention):
        return [w.detach() for w, _ in attention_projections(module)]
    return [w.detach() for w in gate_matrices(module)]  # type: ignore[arg-type]


def matrix_rows(
    module: nn.Module,
    input_shape: tuple[int, ...],
    other_shapes: tuple[tuple[int, ...], ...] = (),
) -> list[int]:
    """Rows each matrix multiplies in a call with a first input of ``input_shape`` (and further
    inputs of ``other_shapes``)."""
    if isinstance(module, nn.MultiheadAttention):
        return projection_rows(input_shape, other_shapes)
    tokens = math.prod(input_shape[:-1])
    return [tokens] * len(composite_matrices(module))


def composite_cost(
    module: nn.Module,
    rank: int,
    input_shape: tuple[int, ...],
    other_shapes: tuple[tuple[int, ...], ...] = (),
) -> tuple[int, int]:
    """(params, FLOPs) of the layer with every matrix at ``rank`` (2 FLOPs per multiply-add)."""
    matrices = composite_matrices(module)
    weights = [factor_params(w.shape[1], w.shape[0], rank) for w in matrices]
    others = sum(p.numel() for p in module.parameters()) - sum(w.numel() for w in matrices)
    rows = matrix_rows(module, input_shape, other_shapes)
    return others + sum(weights), 2 * sum(r * p for r, p in zip(rows, weights, strict=True))


def useful_rank_limit(module: nn.Module) -> int:
    """The largest rank at which at least one matrix is still factorized (0: none ever is)."""
    limit = 0
    for w in composite_matrices(module):
        out_f, in_f = w.shape
        # r·(in + out) < in·out ⇔ r < in·out / (in + out)
        best = math.ceil(in_f * out_f / (in_f + out_f)) - 1
        limit = max(limit, min(best, in_f, out_f))
    return limit


def truncation_error(
    spectra: list[torch.Tensor], shapes: list[tuple[int, int]], rank: int
) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F over all matrices at ``rank`` (a matrix kept dense contributes 0)."""
    total = sum(float(s.double().pow(2).sum()) for s in spectra)
    lost = 0.0
    for s, (out_f, in_f) in zip(spectra, shapes, strict=True):
        kept = factor_rank(in_f, out_f, rank)
        if kept is not None:
            lost += float(s[kept:].double().pow(2).sum())
    return math.sqrt(lost / total) if total > 0 else 0.0
