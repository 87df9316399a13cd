"""``plan()``: a short pipeline of named stages.

survey the model (one forward pass of a batch-1 example) → select layers → calibrate (optional:
statistics of real batches, streamed) → candidates (options per layer, errors in output space
when calibration is there) → choose (global budget allocator or per-layer rule) → assemble.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from tensorslim.analysis.calibration import (
    FISHER,
    GRAM,
    SENSITIVITY,
    LossFn,
    collect_statistics,
    has_input_rows,
)
from tensorslim.analysis.deployment import Deployment, require_backend
from tensorslim.analysis.timing import LatencyCache
from tensorslim.errors import TensorslimError
from tensorslim.facts import LayerStats
from tensorslim.fold import fold_batchnorm
from tensorslim.inputs import ForwardFn, batch_inputs
from tensorslim.methods.base import Method
from tensorslim.methods.planned import carry_factorizations
from tensorslim.methods.registry import get_method
from tensorslim.planner.apply import DEFAULT_CALIBRATION_BATCHES as DEFAULT_BATCHES
from tensorslim.planner.apply import attach_statistics
from tensorslim.planner.assemble import assemble_plan
from tensorslim.planner.candidates import Candidates, gather_candidates
from tensorslim.planner.choose import Choice, choose_options
from tensorslim.planner.latency import LatencySetting
from tensorslim.planner.layout_chains import fastest_chain_layout
from tensorslim.planner.memory_format import choose_in_fastest_format
from tensorslim.planner.records import CompressionPlan
from tensorslim.planner.sensitivity import weighted_choices
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
from tensorslim.train.losses import sampled_gaussian_loss

DEFAULT_CALIBRATION_BATCHES = DEFAULT_BATCHES
# plan(allow_slower=None) means this: structured layers measured slower than dense are refused
ALLOW_SLOWER_BY_DEFAULT = False


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
    deployment: Deployment | str | dict | None = None,
    allow_slower: bool | None = None,
    latency_cache: LatencyCache | None = None,
    fold_bn: bool = False,
    tied: str = "dense",
    objective: str | None = None,
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
    ``deployment``: the setting latencies are measured in (``Deployment(batch=8, threads=1,
    memory_format="channels_last", backend="onnxruntime")`` or ``"batch=8,threads=1"``; default:
    the example's batch size, ``torch.get_num_threads()``, eager, memory format "auto": a
    convolutional model is planned in NCHW and in channels_last and the layout of the faster
    compressed model kept, against the faster dense layout, see
    :mod:`tensorslim.planner.memory_format`; then one layout per chain of layers where the
    whole model measures faster so, :mod:`tensorslim.planner.layout_chains`; ``apply``
    returns the model in the layout kept). Under any budget a
    decomposition method's compressed layers are timed there against their dense form and an
    option measured slower is never chosen (the layer stays dense, its reason gives the times)
    unless ``allow_slower=True`` (``None``: :data:`ALLOW_SLOWER_BY_DEFAULT`, False); a
    FLOPs or params budget is then met where it buys measured time (least error per ms saved,
    see :mod:`tensorslim.planner.choose_measured`);
    ``objective`` ("latency" — the default —, "balanced" or "error"; or the budget's own,
    ``"flops=0.5,objective=error"``): what a timed FLOPs or params budget is met for: the least
    predicted time, the least error within a few per cent of it, or the least error (see
    :mod:`tensorslim.planner.choose_measured`; saved in ``plan.budget``).
    ``budget="latency=0.5"`` spends measured per-layer latency. ``latency_cache`` (a
    :class:`~tensorslim.analysis.timing.LatencyCache`, optionally on disk) reuses timings.
    ``fold_bn``: fold every BatchNorm that follows a conv into it first (:mod:`tensorslim.fold`;
    the plan records them and ``apply`` folds them again), so the dense baseline and the
    decomposed layers both run without them.
    ``settings`` are the method's own (e.g. ``scheme="spatial"``).
    """
    budget = Budget.coerce(budget)
    if objective is not None:
        if budget is None:
            raise TensorslimError(f"objective={objective!r} needs a budget (e.g. flops=0.5)")
        budget = budget.with_objective(objective)
    check_tied_mode(tied)
    folded: list[str] = []
    if fold_bn:
        model, folded = fold_batchnorm(model)
    chosen = _method(method, budget, settings)
    example = _example(example_input, calibration, forward_fn)
    where = Deployment.coerce(deployment, example)
    if budget is not None:
        require_backend(where)  # before any work: e.g. backend=compile without a C++ compiler
    survey = survey_model(model, example, forward_fn)
    ties = decide_ties(tied, survey.modules, survey.tied, survey.order, chosen.name)
    selected, reasons = select_layers(survey, layers, exclude, filter_fn, ties)
    stats = calibrate(
        model, chosen, survey, selected, calibration, calibration_batches, loss_fn, forward_fn,
        progress,
    )  # fmt: skip
    # a latency budget prices options once they are measured (planner.latency); FLOPs until then
    metric = budget.metric if budget is not None and budget.metric != "latency" else "flops"
    candidates = gather_candidates(chosen, survey, selected, stats, metric, progress)
    if stats and budget is not None and chosen.weighs_layers():
        candidates.choices = weighted_choices(candidates.choices, survey.modules, stats)
    slower = ALLOW_SLOWER_BY_DEFAULT if allow_slower is None else bool(allow_slower)
    setting = _latency_setting(chosen, budget, where, slower, latency_cache, forward_fn)
    choice = _choose(model, chosen, budget, candidates, survey, setting)
    record = _calibration_record(stats, calibration_batches) if stats else None
    result = assemble_plan(chosen, budget, survey, reasons, candidates, choice, record, ties)
    if stats:
        attach_statistics(result, stats)
    carry_factorizations(result, chosen)
    result.folded_batchnorm = folded
    return result


