"""Planning stage 4 with measurements: a latency budget, and the never-slower rule.

- ``Budget(latency=f)``: every layer's :func:`~tensorslim.planner.latency.spread` options are
  timed against the dense layer; the allocator spends measured milliseconds to bring the
  predicted model latency (the whole dense model's measured time minus the layers' measured
  savings) to f of the dense model's.
- Any other budget: the allocator chooses in FLOPs or parameters as before, then every layer it
  compressed with an unmeasured option is timed (that option and a spread of the others); options
  measured slower than the dense layer are dropped and the allocation is repeated until every
  compressed layer is measured faster than its dense form. Each layer is timed at most once.
  ``allow_slower=True`` skips this (and all timing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from tensorslim.facts import Option
from tensorslim.methods.base import Method
from tensorslim.planner.candidates import Candidates
from tensorslim.planner.choose import Choice, by_budget
from tensorslim.planner.in_context import TOLERANCE, InContext, calibrated, measure_in_context
from tensorslim.planner.latency import (
    LatencySetting,
    dense_model_ms,
    faster_only,
    latency_record,
    measure_all,
    measure_layers,
    near,
    predicted_fraction,
    without_slower,
)
from tensorslim.planner.survey import ModelSurvey
from tensorslim.rank.allocate import LayerChoices
from tensorslim.rank.budget import Budget


def choose_measured(
    model: nn.Module,
    method: Method,
    budget: Budget,
    candidates: Candidates,
    survey: ModelSurvey,
    setting: LatencySetting,
) -> Choice:
    """One option per layer under ``budget`` with every compressed layer measured."""
    totals = {"flops": survey.model_flops, "params": survey.model_params}

    def in_context(picked: dict[str, Option | None]) -> InContext:
        return measure_in_context(model, method, survey, setting, picked)

    if budget.metric == "latency":
        model_ms = dense_model_ms(model, survey, setting)
        layers = [faster_only(c) for c in measure_all(method, survey, candidates.choices, setting)]
        measured_totals = {**totals, "latency": model_ms}
        choice, timed = _latency_choice(
            budget, _with(candidates, layers), measured_totals, in_context
        )
    else:
        choice, layers = _never_slower(method, budget, candidates, survey, setting, totals)
        timed = in_context(choice.picked)
    for layer in layers:
        measured_any = any(o.latency is not None for o in layer.options)
        if layer.fqn in setting.measured and not measured_any and choice.picked[layer.fqn] is None:
            choice.reasons[layer.fqn] = (
                "kept dense: every measured option is slower than the dense layer "
                f"({setting.describe(layer.fqn)})"
            )
    choice.measured = setting.measured
    choice.latency = latency_record(setting, timed, choice.picked)
    return choice


def _with(candidates: Candidates, layers: list[LayerChoices]) -> Candidates:
    return dataclasses.replace(candidates, choices=layers)


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
        return choice.picked, predicted_fraction(
            candidates.choices, choice.picked, totals["latency"]
        )

    (ask, _, timed), tried = calibrated(allocate, budget.fraction, in_context)
    choice = choices[ask]
    # by_budget's notes speak of the layer-sum target it was given: restated for the budget
    choice.notes = [n for n in choice.notes if not n.startswith("budget latency=")]
    note = _reachable_note(budget, candidates.choices, totals["latency"])
    if note:
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


def _never_slower(
    method: Method,
    budget: Budget,
    candidates: Candidates,
    survey: ModelSurvey,
    setting: LatencySetting,
    totals: dict[str, int],
) -> tuple[Choice, list[LayerChoices]]:
    """Allocate; time each picked unmeasured option with its neighbours (:func:`near`), one
    timing per layer signature; drop options measured slower than dense; repeat."""
    layers = {c.fqn: c for c in candidates.choices}
    while True:
        choice = by_budget(budget, _with(candidates, list(layers.values())), totals)
        pending = {f: o for f, o in choice.picked.items() if o is not None and o.latency is None}
        if not pending:
            return choice, list(layers.values())
        wanted = {f: near(layers[f].options, o, setting.limit) for f, o in pending.items()}
        timed = measure_layers(method, survey, [layers[f] for f in pending], wanted, setting)
        layers.update({c.fqn: without_slower(c) for c in timed})


def _reachable_note(budget: Budget, layers: list[LayerChoices], model_ms: float) -> str | None:
    """When the latency target is missed: the best latency reachable, from the measurements."""
    best_saving = 0.0
    for c in layers:
        dense = c.dense("latency")
        best_saving += dense - min((float(o.latency or dense) for o in c.options), default=dense)
    best = (model_ms - best_saving) / model_ms if model_ms > 0 else 1.0
    if best <= budget.fraction + 1e-9:
        return None
    return (
        f"budget {budget} is not reachable: the fastest measured option of every layer gives a "
        f"predicted {best:.3f} of the dense model's {model_ms:.3g} ms (the rest of the model "
        f"takes {model_ms - sum(c.dense('latency') for c in layers):.3g} ms)"
    )
