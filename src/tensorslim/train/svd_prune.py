"""Singular value pruning of SVD-form models (Yang et al., CVPR-W 2020) and what follows it.

Per layer, the smallest singular values whose energy is ≤ e·Σs² are removed
(``rank.energy_prune``); with a FLOPs or params target, e is found by bisection so that the whole
model lands at or just under the target. A layer whose remaining rank does not pay (factorized
FLOPs ≥ dense FLOPs) is merged back into a dense layer; the rest become the foundation's
``LowRankLinear``/``LowRankConv2d`` (weights U√|s|, V√|s|). The method ``svd_train`` and the
pipeline (:mod:`tensorslim.train.svd_pipeline`) both prune through :func:`prune_svd_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.analysis.flops import count_flops
from tensorslim.analysis.profile import collect_layer_info, count_params
from tensorslim.errors import TensorslimError
from tensorslim.inputs import take_samples
from tensorslim.layers.svd import SVDLayer, svd_layers
from tensorslim.plan import plans_of, refresh_plan, set_plans
from tensorslim.rank.budget import METRICS
from tensorslim.rank.energy_prune import (
    check_energy,
    energy_keep_count,
    energy_keep_mask,
    search_energy,
)
from tensorslim.surgery import replace_module
from tensorslim.train.svd_regularizers import check_finite_layers


def check_metric(metric: str) -> str:
    """A budget metric: "flops" or "params"."""
    if metric not in METRICS:
        raise TensorslimError(f"unknown budget metric '{metric}': use flops or params")
    return metric


@dataclass
class SVDLayerCost:
    """One SVD layer with the input it sees: its cost at any rank, dense or factorized."""

    fqn: str
    layer: SVDLayer
    input_shape: tuple[int, ...]
    calls: int

    def factorized_flops(self, rank: int) -> int:
        return self.layer.flops_at_rank(self.input_shape, rank) * self.calls

    def dense_flops(self) -> int:
        return self.layer.dense_flops(self.input_shape) * self.calls

    def pays(self, rank: int) -> bool:
        """The factorized form at ``rank`` is cheaper than the dense layer."""
        return self.factorized_flops(rank) < self.dense_flops()

    def _bias(self) -> int:
        bias = getattr(self.layer, "bias", None)
        return bias.numel() if bias is not None else 0

    def dense_params(self) -> int:
        m, n = self.layer.matrix_shape
        return m * n + self._bias()

    def final_cost(self, rank: int, metric: str, merge_dense: bool) -> int:
        """FLOPs or params of the layer's final form (low-rank, or dense if that is cheaper)."""
        m, n = self.layer.matrix_shape
        lowrank = merge_dense is False or self.pays(rank)
        if metric == "flops":
            return self.factorized_flops(rank) if lowrank else self.dense_flops()
        return rank * (m + n) + self._bias() if lowrank else self.dense_params()


def svd_layer_costs(model: nn.Module, example_input: Any) -> list[SVDLayerCost]:
    """Input shapes (batch of 1) of every SVD layer, by one forward pass in eval mode."""
    layers = svd_layers(model)
    infos, _ = collect_layer_info(
        model, take_samples(example_input, 1), types=(SVDLayer,), names=layers
    )
    costs = []
    for fqn, layer in layers:
        info = infos.get(fqn)
        if info is None:
            raise TensorslimError(f"SVD layer '{fqn}' never runs in the forward pass")
        costs.append(SVDLayerCost(fqn, layer, tuple(info.input_shape), info.calls))
    return costs


def _model_totals(
    model: nn.Module, example_input: Any, costs: list[SVDLayerCost]
) -> tuple[int, int]:
    """(FLOPs, params) of everything except the SVD layers, measured on the current model."""
    flops = count_flops(model, take_samples(example_input, 1))
    params = count_params(model)
    for c in costs:
        flops -= c.factorized_flops(c.layer.active_rank())
        params -= sum(p.numel() for p in c.layer.parameters())
    return flops, params


def _search_target_energy(
    costs: list[SVDLayerCost],
    spectra: list[torch.Tensor],
    fixed: tuple[int, int],
    reference: tuple[int, int],
    target: tuple[str, float],
    merge_dense: bool,
) -> float:
    """The smallest energy threshold whose pruned model meets ``target`` (metric, fraction)."""
    metric, fraction = target
    index = METRICS.index(check_metric(metric))
    energy, _ = search_energy(
        spectra,
        [lambda k, c=c: c.final_cost(k, metric, merge_dense) for c in costs],
        fixed[index],
        reference[index],
        fraction,
        metric,
    )
    return energy


def _prune_layer(
    c: SVDLayerCost, spectrum: torch.Tensor, energy: float, merge_dense: bool
) -> dict[str, Any]:
    """Prune one layer's active singular values at ``energy``; its row of the report."""
    before = c.layer.active_rank()
    keep = energy_keep_mask(spectrum, energy, c.fqn)
    mask = c.layer.active.clone()
    mask[c.layer.active.nonzero().squeeze(1)] = keep.to(mask.device)
    total_energy = float(spectrum.double().pow(2).sum())
    removed = float(spectrum[~keep].double().pow(2).sum())
    c.layer.set_active(mask)
    after = c.layer.active_rank()
    return {
        "layer": c.fqn,
        "type": type(c.layer).__name__,
        "scheme": c.layer.scheme,
        "full_rank": c.layer.full_rank,
        "rank_before": before,
        "rank_after": after,
        "energy_removed": removed / total_energy if total_energy > 0 else 0.0,
        "form": "lowrank" if (not merge_dense or c.pays(after)) else "dense",
        "flops_dense": c.dense_flops(),
        "flops_full_rank": c.factorized_flops(c.layer.full_rank),
        "flops_after": c.final_cost(after, "flops", merge_dense),
        "params_after": c.final_cost(after, "params", merge_dense),
    }


