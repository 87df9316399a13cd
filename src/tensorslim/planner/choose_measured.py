"""Planning stage 4 with measurements: a latency budget, and the never-slower rule.

- ``Budget(latency=f)``: every layer's :func:`~tensorslim.planner.latency.spread` options are
  timed against the dense layer; the allocator spends measured milliseconds to bring the
  predicted model latency (the whole dense model's measured time minus the layers' measured
  savings) to f of the dense model's.
- Any other budget (FLOPs, params): every layer's spread options are timed too, options
  measured slower than the dense layer are dropped (never slower), and the budget is met for
  its ``objective`` (:attr:`~tensorslim.rank.budget.Budget.objective`). The allocator walks
  each layer's (measured ms, error²) hull, taking the step with the least error per ms saved,
  until the FLOPs (params) need is met, and repeats the walk on ms/FLOPs blends and on FLOPs
  alone (:func:`~tensorslim.rank.allocate.allocate` with ``spend="latency"``); of those walks

  - ``"latency"`` (the default: users compress for speed) keeps the one of least predicted ms
    (``bench/results/objective``: ResNet-18 b1 svd ``flops=0.5`` measured 1.47× against
    balanced 1.36× and error 1.27×, for a Σ error² 4 % above the least);
  - ``"error"`` the one of least Σ error²;
  - ``"balanced"`` the least-error one among those predicted within
    :data:`BALANCED_TOLERANCE` × the dense timed layers' ms of the fastest.

  The least-time and least-error allocations of the same budget are recorded beside the chosen
  one (``latency["least_time"]``, ``latency["least_error"]``: predicted layer-sum ms and
  Σ error²), so each objective's price is stated. ``allow_slower=True`` skips all timing: the
  least-error allocation in FLOPs.
- Only the options the budget can take are timed (:func:`usable`): cheaper than dense in a
  FLOPs or params budget's metric, no costlier than dense in a capped metric.

Layers of one signature are timed once (:func:`~tensorslim.planner.latency.measure_layers`).
The plan's predicted latency is the planned structure timed against the dense model in context
(:mod:`tensorslim.planner.in_context`); a latency target that measurement misses is
re-allocated with the layers' savings rescaled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tensorslim.facts import Option
from tensorslim.methods.base import Method
from tensorslim.planner.candidates import Candidates
from tensorslim.planner.choose import Choice, by_budget, by_budget_each
from tensorslim.planner.in_context import (
    TOLERANCE,
    InContext,
    Tried,
    calibrated,
    measure_in_context,
)
from tensorslim.planner.latency import (
    LatencySetting,
    dense_model_ms,
    faster_only,
    latency_record,
    measure_all,
    predicted_fraction,
)
from tensorslim.planner.survey import ModelSurvey
from tensorslim.rank.allocate import LayerChoices, option_cost
from tensorslim.rank.budget import Budget

DEFAULT_OBJECTIVE = "latency"  # a FLOPs/params budget's objective when the budget names none
# "balanced": plans predicted slower than the fastest by at most this fraction of the dense
# timed layers' ms are acceptable, and the least-error one of them is kept
BALANCED_TOLERANCE = 0.05


def choose_measured(
    model: nn.Module,
    method: Method,
    budget: Budget,
    candidates: Candidates,
    survey: ModelSurvey,
    setting: LatencySetting,
    dense_scale: float = 1.0,
) -> Choice:
    """One option per layer under ``budget`` with every compressed layer measured.

    ``dense_scale``: the dense model a latency budget is a fraction of, relative to the dense
    model in ``setting`` (≤ 1; "auto" passes the faster layout's dense ms over this layout's,
    see :mod:`tensorslim.planner.memory_format`).
    """
    if budget.metric != "latency":
        allocated = allocate_measured(method, budget, candidates, survey, setting)
        context = measure_in_context(model, method, survey, setting, allocated.choice.picked)
        return finish_measured(budget, setting, allocated, context)
    totals = _totals(survey)
    layers = _measured(method, survey, candidates.choices, setting, budget)

    def in_context(picked: dict[str, Option | None]) -> InContext:
        return measure_in_context(model, method, survey, setting, picked)

    totals["latency"] = dense_model_ms(model, survey, setting)
    here = _in_this_layout(budget, dense_scale)
    choice, context = _latency_choice(here, _with(candidates, layers), totals, in_context)
    _record(choice, layers, setting, context)
    return choice


@dataclass
class Allocated:
    """A FLOPs or params budget's allocation over measured options (``choice``), before its
    planned structure is timed in context; ``layers`` / ``timed``: the measured options (the
    slower ones dropped), ``totals``: the model's FLOPs and params."""

    choice: Choice
    layers: list[LayerChoices]
    timed: Candidates
    totals: dict[str, float]
    # the least-time and least-error allocations of the same budget, for the record
    others: dict[str, dict[str, Option | None]] = dataclasses.field(default_factory=dict)


