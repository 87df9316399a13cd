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

from torch import nn

from tensorslim.methods.base import Method
from tensorslim.planner.candidates import Candidates
from tensorslim.planner.choose import Choice, by_budget
from tensorslim.planner.latency import (
    LatencySetting,
    dense_model_ms,
    faster_only,
    latency_record,
    measure_all,
    measure_layer,
    spread,
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
    model_ms = dense_model_ms(model, survey, setting)
    if budget.metric == "latency":
        layers = [faster_only(c) for c in measure_all(method, survey, candidates.choices, setting)]
        choice = by_budget(budget, _with(candidates, layers), {**totals, "latency": model_ms})
        note = _reachable_note(budget, layers, model_ms)
        if note:  # replaces by_budget's note with the figure in measured terms
            choice.notes = [n for n in choice.notes if not n.startswith(f"budget {budget} is not")]
            choice.notes.append(note)
    else:
        choice, layers = _never_slower(method, budget, candidates, survey, setting, totals)
    for layer in layers:
        measured = layer.fqn in setting.measured
        if measured and not layer.options and choice.picked.get(layer.fqn) is None:
            choice.reasons[layer.fqn] = (
                "kept dense: every measured option is slower than the dense layer "
                f"({setting.describe(layer.fqn)})"
            )
    choice.measured = setting.measured
    choice.latency = latency_record(setting, model_ms, choice.picked)
    return choice


def _with(candidates: Candidates, layers: list[LayerChoices]) -> Candidates:
    return dataclasses.replace(candidates, choices=layers)


def _never_slower(
    method: Method,
    budget: Budget,
    candidates: Candidates,
    survey: ModelSurvey,
    setting: LatencySetting,
    totals: dict[str, int],
) -> tuple[Choice, list[LayerChoices]]:
    """Allocate, time the layers compressed with unmeasured options, drop slower options, repeat."""
    layers = {c.fqn: c for c in candidates.choices}
    while True:
        choice = by_budget(budget, _with(candidates, list(layers.values())), totals)
        pending = [f for f, o in choice.picked.items() if o is not None and o.latency is None]
        if not pending:
            return choice, list(layers.values())
        for fqn in pending:
            layer, picked = layers[fqn], choice.picked[fqn]
            options = spread(layer.options, setting.limit)
            if all(o is not picked for o in options):
                options.append(picked)  # type: ignore[arg-type]
            layers[fqn] = faster_only(measure_layer(method, survey, layer, options, setting))


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