def _choose(
    model: nn.Module,
    method: Method,
    budget: Budget | None,
    candidates: Candidates,
    survey: ModelSurvey,
    setting: LatencySetting | None,
) -> Choice:
    """Allocate: by measured latency when the plan times layers under a budget (``setting``
    from :func:`_latency_setting`), else by the budget's metric or the method's own rule."""
    if setting is not None and budget is not None:
        choice = choose_in_fastest_format(model, method, budget, candidates, survey, setting)[0]
        return fastest_chain_layout(model, method, survey, choice, setting)
    totals = {"flops": survey.model_flops, "params": survey.model_params}
    return choose_options(method, budget, candidates, survey.infos, totals)


def _latency_setting(
    method: Method,
    budget: Budget | None,
    deployment: Deployment,
    allow_slower: bool,
    cache: LatencyCache | None,
    forward_fn: ForwardFn | None,
) -> LatencySetting | None:
    """How this plan measures latency, or ``None`` when it does not measure at all."""
    if budget is None or method.kind == "training":
        return None
    if allow_slower and budget.metric != "latency":
        return None
    return LatencySetting(
        deployment=deployment,
        cache=cache if cache is not None else LatencyCache(),
        allow_slower=allow_slower,
        forward_fn=forward_fn,
    )


def _method(name: str, budget: Budget | None, settings: dict[str, Any]) -> Method:
    method = get_method(name, **settings)
    if budget is not None and budget.metric == "latency" and method.kind == "training":
        raise TensorslimError(
            f"method '{name}' reaches its structure in training: a latency budget needs a "
            "decomposition method (svd, tucker, cp, debut, tt)"
        )
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
    measured in output space; a method that weighs layers (``Method.weighs_layers``) also gets
    each layer's output sensitivity, from ``loss_fn`` or, without one, the label-free
    sampled-Gaussian loss of the model's output.
    """
    if calibration is None or not selected:
        return None
    needs = set(method.calibration_needs)
    if method.kind != "training":
        needs.add(GRAM)
    if method.weighs_layers():
        needs.add(SENSITIVITY)
        if loss_fn is None and FISHER not in needs:  # the Fisher's loss is the caller's choice
            loss_fn = sampled_gaussian_loss()
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