def allocate_measured(
    method: Method,
    budget: Budget,
    candidates: Candidates,
    survey: ModelSurvey,
    setting: LatencySetting,
) -> Allocated:
    """Stage one of a FLOPs or params budget: the options measured, the budget met where it
    buys time (least error per measured ms saved). :func:`finish_measured` records it once its
    planned structure is timed (one run for several layouts, see
    :mod:`tensorslim.planner.memory_format`)."""
    totals = _totals(survey)
    layers = _measured(method, survey, candidates.choices, setting, budget)
    timed = _with(candidates, layers)
    objective = budget.objective or DEFAULT_OBJECTIVE
    objectives = (objective, *OTHERS.values())
    chosen, *others = for_objectives(budget, timed, totals, objectives)
    picks = {name: c.picked for name, c in zip(OTHERS, others, strict=True)}
    return Allocated(chosen, layers, timed, totals, picks)


# the allocations a plan records beside its own: record name → objective
OTHERS = {"least_time": "latency", "least_error": "error"}


def for_objectives(
    budget: Budget, candidates: Candidates, totals: dict[str, float], objectives: tuple[str, ...]
) -> list[Choice]:
    """The allocation of a FLOPs or params ``budget`` over measured options for each of
    ``objectives`` (module docstring; the allocator's walks made once): of the walks meeting
    the budget, the fastest ("latency"), the least error ("error") or the least error within a
    slack of :data:`BALANCED_TOLERANCE` × the dense timed layers' ms of the fastest
    ("balanced")."""
    dense_ms = sum(c.dense("latency") for c in candidates.choices if c.options)
    slack = {"latency": 0.0, "error": math.inf, "balanced": BALANCED_TOLERANCE * dense_ms}
    slacks = tuple(slack[o] for o in objectives)
    return by_budget_each(budget, candidates, totals, slacks, spend="latency")


ALLOCATIONS = {
    "latency": "least predicted time meeting the budget (least error per measured ms saved)",
    "error": "least error meeting the budget (of the allocator's walks, over the options "
    "measured faster than dense)",
    "balanced": (
        f"least error among the plans predicted within {BALANCED_TOLERANCE:.0%} of the dense "
        "timed layers' time of the fastest meeting the budget"
    ),
}


def finish_measured(
    budget: Budget, setting: LatencySetting, allocated: Allocated, context: InContext
) -> Choice:
    """The allocation's choice with its latency record (``context``: its planned structure
    timed against the dense model) and the least-error allocation of the same budget beside
    it, its price in error stated."""
    choice, layers = allocated.choice, allocated.layers
    _record(choice, layers, setting, context)
    assert choice.latency is not None
    objective = budget.objective or DEFAULT_OBJECTIVE
    choice.latency["objective"] = objective
    choice.latency["allocation"] = ALLOCATIONS[objective]
    choice.latency["error_sq"] = error_sq_of(choice.picked)
    for name, picked in allocated.others.items():
        choice.latency[name] = {
            "layer_sum_ms": context.dense_ms * predicted_fraction(layers, picked, context.dense_ms),
            "error_sq": error_sq_of(picked),
        }
    return choice


def _record(
    choice: Choice, layers: list[LayerChoices], setting: LatencySetting, context: InContext
) -> None:
    """``choice`` gains the measurements, its latency record, and the reason of every layer
    kept dense because each of its measured options was slower."""
    for layer in layers:
        measured = layer.fqn in setting.measured
        if measured and not layer.options and choice.picked.get(layer.fqn) is None:
            choice.reasons[layer.fqn] = (
                "kept dense: every measured option is slower than the dense layer "
                f"({setting.describe(layer.fqn)})"
            )
    choice.measured = setting.measured
    choice.latency = latency_record(setting, context, choice.picked)


def _totals(survey: ModelSurvey) -> dict[str, float]:
    return {"flops": survey.model_flops, "params": survey.model_params}


def _latency_choice(
    budget: Budget,
    candidates: Candidates,
    totals: dict[str, float],
    in_context: Callable[[dict[str, Option | None]], InContext],
) -> tuple[Choice, InContext]:
    """Allocate measured ms for ``budget``, checked in context and re-allocated when the
    planned structure misses the target (:func:`~tensorslim.planner.in_context.calibrated`)."""
    choices: dict[float, Choice] = {}

    def allocate(target: float) -> tuple[dict[str, Option | None], float]:
        choice = by_budget(dataclasses.replace(budget, latency=target), candidates, totals)
        choices[target] = choice
        layer_sum = predicted_fraction(candidates.choices, choice.picked, totals["latency"])
        return choice.picked, layer_sum

    (ask, _, timed), tried = calibrated(allocate, budget.fraction, in_context)
    if timed.fraction >= 1.0:  # never slower: no allocation tried beat the dense model
        return _kept_dense(budget, candidates, tried), InContext(timed.dense_ms, timed.dense_ms)
    choice = choices[ask]
    # by_budget's notes speak of the layer-sum target it was given: restated for the budget
    choice.notes = [n for n in choice.notes if not n.startswith("budget latency=")]
    note = _reachable_note(budget, candidates.choices, totals["latency"])
    if note and timed.fraction > budget.fraction * (1 + TOLERANCE):  # (the layer sum's figure)
        choice.notes.append(note)
    if ask != budget.fraction:
        choice.notes.append(
            f"budget {budget}: the allocation for it measured {tried[0][2].fraction:.3f} of the "
            f"dense model in context; re-allocated for a layer-sum {ask:.3f}, which measured "
            f"{timed.fraction:.3f}"
        )
    if timed.fraction > budget.fraction * (1 + TOLERANCE):
        choice.notes.append(
            f"budget {budget} is missed in context: the planned structure measured "
            f"{timed.fraction:.3f} of the dense model"
        )
    return choice, timed


