"""Planning stage 5: the :class:`CompressionPlan` — one record per weight-holding layer."""

from __future__ import annotations

import math
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
from tensorslim.planner.ties import SHARE_KIND, TIED_TO, TiePlan
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
        extra=_info_extra(info),
    )


def _info_extra(info: LayerInfo | None) -> dict[str, Any]:
    """What a plan keeps of the survey beyond the shapes: the calls, an attention's key shapes."""
    if info is None:
        return {}
    extra: dict[str, Any] = {"calls": info.calls}
    if info.other_shapes:
        extra["other_shapes"] = [list(s) for s in info.other_shapes]
    return extra


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
    ties: TiePlan | None = None,
) -> CompressionPlan:
    """Every Linear/Conv2d in module order, then the other weight holders, each with a reason.

    ``reasons`` holds why unselected or never-run layers stay dense; ``candidates`` and
    ``choice`` the rest; ``ties`` which layers share a compressed leader's structure.
    """
    ties = ties or TiePlan()
    layers = []
    methods_used = {method.name: method.settings()}
    for fqn in survey.order:
        module, info = survey.modules[fqn], survey.infos.get(fqn)
        if fqn in ties.leader_of:
            layers.append(follower_entry(fqn, survey, ties, choice))
            continue
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
        if fqn in ties.leader_of:
            layers.append(follower_entry(fqn, survey, ties, choice))
            continue
        reason = ties.dense.get(fqn) or _uncovered_reason(module)
        layers.append(dense_entry(fqn, module, None, reason))
    return CompressionPlan(
        method=method.name,
        settings=method.settings(),
        budget=budget,
        input_shape=first_tensor_shape(survey.example),
        model_params=survey.model_params,
        model_flops=survey.model_flops,
        layers=layers,
        methods=methods_used,
        notes=[*choice.notes, *_warnings(layers, survey), *_error_space_notes(candidates)],
        error_space=candidates.error_space,
        input_spec=describe(survey.example),
        calibration=calibration,
        latency=choice.latency,
    )


def follower_entry(fqn: str, survey: ModelSurvey, ties: TiePlan, choice: Choice) -> LayerPlan:
    """The record of a tie's follower: its leader's structure when the leader is compressed.

    Its parameters are counted with the leader (before and after: 0 of its own), so the plan's
    totals count the shared weight once. FLOPs: a module follower costs the leader's option
    scaled by its own dense FLOPs; a factored embedding 2·tokens·r·d, tokens from the leader's
    input (a tied LM head sees every token the embedding looked up).
    """
    module, info = survey.modules[fqn], survey.infos.get(fqn)
    leader, kind = ties.leader_of[fqn], ties.kind[fqn]
    option = choice.picked.get(leader)
    if option is None:
        return dense_entry(fqn, module, info, f"weight tied with {leader}, which stays dense")
    entry = dense_entry(fqn, module, info, f"shares {leader}'s {option.method} structure (tied)")
    leader_info = survey.infos[leader]
    if kind == "module":
        entry.flops_after = round(option.flops * entry.flops_before / max(1, leader_info.flops))
        entry.config = {TIED_TO: leader, SHARE_KIND: kind}
    else:
        rank, tokens = int(option.config["rank"]), math.prod(leader_info.input_shape[:-1])
        entry.flops_after = 2 * tokens * rank * module.weight.shape[1]
        entry.config = {TIED_TO: leader, SHARE_KIND: kind, "rank": rank}
    entry.method, entry.label, entry.error = option.method, f"tied to {leader}", option.error
    entry.params_before = entry.params_after = 0
    return entry


def _uncovered_reason(module: nn.Module) -> str:
    kind = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # its kernel scatters every input position into a patch: the channel/spatial views the
        # conv methods factorize do not apply, and no transposed low-rank layer exists yet
        return f"transposed convolution ({kind}): no method factorizes it yet; kept dense"
    if isinstance(module, nn.Conv3d):
        return "3-D convolution: no method factorizes Conv3d yet; kept dense"
    return f"no method compresses {kind} layers yet: kept dense"


def _error_space_notes(candidates: Candidates) -> list[str]:
    """Say which layers the allocator compared by weight error in an output-error plan."""
    if not candidates.weight_space_layers:
        return []
    names = ", ".join(candidates.weight_space_layers)
    return [
        f"note: {names} have no single input Gram (attention/recurrent): their errors are "
        "weight errors ‖W − Ŵ‖/‖W‖, usually larger than output errors, so the allocator "
        "compresses them less readily"
    ]


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
