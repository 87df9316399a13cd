"""Planning stage 4: one option per layer — by the global budget allocator, by the method's
per-layer rule, or (for methods that reach their structure in training) the method's aim."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tensorslim.facts import LayerInfo, Option
from tensorslim.methods.base import Method
from tensorslim.planner.candidates import Candidates
from tensorslim.rank.allocate import allocate_each, option_cost
from tensorslim.rank.budget import Budget

CHOSEN_BY_ALLOCATOR = "chosen by the allocator"
PER_LAYER_RULE = "per-layer rule"


@dataclass
class Choice:
    """The picked option per layer (None: dense), why, and notes for the whole plan.

    With measured latency, ``measured`` holds each timed layer's facts (dense ms, fastest
    option) and ``latency`` the plan's latency record (deployment, prediction).
    """

    picked: dict[str, Option | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency: dict[str, Any] | None = None


def choose_options(
    method: Method,
    budget: Budget | None,
    candidates: Candidates,
    infos: dict[str, LayerInfo],
    totals: dict[str, int],
) -> Choice:
    """Pick an option per layer. ``totals`` holds the whole model's ``flops`` and ``params``."""
    if budget is not None and method.kind != "training":
        return by_budget(budget, candidates, totals)
    return _by_rule(method, budget, candidates, infos)


def saving_needed(total: float, fraction: float) -> float:
    """Cost to remove from ``total`` so at most ``fraction`` of it is left (≤ 0: none).

    Counts (FLOPs, parameters) are integers: the saving is rounded up. A latency (ms) is not.
    """
    if isinstance(total, float):
        return total - fraction * total
    # round up: saving floor(total − target) can leave the model just above the target;
    # round(…, 6) first so that float noise in fraction·total does not add a unit
    return math.ceil(round(total - fraction * total, 6))


def by_budget(
    budget: Budget,
    candidates: Candidates,
    totals: dict[str, Any],
    spend: str | None = None,
    slack: float = 0.0,
) -> Choice:
    """The allocator's choice for ``budget``; ``totals`` holds the model's ``flops``,
    ``params`` (and, for a latency budget, its measured ``latency`` in ms). ``spend`` and
    ``slack``: see :func:`~tensorslim.rank.allocate.allocate` (the budget met where it buys
    measured time; with a slack, the least error within it of the fastest)."""
    return by_budget_each(budget, candidates, totals, (slack,), spend)[0]


def by_budget_each(
    budget: Budget,
    candidates: Candidates,
    totals: dict[str, Any],
    slacks: Sequence[float],
    spend: str | None = None,
) -> list[Choice]:
    """:func:`by_budget` for each of ``slacks``, the allocator's walks made once
    (:func:`~tensorslim.rank.allocate.allocate_each`)."""
    metric, total = budget.metric, totals[budget.metric]
    need = max(0, saving_needed(total, budget.fraction))
    caps = {m: saving_needed(totals[m], cap) for m, cap in budget.caps.items()}
    each = allocate_each(candidates.choices, metric, need, slacks, caps=caps, spend=spend)
    return [_choice(budget, candidates, totals, caps, p, s) for p, s in each]


def _choice(
    budget: Budget,
    candidates: Candidates,
    totals: dict[str, Any],
    caps: dict[str, Any],
    picked: dict[str, Option | None],
    saved: float,
) -> Choice:
    """The allocation ``picked`` (saving ``saved`` in the budget's metric) as a Choice: its
    notes and every layer's reason."""
    metric, total = budget.metric, totals[budget.metric]
    need = max(0, saving_needed(total, budget.fraction))
    choice = Choice(picked=picked)
    if saved < need:
        choice.notes.append(
            f"budget {budget} is not reachable with this method: the cheapest options reach "
            f"{(total - saved) / total:.3f} of the model's {metric}"
        )
    choice.notes += _cap_notes(candidates, picked, caps, totals)
    for layer in candidates.choices:
        option = picked[layer.fqn]
        if option is not None:
            choice.reasons[layer.fqn] = CHOSEN_BY_ALLOCATOR
            continue
        if not layer.options:
            choice.reasons[layer.fqn] = "kept dense: no option left for this layer"
            continue
        cheapest = min(option_cost(o, metric) for o in layer.options)
        choice.reasons[layer.fqn] = (
            f"kept dense: no option is cheaper than the dense layer "
            f"({_amount(cheapest, metric)} ≥ {_amount(layer.dense_cost, metric)})"
            if cheapest >= layer.dense_cost
            else "kept dense: the budget was met with less error by compressing other layers"
        )
    return choice


def _amount(value: float, metric: str) -> str:
    return f"{value:.3g} ms" if metric == "latency" else f"{value} {metric}"


def _cap_notes(
    candidates: Candidates,
    picked: dict[str, Option | None],
    caps: dict[str, int],
    totals: dict[str, int],
) -> list[str]:
    """A note for every cap the choice misses (only possible for caps below 1.0)."""
    notes = []
    for m, need in caps.items():
        saved = sum(
            layer.dense(m)
            - (option_cost(picked[layer.fqn], m) if picked[layer.fqn] else layer.dense(m))
            for layer in candidates.choices
        )
        if need > 0 and saved < need:
            notes.append(
                f"the cap on {m} is not reachable together with the target: the plan keeps "
                f"{(totals[m] - saved) / totals[m]:.3f} of the model's {m}"
            )
    return notes


def _by_rule(
    method: Method, budget: Budget | None, candidates: Candidates, infos: dict[str, LayerInfo]
) -> Choice:
    training = method.kind == "training"
    choice = Choice()
    for layer in candidates.choices:
        info = infos[layer.fqn]
        option = method.choose_without_budget(layer.options, info)
        if (
            option is not None
            and not training
            and not (option.flops < info.flops or option.params < info.params)
        ):
            choice.reasons[layer.fqn] = (
                f"kept dense: {option.label or 'the chosen option'} is not cheaper than the dense "
                f"layer ({option.flops} ≥ {info.flops} FLOPs)"
            )
            option = None
        elif option is not None:
            choice.reasons[layer.fqn] = (
                f"reached during training under the budget {budget}"
                if training and budget is not None
                else PER_LAYER_RULE
            )
        choice.picked[layer.fqn] = option
    return choice
