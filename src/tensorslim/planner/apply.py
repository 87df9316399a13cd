"""Applying a plan: swap a model's layers, and keep the plans that describe its structure.

``apply(model, plan)`` builds every planned layer with its method and replaces it wherever it is
referenced. ``refresh_plan`` reads back a structure that changed after planning (SVD training
converted to low rank, a layer merged back to dense).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn

from tensorslim.analysis.calibration import GRAM, LossFn, collect_statistics
from tensorslim.analysis.flops import dense_layer_flops
from tensorslim.analysis.profile import COMPRESSIBLE, count_params
from tensorslim.errors import TensorslimError
from tensorslim.facts import LayerStats
from tensorslim.fold import fold_batchnorm
from tensorslim.inputs import ForwardFn
from tensorslim.layers.base import StructuredLayer
from tensorslim.layout import planned_layout, to_layout
from tensorslim.methods.registry import builder_of
from tensorslim.planner.fastpath import keep_compressed_layers_unfused
from tensorslim.planner.records import CompressionPlan
from tensorslim.planner.ties import TIED_TO, check_growth, share_followers, shared_parameters
from tensorslim.surgery import replace_modules_at

PLANS_ATTRIBUTE = "_tensorslim_plans"
STATISTICS_ATTRIBUTE = "_tensorslim_statistics"
# batches a plan without a calibration record is applied with (the planner's default)
DEFAULT_CALIBRATION_BATCHES = 16


def apply(
    model: nn.Module,
    plan: CompressionPlan,
    *,
    init: bool = True,
    inplace: bool = False,
    calibration: Iterable | None = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
) -> nn.Module:
    """Swap the planned layers of ``model`` (a deep copy unless ``inplace``).

    ``init=True`` fills the new layers from the decomposition of the dense weights;
    ``init=False`` builds only the structure (``load`` then reads the saved weights).
    Data-aware methods (ASVD, SVD-LLM, FWSVD) build from calibration statistics: those of the
    plan when it was made in this process, else collected now from ``calibration`` (as many
    batches as the plan used; ``loss_fn`` for the Fisher diagonal).
    A tie's followers take their leader's new structure (:func:`share_followers`). A plan that
    would leave the model with more parameters than before is refused when it unties a weight
    (the other holders would keep the dense copy) and warned about otherwise, naming the layers.
    A plan made with ``fold_bn=True`` first folds the same BatchNorms into their convs.
    The model is returned in the memory layout the plan measured (``plan.latency``: the
    chosen format, or one per chain; see :mod:`tensorslim.layout`).
    """
    target = model if inplace else copy.deepcopy(model)
    if plan.folded_batchnorm:
        fold_batchnorm(target, inplace=True, only=plan.folded_batchnorm)
    plan.validate(target)
    before, tied = count_params(target), shared_parameters(target)
    stats = _build_statistics(target, plan, init, calibration, loss_fn, forward_fn)
    built: dict[str, nn.Module] = {}
    for lp in plan.compressed_layers:
        if TIED_TO in lp.config:
            continue  # built after its leader, by share_followers
        method = plan.method_for(lp)
        module = target.get_submodule(lp.fqn)
        extra = {"stats": stats[lp.fqn]} if lp.fqn in stats else {}
        try:
            new = method.build(module, lp.config, lp.info(), init=init, **extra)
        except TensorslimError as exc:
            raise TensorslimError(f"layer {lp.fqn}: {exc}") from None
        if new is not module:
            built[lp.fqn] = new
    replace_modules_at(target, built)  # one walk of the model, not one per layer
    share_followers(target, plan)
    keep_compressed_layers_unfused(target)  # torch's fused encoder path reads dense weights
    layout = planned_layout(plan.latency)
    if layout is not None:  # after the swaps: the new layers' weights too
        to_layout(target, layout)
    # loading rebuilds a saved structure as it is: its growth was checked when it was applied
    check_growth(target, plan, before, tied, check=init)
    set_plans(target, [*plans_of(model if not inplace else target), plan])
    return target


def attach_statistics(plan: CompressionPlan, stats: dict[str, LayerStats]) -> None:
    """Keep the statistics of the layers whose method builds from data with ``plan`` (in
    memory only: never serialised), so ``apply`` in this process needs no second pass."""
    needed = _layers_needing_statistics(plan)
    object.__setattr__(plan, STATISTICS_ATTRIBUTE, {f: stats[f] for f in needed if f in stats})


def _layers_needing_statistics(plan: CompressionPlan) -> list[str]:
    return [
        lp.fqn for lp in plan.compressed_layers if plan.method_for(lp).needs_statistics_to_build
    ]


def _build_statistics(
    target: nn.Module,
    plan: CompressionPlan,
    init: bool,
    calibration: Iterable | None,
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
) -> dict[str, LayerStats]:
    """fqn → statistics for every layer whose method builds from data (empty if none)."""
    needed = _layers_needing_statistics(plan) if init else []
    if not needed:
        return {}
    kept = getattr(plan, STATISTICS_ATTRIBUTE, {})
    if calibration is None and all(f in kept for f in needed):
        return kept
    if calibration is None:
        methods = sorted({plan.layer(f).method or "" for f in needed})
        raise TensorslimError(
            f"method(s) {', '.join(methods)} build from calibration statistics and this plan "
            "carries none (it was loaded from a file): pass calibration= (and loss_fn= for "
            "fwsvd) to apply"
        )
    needs = {GRAM}
    for fqn in needed:
        needs |= plan.method_for(plan.layer(fqn)).calibration_needs
    batches = (plan.calibration or {}).get("batches", DEFAULT_CALIBRATION_BATCHES)
    layers = {fqn: target.get_submodule(fqn) for fqn in needed}
    return collect_statistics(
        target, calibration, layers, needs, batches=batches, loss_fn=loss_fn,
        forward_fn=forward_fn, progress=False,
    )  # fmt: skip


def plans_of(model: nn.Module) -> list[CompressionPlan]:
    """The plans applied to ``model`` so far, in order."""
    return list(getattr(model, PLANS_ATTRIBUTE, []))


def set_plans(model: nn.Module, plans: list[CompressionPlan]) -> None:
    """Record the plans that describe ``model``'s structure (saved by ``tensorslim.save``)."""
    object.__setattr__(model, PLANS_ATTRIBUTE, list(plans))


