"""The plan's latency prediction, measured in context: the planned structure as a whole model.

Layer times measured one layer at a time do not add up to the model's time the way
"dense model − Σ layer savings" assumes. Timing resnet20 at batch 64 twice on this shared machine:
once the layers' isolated savings summed to 2.4× the whole model's measured saving, once to
0.8×; the dense model timed during planning was 43 % slower than when re-timed a minute later.
The sum mixes numbers measured at different loads, and a layer alone keeps its input and
weights hot in cache while in the model it shares the cache with its neighbours, the ReLU, the
residual add and a factorized layer's extra intermediate tensor. So after allocating, the
planner builds the planned structure (every compressed layer's skeleton, random weights: no
decomposition; the other modules share the model's tensors) and times it against the dense
model, interleaved in one run and cached like a layer. That ratio is the plan's predicted
latency; the per-layer sum is kept beside it.

A latency budget whose target this measurement misses by more than :data:`TOLERANCE` is
re-allocated with the layers' savings rescaled by the factor the measurement showed (at most
:data:`REPLANS` times); the plan closest to the target from below (else the fastest) is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tensorslim.analysis.timing import time_models_against_reference, time_models_in_deployments
from tensorslim.facts import Option
from tensorslim.methods.base import Method
from tensorslim.planner.latency import LatencySetting, skeleton
from tensorslim.planner.survey import ModelSurvey
from tensorslim.surgery import copy_structure, replace_modules_at

TOLERANCE = 0.05  # relative miss of a latency target that triggers a re-allocation
REPLANS = 2


@dataclass(frozen=True)
class InContext:
    """The dense model and the planned structure timed together (ms, reference units)."""

    dense_ms: float
    planned_ms: float

    @property
    def fraction(self) -> float:
        return self.planned_ms / self.dense_ms if self.dense_ms > 0 else 1.0


def planned_structure(
    model: nn.Module, method: Method, survey: ModelSurvey, picked: dict[str, Option | None]
) -> nn.Module:
    """``model`` with each picked layer replaced by its option's skeleton; the other modules
    are copies sharing the model's parameters and buffers (no weight is copied)."""
    structure = copy_structure(model)
    built = {
        fqn: skeleton(method, survey.modules[fqn], option, survey.infos[fqn])
        for fqn, option in picked.items()
        if option is not None
    }
    replace_modules_at(structure, built)
    return structure


def measure_in_context(
    model: nn.Module,
    method: Method,
    survey: ModelSurvey,
    setting: LatencySetting,
    picked: dict[str, Option | None],
) -> InContext:
    """The dense model and the planned structure timed interleaved at the deployment."""
    structure = planned_structure(model, method, survey, picked)
    dense_ms, ms = time_models_against_reference(
        model,
        {"planned": structure},
        survey.example,
        setting.deployment,
        setting.cache,
        setting.forward_fn,
    )
    return InContext(dense_ms, ms["planned"])


def measure_in_layouts(
    model: nn.Module,
    method: Method,
    survey: ModelSurvey,
    settings: dict[str, LatencySetting],
    picks: dict[str, dict[str, Option | None]],
) -> dict[str, InContext]:
    """:func:`measure_in_context` for several settings (memory formats) in **one**
    interleaved run: the dense model and the planned structure of ``picks[f]`` in every
    setting ``f`` (one cache; the settings differ in layout only). The dense model's time in
    each layout comes from that run too, so the layouts are compared under one load."""
    groups = {
        f: (
            model,
            {"planned": planned_structure(model, method, survey, picks[f])},
            s.deployment,
        )
        for f, s in settings.items()
    }
    first = next(iter(settings.values()))
    timed = time_models_in_deployments(groups, survey.example, first.cache, first.forward_fn)
    return {f: InContext(dense_ms, ms["planned"]) for f, (dense_ms, ms) in timed.items()}


Tried = tuple[float, dict[str, Option | None], InContext]


def corrected_target(target: float, layer_sum: float, in_context: float) -> float | None:
    """The layer-sum target whose in-context result should be ``target``.

    The measurement showed the layers' savings (1 − layer_sum) becoming (1 − in_context) in
    the model, a factor k; a layer-sum target t' with k·(1 − t') = 1 − target is asked next.
    ``None`` when the savings vanish in context (nothing to correct with).
    """
    if layer_sum >= 1.0:
        return None
    k = (1.0 - in_context) / (1.0 - layer_sum)
    if k <= 0.05:
        return None
    return min(1.0, max(0.01, 1.0 - (1.0 - target) / k))


def calibrated(
    allocate: Callable[[float], tuple[dict[str, Option | None], float]],
    target: float,
    measure: Callable[[dict[str, Option | None]], InContext],
) -> tuple[Tried, list[Tried]]:
    """The kept (layer-sum target asked, picked options, their in-context timing) for a latency
    budget, and every allocation tried (the first asked for ``target`` itself).

    ``allocate(t)`` allocates for a layer-sum target ``t`` and returns the picks and their
    layer-sum fraction; ``measure`` times picks in context. Re-allocates while the in-context
    fraction misses ``target`` by more than :data:`TOLERANCE` (at most :data:`REPLANS` times).
    """
    ask = target
    tried: list[Tried] = []
    for _ in range(REPLANS + 1):
        picked, layer_sum = allocate(ask)
        timed = measure(picked)
        tried.append((ask, picked, timed))
        if abs(timed.fraction - target) <= TOLERANCE * target:
            break
        nxt = corrected_target(target, layer_sum, timed.fraction)
        if nxt is None or abs(nxt - ask) < 1e-3:
            break
        ask = nxt
    meeting = [t for t in tried if t[2].fraction <= target * (1 + TOLERANCE)]
    if meeting:
        return max(meeting, key=lambda t: t[2].fraction), tried
    return min(tried, key=lambda t: t[2].fraction), tried
