"""Applying a plan: swap a model's layers, and keep the plans that describe its structure.

``apply(model, plan)`` builds every planned layer with its method and replaces it wherever it is
referenced. ``refresh_plan`` reads back a structure that changed after planning (SVD training
converted to low rank, a layer merged back to dense).
"""

from __future__ import annotations

import copy

from torch import nn

from tensorslim.analysis.profile import COMPRESSIBLE
from tensorslim.errors import TensorslimError
from tensorslim.fold import fold_batchnorm
from tensorslim.layers.base import StructuredLayer
from tensorslim.methods.registry import builder_of
from tensorslim.planner.records import CompressionPlan
from tensorslim.surgery import replace_module

PLANS_ATTRIBUTE = "_tensorslim_plans"


def apply(
    model: nn.Module, plan: CompressionPlan, *, init: bool = True, inplace: bool = False
) -> nn.Module:
    """Swap the planned layers of ``model`` (a deep copy unless ``inplace``).

    ``init=True`` fills the new layers from the decomposition of the dense weights;
    ``init=False`` builds only the structure (``load`` then reads the saved weights). A plan
    made with ``fold_bn=True`` first folds the same BatchNorms into their convs.
    """
    target = model if inplace else copy.deepcopy(model)
    if plan.folded_batchnorm:
        fold_batchnorm(target, inplace=True, only=plan.folded_batchnorm)
    plan.validate(target)
    for lp in plan.compressed_layers:
        method = plan.method_for(lp)
        module = target.get_submodule(lp.fqn)
        try:
            new = method.build(module, lp.config, lp.info(), init=init)
        except TensorslimError as exc:
            raise TensorslimError(f"layer {lp.fqn}: {exc}") from None
        if new is not module:
            replace_module(target, lp.fqn, new)
    set_plans(target, [*plans_of(model if not inplace else target), plan])
    return target


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
        if module is None or lp.method is None:
            continue
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
                    lp.flops_after = module.analytic_flops(tuple(lp.input_shape)) * calls
            continue
        if isinstance(module, COMPRESSIBLE) and not getattr(module, "parametrizations", None):
            lp.extra["finalized_from"] = lp.method
            lp.method, lp.config, lp.reason = None, {}, f"finalized to dense after {lp.method}"
            lp.label = "dense"
            lp.params_after, lp.flops_after = lp.params_before, lp.flops_before
    return fresh
