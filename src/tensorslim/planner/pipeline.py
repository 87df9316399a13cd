"""``plan()``: a short pipeline of named stages.

survey the model (one forward pass of a batch-1 example) → select layers → calibrate (optional:
statistics of real batches, streamed) → candidates (options per layer, errors in output space
when calibration is there) → choose (global budget allocator or per-layer rule) → assemble.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from tensorslim.analysis.calibration import GRAM, LossFn, collect_statistics, has_input_rows
from tensorslim.errors import TensorslimError
from tensorslim.facts import LayerStats
from tensorslim.inputs import ForwardFn, batch_inputs
from tensorslim.methods.base import Method
from tensorslim.methods.planned import carry_factorizations
from tensorslim.methods.registry import get_method
from tensorslim.planner.apply import DEFAULT_CALIBRATION_BATCHES as DEFAULT_BATCHES
from tensorslim.planner.apply import attach_statistics
from tensorslim.planner.assemble import assemble_plan
from tensorslim.planner.candidates import gather_candidates
from tensorslim.planner.choose import choose_options
from tensorslim.planner.records import CompressionPlan
from tensorslim.planner.survey import (
    NEVER_CALLED,
    NOT_SELECTED,
    ModelSurvey,
    is_selected,
    resolve_names,
    survey_model,
    weight_read_reason,
)
from tensorslim.planner.ties import TiePlan, check_tied_mode, decide_ties
from tensorslim.rank.budget import Budget
from tensorslim.surgery import FilterFn

DEFAULT_CALIBRATION_BATCHES = DEFAULT_BATCHES


def plan(
    model: nn.Module,
    method: str = "svd",
    budget: Budget | str | dict | None = None,
    example_input: Any = None,
    *,
    filter_fn: FilterFn | None = None,
    layers: list[str] | None = None,
    exclude: list[str] | None = None,
    calibration: Iterable | None = None,
    calibration_batches: int = DEFAULT_CALIBRATION_BATCHES,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    progress: bool = False,
    tied: str = "dense",
    **settings: Any,
) -> CompressionPlan:
    """Compute a compression plan for ``model``.

    ``example_input``: one input of the model — a tensor, a tuple of tensors (positional), a
    mapping (keyword tensors, e.g. a tokenizer's ``BatchEncoding``) or ``tensorslim.Inputs``;
    only its first sample is used. With ``forward_fn(model, example)`` it may be anything.
    Without it, the first ``calibration`` batch's inputs are used.
    ``budget``: ``Budget(flops=0.5)`` / ``"flops=0.5"`` / ``{"params": 0.1}``, a fraction of the
    whole model; without it the method's per-layer rule decides (e.g. ``rank=8``, ``energy=0.9``).
    ``filter_fn(module, fqn)``, ``layers`` (fqns) and ``exclude`` (fqns) choose the layers.
    ``calibration``: a loader of real batches; the first ``calibration_batches`` are run once to
    collect what the method needs (and input Grams, so errors are measured in output space).
    ``loss_fn(output, batch)`` is needed by methods that use the Fisher diagonal.
    ``tied``: layers whose weight another module also holds (an LM head tied to its
    embedding) stay dense with ``"dense"``; ``"share"`` compresses them where the tie can be
    kept exactly (see :mod:`tensorslim.planner.ties`). A plan never unties a weight.
    ``settings`` are the method's own (e.g. ``scheme="spatial"``).
    """
    budget = Budget.coerce(budget)
    check_tied_mode(tied)
    chosen = _method(method, budget, settings)
    example = _example(example_input, calibration, forward_fn)
    survey = survey_model(model, example, forward_fn)
    ties = decide_ties(tied, survey.modules, survey.tied, survey.order, chosen.name)
    selected, reasons = select_layers(survey, layers, exclude, filter_fn, ties)
    stats = calibrate(
        model,
        chosen,
        survey,
        selected,
        calibration,
        calibration_batches,
        loss_fn,
        forward_fn,
        progress,
    )
    metric = budget.metric if budget is not None else "flops"
    candidates = gather_candidates(chosen, survey, selected, stats, metric, progress)
    totals = {"flops": survey.model_flops, "params": survey.model_params}
    choice = choose_options(chosen, budget, candidates, survey.infos, totals)
    record = _calibration_record(stats, calibration_batches) if stats else None
    result = assemble_plan(chosen, budget, survey, reasons, candidates, choice, record, ties)
    if stats:
        attach_statistics(result, stats)
    carry_factorizations(result, chosen)
    return result


def _method(name: str, budget: Budget | None, settings: dict[str, Any]) -> Method:
    method = get_method(name, **settings)
    if budget is not None and method.kind == "training":
        # training methods reach the budget during training; let the plan say where they aim
        method = method.with_budget(budget)
    return method


def _example(example_input: Any, calibration: Iterable | None, forward_fn: ForwardFn | None):
    if example_input is not None:
        return example_input
    if calibration is None:
        raise TensorslimError(
            "plan() needs example_input (one batch of input of the right shape) or calibration="
        )
    first = next(iter(calibration), None)
    if first is None:
        raise TensorslimError("the calibration loader yielded no batch")
    return first if forward_fn is not None else batch_inputs(first)


def select_layers(
    survey: ModelSurvey,
    layers: list[str] | None,
    exclude: list[str] | None,
    filter_fn: FilterFn | None,
    ties: TiePlan | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The layers to offer the method, and why each of the others stays dense.

    A tie's followers are never offered (they take their leader's structure when it is
    compressed); a layer whose tie cannot be kept stays dense with ``ties.dense``'s reason.
    """
    ties = ties or TiePlan()
    wanted = resolve_names(survey, layers, "layers")
    excluded = resolve_names(survey, exclude, "exclude")
    selected: list[str] = []
    reasons: dict[str, str] = {}
    for fqn in survey.order:
        if fqn in survey.never_called:
            reasons[fqn] = NEVER_CALLED
        elif fqn in survey.weight_readers:
            reasons[fqn] = weight_read_reason(survey.weight_readers[fqn])
        elif fqn in ties.dense:
            reasons[fqn] = ties.dense[fqn]
        elif fqn in ties.leader_of:
            reasons[fqn] = f"weight tied with {ties.leader_of[fqn]}, which stays dense"
        elif is_selected(survey, fqn, wanted, excluded, filter_fn):
            selected.append(fqn)
        else:
            reasons[fqn] = NOT_SELECTED
    return selected, reasons


def calibrate(
    model: nn.Module,
    method: Method,
    survey: ModelSurvey,
    selected: list[str],
    calibration: Iterable | None,
    batches: int,
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
    progress: bool,
) -> dict[str, LayerStats] | None:
    """Statistics of the selected layers' inputs over ``batches`` calibration batches.

    A decomposition method also gets each layer's input Gram, so candidates' errors are
    measured in output space.
    """
    if calibration is None or not selected:
        return None
    needs = set(method.calibration_needs)
    if method.kind != "training":
        needs.add(GRAM)
    if not needs:
        return None
    # attention and recurrent layers have no single input Gram: their errors stay in weight space
    layers = {fqn: survey.modules[fqn] for fqn in selected if has_input_rows(survey.modules[fqn])}
    if not layers:
        return None
    return collect_statistics(
        model,
        calibration,
        layers,
        needs,
        batches=batches,
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        progress=progress,
    )


def _calibration_record(stats: dict[str, LayerStats], requested: int) -> dict[str, Any]:
    first = next(iter(stats.values()))
    return {"batches": first.batches, "requested_batches": requested}
