"""Planning stage 5: the :class:`CompressionPlan` — one record per weight-holding layer."""

from __future__ import annotations

from typing import Any

from torch import nn

from tensorslim.analysis.profile import count_params
from tensorslim.facts import LayerInfo, Option
from tensorslim.inputs import describe, first_tensor_shape
from tensorslim.methods.base import Method
from tensorslim.planner.candidates import Candidates
from tensorslim.planner.choose import Choice
from tensorslim.planner.records import CompressionPlan, LayerPlan
from tensorslim.planner.survey import NEVER_CALLED, ModelSurvey
from tensorslim.rank.budget import Budget


def dense_entry(fqn: str, module: nn.Module, info: LayerInfo | None, reason: str) -> LayerPlan:
    """The record of a layer that stays as it is."""
    params = count_params(module)
    flops = info.flops if info is not None else 0
    return LayerPlan(
        fqn=fqn,
        type_name=type(module).__name__,
        method=None,
        config={},
        label="dense",
        reason=reason,
        input_shape=list(info.input_shape) if info else [],
        output_shape=list(info.output_shape) if info else [],
        params_before=params,
        params_after=params,
        flops_before=flops,
        flops_after=flops,
        extra={"calls": info.calls} if info else {},
    )


def compressed_entry(
    fqn: str, module: nn.Module, info: LayerInfo, option: Option, reason: str
) -> LayerPlan:
    """The record of a layer that takes ``option``."""
    entry = dense_entry(fqn, module, info, reason)
    entry.method = option.method
    entry.config = dict(option.config)
    entry.label = option.label
    entry.params_after = option.params
    entry.flops_after = option.flops
    entry.error = float(option.error)
    entry.extra.update(option.extra)
    if option.latency is not None:
        entry.extra["latency_ms"] = option.latency
    return entry


def assemble_plan(
    method: Method,
    budget: Budget | None,
    survey: ModelSurvey,
    reasons: dict[str, str],
    candidates: Candidates,
    choice: Choice,
    calibration: dict[str, Any] | None,
) -> CompressionPlan:
    """Every Linear/Conv2d in module order, then the other weight holders, each with a reason.

    ``reasons`` holds why unselected or never-run layers stay dense; ``candidates`` and
    ``choice`` the rest.
    """
    layers = []
    methods_used = {method.name: method.settings()}
    for fqn in survey.order:
        module, info = survey.modules[fqn], survey.infos.get(fqn)
        option = choice.picked.get(fqn)
        if option is None or info is None:
            why = reasons.get(fqn) or candidates.dense_reasons.get(fqn) or choice.reasons[fqn]
            layers.append(dense_entry(fqn, module, info, why))
            continue
        layers.append(compressed_entry(fqn, module, info, option, choice.reasons[fqn]))
        methods_used.setdefault(option.method, {})
    for entry in layers:
        if entry.fqn in choice.measured:  # the dense layer's measured time, kept or replaced
            entry.extra["dense_latency_ms"] = choice.measured[entry.fqn]["dense_ms"]
    for fqn in survey.other_weights:
        module = survey.modules[fqn]
        layers.append(dense_entry(fqn, module, None, _uncovered_reason(module)))
    return CompressionPlan(
        method=method.name,
        settings=method.settings(),
        budget=budget,
        input_shape=first_tensor_shape(survey.example),
        model_params=survey.model_params,
        model_flops=survey.model_flops,
        layers=layers,
        methods=methods_used,
        notes=[*choice.notes, *_warnings(layers, survey)],
        error_space=candidates.error_space,
        input_spec=describe(survey.example),
        calibration=calibration,
        latency=choice.latency,
    )


def _uncovered_reason(module: nn.Module) -> str:
    return f"no method compresses {type(module).__name__} layers yet: kept dense"


def _warnings(layers: list[LayerPlan], survey: ModelSurvey) -> list[str]:
    """What a reader must not miss: nothing compressed; weight holders no method handles."""
    notes = []
    if not any(lp.method is not None for lp in layers):
        notes.append("warning: the plan compresses no layer (see each layer's reason)")
    kinds = sorted({type(survey.modules[f]).__name__ for f in survey.other_weights})
    if kinds:
        notes.append(f"warning: no method handles {', '.join(kinds)} layers; they stay dense")
    never = [f for f in survey.order if f in survey.never_called]
    if never:
        notes.append(f"warning: {len(never)} layer(s) never ran in the example: {NEVER_CALLED}")
    return notes