def _short_label(method: str, module: nn.Module, limit: int = 60) -> str:
    """A table-sized label for a layer's structure: the method and the layer's own summary."""
    text = f"{method}: {module.extra_repr()}" if module.extra_repr() else method
    return text if len(text) <= limit else text[: limit - 1] + "…"


def refresh_plan(model: nn.Module, plan: CompressionPlan) -> CompressionPlan:
    """The plan updated to the structure ``model`` has now (after training-time conversions).

    A layer whose module became another structured layer takes that layer's method and config;
    one that became plain dense again is marked dense.
    """
    fresh = copy.deepcopy(plan)
    named = dict(model.named_modules())
    for lp in fresh.layers:
        module = named.get(lp.fqn)
        if module is None or lp.method is None or TIED_TO in lp.config:
            continue  # a follower keeps its tie: its structure is its leader's
        if isinstance(module, StructuredLayer):
            # the layer's own method keeps it when it builds this type; otherwise the layer
            # changed hands (SVD training's SVDConv2d became the svd method's LowRankConv2d)
            method = builder_of(module, prefer=lp.method)
            # a plan config may hold keys the layer does not report (a Linear's "scheme"):
            # only a reported value that differs means the structure changed
            changed = any(lp.config.get(k) != v for k, v in module.config().items())
            if method is not None and (method != lp.method or changed):
                lp.method, lp.config = method, module.config()
                lp.label = _short_label(method, module)
                fresh.methods.setdefault(method, {})
                # the planned cost no longer describes this structure: state the new one
                lp.params_after = module.analytic_params()
                if lp.input_shape:
                    calls = int(lp.extra.get("calls", 1))
                    shape, others = tuple(lp.input_shape), lp.info().other_shapes
                    lp.flops_after = dense_layer_flops(module, shape, others) * calls
            continue
        if isinstance(module, COMPRESSIBLE) and not getattr(module, "parametrizations", None):
            lp.extra["finalized_from"] = lp.method
            lp.method, lp.config, lp.reason = None, {}, f"finalized to dense after {lp.method}"
            lp.label = "dense"
            lp.params_after, lp.flops_after = lp.params_before, lp.flops_before
    return fresh