def prune_svd_model(
    model: nn.Module,
    example_input: Any,
    *,
    energy: float | None = None,
    target: tuple[str, float] | None = None,
    reference: tuple[int, int] | None = None,
    merge_dense: bool = True,
) -> dict[str, Any]:
    """Energy-prune every SVD layer of ``model`` (in place: the ``active`` masks change).

    Give ``energy`` (fraction of Σs² each layer may lose, in [0, 1)) or ``target`` =
    ("flops" | "params", fraction of the reference model); ``reference`` = (FLOPs, params) of the
    original dense model (default: the dense equivalent of the current model). Returns a report:
    the energy used, the fraction reached, and per layer the rank before/after and the form it
    will take ("lowrank", or "dense" where the rank left does not pay).
    """
    if (energy is None) == (target is None):
        raise TensorslimError("give exactly one of energy=… or a FLOPs/params target")
    costs = svd_layer_costs(model, example_input)
    if not costs:
        raise TensorslimError("the model has no SVD-form layers to prune")
    check_finite_layers([(c.fqn, c.layer) for c in costs])
    fixed = _model_totals(model, example_input, costs)
    if reference is None:
        reference = (
            fixed[0] + sum(c.dense_flops() for c in costs),
            fixed[1] + sum(c.dense_params() for c in costs),
        )
    spectra = [c.layer.singular_values() for c in costs]
    if target is not None:
        energy = _search_target_energy(costs, spectra, fixed, reference, target, merge_dense)
    energy = check_energy(float(energy))  # type: ignore[arg-type]
    rows = [_prune_layer(c, s, energy, merge_dense) for c, s in zip(costs, spectra, strict=True)]
    flops_after = fixed[0] + sum(r["flops_after"] for r in rows)
    params_after = fixed[1] + sum(r["params_after"] for r in rows)
    return {
        "energy": energy,
        "target": {target[0]: target[1]} if target is not None else None,
        "reference_flops": reference[0],
        "reference_params": reference[1],
        "flops_after": flops_after,
        "params_after": params_after,
        "flops_fraction": flops_after / reference[0],
        "params_fraction": params_after / reference[1],
        "layers": rows,
    }


class BudgetGate:
    """Answers "would pruning ``energy`` of each layer's Σs² already meet the budget?".

    ``metric`` is "flops" or "params", ``target`` the fraction of ``reference`` (the original
    model's count) to reach. Built once on the full-rank SVD model (the layer costs and
    everything outside the SVD layers do not change during training); each call reads the
    current singular values only, so it is cheap enough to ask every few steps.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        metric: str,
        target: float,
        reference: int,
        *,
        energy: float = 0.01,
        merge_dense: bool = True,
    ) -> None:
        self.metric = check_metric(metric)
        self.energy = check_energy(energy)
        self.target = float(target)
        self.reference = reference
        self.merge_dense = merge_dense
        self.costs = svd_layer_costs(model, example_input)
        fixed_flops, fixed_params = _model_totals(model, example_input, self.costs)
        self.fixed = fixed_flops if metric == "flops" else fixed_params

    def fraction(self) -> float:
        """Fraction of the reference left after pruning ``energy`` (spectra as they are now)."""
        total = self.fixed
        for c in self.costs:
            with torch.no_grad():
                keep = energy_keep_count(c.layer.singular_values(), self.energy, c.fqn)
            total += c.final_cost(keep, self.metric, self.merge_dense)
        return total / self.reference

    def __call__(self) -> bool:
        return self.fraction() <= self.target


def merge_unprofitable(model: nn.Module, report: dict[str, Any]) -> list[str]:
    """Replace the SVD layers the pruning report marked "dense" by their dense equivalent."""
    merged = []
    named = dict(model.named_modules())
    for row in report["layers"]:
        if row["form"] == "dense" and isinstance(named.get(row["layer"]), SVDLayer):
            replace_module(model, row["layer"], named[row["layer"]].to_dense())
            merged.append(row["layer"])
    _refresh_plans(model)
    return merged


def compact_svd_layers(model: nn.Module) -> None:
    """Drop pruned singular values from the parameters of every SVD layer."""
    for _, layer in svd_layers(model):
        layer.compact()
    _refresh_plans(model)


def svd_to_lowrank(model: nn.Module) -> list[str]:
    """Replace every SVD layer by its truncated ``LowRankLinear``/``LowRankConv2d``."""
    converted = []
    for fqn, layer in svd_layers(model):
        replace_module(model, fqn, layer.to_lowrank())
        converted.append(fqn)
    _refresh_plans(model)
    return converted


def prune_and_merge(model: nn.Module, example_input: Any, **pruning: Any) -> dict:
    """Stage 2: :func:`prune_svd_model` (``pruning``: its keywords ``energy``, ``target``,
    ``reference``, ``merge_dense``), then merge back what does not pay (the survivors stay in
    SVD form, for fine-tuning or :func:`svd_to_lowrank`). Returns the pruning report."""
    report = prune_svd_model(model, example_input, **pruning)
    merge_unprofitable(model, report)
    return report


def finalize_svd_model(model: nn.Module, example_input: Any, **kwargs: Any) -> dict:
    """Stage 2 plus conversion, without fine-tuning: prune, merge what does not pay, convert the
    rest to low-rank layers (keywords of :func:`prune_and_merge`). Returns the pruning report."""
    report = prune_and_merge(model, example_input, **kwargs)
    svd_to_lowrank(model)
    return report


def _refresh_plans(model: nn.Module) -> None:
    plans = plans_of(model)
    if plans:
        set_plans(model, [refresh_plan(model, p) for p in plans])