def _kept_dense(budget: Budget, candidates: Candidates, tried: list[Tried]) -> Choice:
    """Every layer dense: each allocation tried for a latency ``budget`` measured no faster
    than the dense model in context (its layers' savings lost to the model around them)."""
    fractions = ", ".join(f"{t[2].fraction:.3f}" for t in tried)
    reason = (
        f"kept dense: every plan tried for {budget} measured slower than the dense model in "
        f"context ({fractions} of it)"
    )
    return Choice(
        picked={c.fqn: None for c in candidates.choices},
        reasons={c.fqn: reason for c in candidates.choices},
        notes=[f"budget {budget}: {reason.removeprefix('kept dense: ')}; the model stays dense"],
    )


def _in_this_layout(budget: Budget, dense_scale: float) -> Budget:
    """The latency budget as a fraction of this layout's dense model: f · dense_scale."""
    if dense_scale >= 1.0:
        return budget
    return dataclasses.replace(budget, latency=budget.fraction * dense_scale)


def _measured(
    method: Method,
    survey: ModelSurvey,
    layers: list[LayerChoices],
    setting: LatencySetting,
    budget: Budget,
) -> list[LayerChoices]:
    """Every layer that has options the budget can take (:func:`usable`) with them timed (see
    :func:`~tensorslim.planner.latency.measure_all`) and the slower ones dropped (in order).

    The options are narrowed to the usable ones *before* the few to time are spread over them:
    spread over all of them, a TT layer's timed points landed on ranks whose FLOPs exceed the
    dense layer's (dropped by the FLOPs cap of a params budget), leaving rank 1-1 as the only
    option — small_cnn's hidden Linear at weight error 0.998, every ReLU after it off.
    """
    usable_layers = [usable(c, budget) for c in layers]
    offered = [c for c in usable_layers if c.options]
    measured = measure_all(method, survey, offered, setting, budget.metric)
    timed = iter(faster_only(c) for c in measured)
    return [next(timed) if c.options else c for c in usable_layers]


def usable(layer: LayerChoices, budget: Budget) -> LayerChoices:
    """The layer with only the options the allocator can take under ``budget``: cheaper than
    dense in a FLOPs or params budget's metric, and no costlier than dense in a metric capped
    at ≤ 1.0 (the allocator drops those, see :func:`~tensorslim.rank.allocate.allocate`)."""
    limits = {m: layer.dense(m) for m, cap in budget.caps.items() if cap <= 1.0}
    metric = budget.metric
    kept = [
        o
        for o in layer.options
        if all(option_cost(o, m) <= limit for m, limit in limits.items())
        and (metric == "latency" or option_cost(o, metric) < layer.dense(metric))
    ]
    return dataclasses.replace(layer, options=kept)


def error_sq_of(picked: dict[str, Option | None]) -> float:
    """Σ over layers of the chosen option's error² (the allocator's objective)."""
    return sum(float(o.error) ** 2 for o in picked.values() if o is not None)


def _with(candidates: Candidates, layers: list[LayerChoices]) -> Candidates:
    return dataclasses.replace(candidates, choices=layers)


def _reachable_note(budget: Budget, layers: list[LayerChoices], model_ms: float) -> str | None:
    """When the latency target is missed: the best latency reachable, from the measurements."""
    best_saving = 0.0
    for c in layers:
        dense = c.dense("latency")
        best_saving += dense - min((float(o.latency or dense) for o in c.options), default=dense)
    best = (model_ms - best_saving) / model_ms if model_ms > 0 else 1.0
    if best <= budget.fraction + 1e-9:
        return None
    rest = model_ms - sum(c.dense("latency") for c in layers)
    # layers timed alone can sum to more than the model (a compiled model, its layers eager)
    where = (
        f"the rest of the model takes {rest:.3g} ms"
        if rest >= 0
        else f"its layers timed alone sum to {model_ms - rest:.3g} ms"
    )
    return (
        f"budget {budget} is not reachable: the fastest measured option of every layer gives a "
        f"predicted {best:.3f} of the dense model's {model_ms:.3g} ms ({where})"
    )
