"""δ-rank: how many directions of a (sparse) weight matter, the measure of Tian et al. 2023.

A weight W is viewed as a matrix (C_out, rest) — a conv kernel (n, c, kh, kw) as n × (c·kh·kw) —
and normalised, W̄ = W / ‖W‖_F, so that Σ σ̄_i² = 1 and layers of any scale compare. The best
rank-k approximation W̄_k (truncated SVD, Eckart–Young) is at spectral distance
‖W̄ − W̄_k‖₂ = σ̄_{k+1}, so

    rank_δ(W) = min{k ≥ 0 : ‖W̄ − W̄_k‖₂ ≤ δ} = #{i : σ̄_i > δ}.

An all-zero weight has δ-rank 0. Unstructured pruning tends to collapse this number at high
sparsity (the remaining weights concentrate on few directions); RPG's rank loss pushes it up.

This spectral-norm definition (δ on σ̄_{k+1}) is this project's reading of the paper's δ-rank.
The RPG code itself logs a different number, the k of its rank loss (``rank_kit.find_k``): the
leading directions kept when the discarded tail energy Σ_{i>k} σ̄_i² is closest to ``partial_k``
(:func:`partial_energy_rank`). Reports give both (``delta_rank`` and ``energy_rank``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.layers.linear_like import LinearLike, is_linear_like, linear_weight

DEFAULT_DELTA = 0.05


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread, then restore the setting.

    The SVDs of layer-sized matrices (≤ a few thousand columns) gain nothing from threads, and on
    a busy CPU their OpenMP barriers stall: measured 10–20× slower with 2 threads than 1 here.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight of shape (C_out, …) viewed as the matrix (C_out, rest)."""
    if weight.dim() < 2:
        raise TensorslimError(f"a weight of shape {tuple(weight.shape)} has no matrix view")
    return weight.reshape(weight.shape[0], -1)


def normalized_singular_values(weight: torch.Tensor) -> torch.Tensor:
    """σ̄, the singular values of W̄ = W/‖W‖_F (descending, float64); zeros for W = 0."""
    matrix = weight_matrix(weight.detach()).double()
    norm = torch.linalg.matrix_norm(matrix)
    with single_threaded():
        sv = torch.linalg.svdvals(matrix)
    if not torch.isfinite(sv).all():
        raise TensorslimError("the weight contains NaN or Inf: its δ-rank is undefined")
    if float(norm) == 0.0:
        return torch.zeros_like(sv)
    return sv / norm


def partial_energy_rank(normalized_sv: torch.Tensor, partial_k: float) -> int:
    """The RPG code's k (``rank_kit.find_k``): k ∈ {0, …, r − 1} whose tail energy
    Σ_{i>k} σ̄_i² is closest to ``partial_k`` (at least one value is discarded; ties go to the
    larger k, the smaller tail). ``normalized_sv``: σ̄ descending with Σ σ̄_i² = 1.
    """
    if not 0.0 <= partial_k <= 1.0:
        raise TensorslimError(
            f"partial_k (tail energy fraction) must be in [0, 1], got {partial_k}"
        )
    if not bool(torch.isfinite(normalized_sv).all()):
        raise TensorslimError("rank: the spectrum has NaN/Inf (the SVD failed)")
    energy = normalized_sv.double() ** 2
    # tails[j] = energy of the j + 1 smallest values, i.e. the tail of k = r − 1 − j
    tails = torch.cumsum(torch.flip(energy, [0]), 0)
    gaps = (tails - partial_k).abs()
    first = int((gaps <= float(gaps.min()) + 1e-15).nonzero().reshape(-1).min())
    return len(tails) - 1 - first


def delta_rank(weight: torch.Tensor, delta: float = DEFAULT_DELTA) -> int:
    """The δ-rank of ``weight`` (see the module docstring): #{i : σ̄_i > δ}."""
    if not 0.0 <= delta < 1.0:
        raise TensorslimError(f"δ must be in [0, 1) for a Frobenius-normalised weight, got {delta}")
    return int((normalized_singular_values(weight) > delta).sum())


def layer_delta_ranks(
    model: nn.Module,
    delta: float = DEFAULT_DELTA,
    layers: Iterable[str] | None = None,
    partial_k: float | None = None,
) -> dict[str, dict[str, float]]:
    """Per Linear / Conv2d layer: ``{"delta_rank", "full_rank", "relative"}`` (rank / full rank),
    and ``"energy_rank"`` (:func:`partial_energy_rank`) when ``partial_k`` is given.

    ``layers`` restricts the report to those fqns (all Linear / Conv2d layers by default). The
    effective weight is used, so a masked layer reports the rank of original ⊙ mask.
    """
    if not 0.0 <= delta < 1.0:
        raise TensorslimError(f"δ must be in [0, 1) for a Frobenius-normalised weight, got {delta}")
    wanted = set(layers) if layers is not None else None
    report: dict[str, dict[str, float]] = {}
    for fqn, module in model.named_modules():
        if not isinstance(module, (LinearLike, nn.Conv2d)):
            continue
        if wanted is not None and fqn not in wanted:
            continue
        weight = (linear_weight(module) if is_linear_like(module) else module.weight).detach()
        full = min(weight.shape[0], weight[0].numel())
        try:
            sv = normalized_singular_values(weight)
            rank = int((sv > delta).sum())
            energy = partial_energy_rank(sv, partial_k) if partial_k is not None else None
        except TensorslimError as exc:
            raise TensorslimError(f"layer {fqn}: {exc}") from None
        report[fqn] = {"delta_rank": rank, "full_rank": full, "relative": rank / max(1, full)}
        if energy is not None:
            report[fqn]["energy_rank"] = energy
    if wanted is not None and (missing := wanted - set(report)):
        warnings.warn(f"δ-rank: no Linear/Conv2d named {sorted(missing)}", stacklevel=2)
    return report


def average_delta_rank(
    model: nn.Module,
    delta: float = DEFAULT_DELTA,
    layers: Iterable[str] | None = None,
    partial_k: float | None = None,
) -> dict[str, float]:
    """``{"avg_delta_rank", "avg_relative_delta_rank"}`` (+ ``"avg_energy_rank"`` with
    ``partial_k``): plain means over the layers."""
    report = layer_delta_ranks(model, delta, layers, partial_k)
    if not report:
        empty = {"avg_delta_rank": 0.0, "avg_relative_delta_rank": 0.0}
        return empty | ({"avg_energy_rank": 0.0} if partial_k is not None else {})
    ranks = [r["delta_rank"] for r in report.values()]
    relative = [r["relative"] for r in report.values()]
    out = {
        "avg_delta_rank": sum(ranks) / len(ranks),
        "avg_relative_delta_rank": sum(relative) / len(relative),
    }
    if partial_k is not None:
        out["avg_energy_rank"] = sum(r["energy_rank"] for r in report.values()) / len(report)
    return out
