"""The fastest memory format per layer chain (``memory_format="auto"``, after the layout choice).

:mod:`tensorslim.planner.memory_format` plans the model in NCHW and in channels_last and keeps
one layout for the whole model. Layers differ, though: oneDNN's channels_last gain is large for
some convolution shapes and nil or negative for others (a factorized layer's thin cores and
1×1 convolutions gain differently from a dense 3×3), so a model may run fastest with some
chains in one layout and the rest in the other, paying a copy at each boundary.

On the chosen plan's structure (its compressed layers as skeletons, as the in-context
prediction times it) this stage

1. finds the chains (:func:`tensorslim.layout.find_chains`: a ResNet's stem and stages),
2. captures each chain's real input (one forward pass of the example) and times the chain on
   it in both layouts, interleaved in one run (cached like a layer: module structure, input
   shape, deployment, machine), and assigns each chain its faster layout;
3. if that assignment mixes layouts and the chains' summed times promise more than
   :data:`MARGIN` over the uniform layouts it is compared with, times the whole structure in
   those layouts and in the mixed one, interleaved in one run (conversions between chains
   included: the whole-model time decides), and keeps the mixed layout only if it is faster
   than each of them by more than :data:`MARGIN` (a tie is not worth a hook per chain).

A plan compares the mix with its chosen layout only: the stage's outcome is the mix or the
plan as chosen, never the planned structure in the other layout, so timing that one could only
turn down a mix that beats the chosen layout (and cost a third of the whole-model run). A model
searched on its own (``chain_layout``'s default, e.g. the dense baseline) is compared with both.

It records ``latency["memory_format"]["chains"]``: every chain's ms in both layouts and its
input shape, the assignment, the chains' summed ms per layout and mixed (``chain_sum_ms``),
the whole-model times (when tried), ``kept`` and why. When
kept, the plan's predicted ms and fraction are restated for the mixed layout (scaled by
mixed / uniform from the same run; the dense baseline stays the faster uniform dense model)
and ``apply`` returns the model in it (:func:`tensorslim.layout.planned_layout`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from tensorslim.analysis.deployment import AUTO, FORMATS, Deployment
from tensorslim.analysis.timing import LAYER_ROUNDS, MODEL_ROUNDS, LatencyCache
from tensorslim.inputs import ForwardFn, Inputs, call_model, first_tensor_shape
from tensorslim.layout import Layout, find_chains, to_layout
from tensorslim.methods.base import Method
from tensorslim.planner.choose import Choice
from tensorslim.planner.in_context import planned_structure
from tensorslim.planner.latency import LatencySetting
from tensorslim.planner.memory_format import module_in_layouts, time_in_deployments
from tensorslim.planner.survey import ModelSurvey

PER_CHAIN = "per_chain"
MARGIN = 0.01  # the mixed layout must beat both uniform ones by this fraction to be kept


def fastest_chain_layout(
    model: nn.Module,
    method: Method,
    survey: ModelSurvey,
    choice: Choice,
    setting: LatencySetting,
) -> Choice:
    """``choice`` with its latency record's ``memory_format["chains"]`` (see the module
    docstring); unchanged when only one layout was tried or the model has under two chains."""
    layouts = (choice.latency or {}).get("memory_format")
    if not layouts or len(find_chains(model)) < 2:
        return choice
    structure = planned_structure(model, method, survey, choice.picked)
    entry = chain_layout(
        structure,
        survey.example,
        setting.deployment,
        setting.cache,
        setting.forward_fn,
        against=(layouts["chosen"],),
    )
    if entry["kept"]:  # the prediction restated for the mixed layout (scaled, same run)
        record: dict[str, Any] = choice.latency  # type: ignore[assignment]
        scale = entry["model_ms"][PER_CHAIN] / entry["model_ms"][layouts["chosen"]]
        entry["uniform_predicted_ms"] = record["predicted_ms"]
        record["predicted_ms"] *= scale
        record["predicted_fraction"] *= scale
    layouts["chains"] = entry
    return choice


def chain_layout(
    model: nn.Module,
    example: Any,
    deployment: Deployment,
    cache: LatencyCache,
    forward_fn: ForwardFn | None = None,
    against: tuple[str, ...] = FORMATS,
) -> dict[str, Any]:
    """Steps 1–3 of the module docstring on ``model`` (a planned structure, or a dense model
    to compare with) at ``deployment``'s batch and threads: the ``chains`` record. ``against``:
    the uniform layouts a mix must beat (a plan's: its chosen one)."""
    chains = find_chains(model)
    deployments = {f: deployment.in_format(f) for f in FORMATS}
    inputs = chain_inputs(model, chains, example, forward_fn)
    times = {  # a chain's two layouts only propose; the whole model decides: short rounds
        c: module_in_layouts(model.get_submodule(c), x, deployments, cache, rounds=LAYER_ROUNDS)
        for c, x in inputs.items()
    }
    assignment = {c: min(t, key=t.__getitem__) for c, t in times.items()}
    sums = {f: sum(t[f] for t in times.values()) for f in FORMATS}
    sums[PER_CHAIN] = sum(t[assignment[c]] for c, t in times.items())
    entry: dict[str, Any] = {
        "chains": {
            c: {**t, "input_shape": [deployment.batch, *first_tensor_shape(inputs[c])[1:]]}
            for c, t in times.items()
        },
        "assignment": assignment,
        "chain_sum_ms": sums,
        "kept": False,
    }
    if len(set(assignment.values())) < 2:
        entry["reason"] = "every chain is fastest in one layout: nothing to mix"
    elif sums[PER_CHAIN] >= (1 - MARGIN) * min(sums[f] for f in against):
        entry["reason"] = (
            "not tried: the chains' own times promise under "
            f"{MARGIN:.0%} over the uniform layout ({', '.join(against)})"
        )
    else:
        model_ms = mixed_and_uniform_ms(
            model, assignment, example, deployments, cache, forward_fn, against
        )
        _decide(entry, model_ms, against)
    return entry


def _decide(
    entry: dict[str, Any], model_ms: dict[str, float], against: tuple[str, ...] = FORMATS
) -> None:
    """Keep the mixed layout when it beats each uniform layout of ``against`` (same run) by
    :data:`MARGIN`."""
    entry["model_ms"] = model_ms
    uniform = min(model_ms[f] for f in against)
    entry["kept"] = model_ms[PER_CHAIN] < (1 - MARGIN) * uniform
    verdict = "kept" if entry["kept"] else "not kept"
    entry["reason"] = (
        f"{verdict}: the model in the per-chain layout measured {model_ms[PER_CHAIN]:.4g} ms, "
        + ", ".join(f"{f} {model_ms[f]:.4g} ms" for f in against)
    )


def chain_inputs(
    model: nn.Module, chains: list[str], example: Any, forward_fn: ForwardFn | None = None
) -> dict[str, Inputs]:
    """Each chain's arguments at its first call in one forward pass of ``example`` (a chain
    never called, or called without a 4-D tensor argument — no layout to choose — is left
    out)."""
    seen: dict[str, Inputs] = {}
    handles = []

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in seen and any(isinstance(a, torch.Tensor) and a.dim() == 4 for a in args):
                seen[name] = Inputs(tuple(args), dict(kwargs))

        return hook

    try:
        for name in chains:
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(recorder(name), with_kwargs=True))
        with torch.no_grad():
            call_model(model.eval(), example, forward_fn)
    finally:
        for handle in handles:
            handle.remove()
    return {name: seen[name] for name in chains if name in seen}


def mixed_and_uniform_ms(
    structure: nn.Module,
    assignment: Layout,
    example: Any,
    deployments: dict[str, Deployment],
    cache: LatencyCache,
    forward_fn: ForwardFn | None = None,
    against: tuple[str, ...] = FORMATS,
) -> dict[str, float]:
    """The whole ``structure`` in each uniform layout of ``against`` and in ``assignment``
    (ms), interleaved in one run, cached under keys naming the assignment (a replan reuses
    the decision)."""
    base = deployments[FORMATS[0]]
    shape = tuple(first_tensor_shape(example))
    tag = f"{cache.key(structure, shape, base.in_format(AUTO))}|chains|" + json.dumps(
        assignment, sort_keys=True
    )
    names = (*against, PER_CHAIN)
    keys = {n: hashlib.sha1(f"{tag}|{n}".encode()).hexdigest() for n in names}
    if any(cache.get(k) is None for k in keys.values()):
        # a model already in its layout runs as it is: the "auto" runner converts nothing
        mixed = to_layout(structure, assignment, inplace=False)
        models = {f: (structure, deployments[f]) for f in against}
        models[PER_CHAIN] = (mixed, base.in_format(AUTO))
        timed = time_in_deployments(models, example, forward_fn, MODEL_ROUNDS)
        for n in names:
            cache.put(keys[n], timed[n].ms)
    return {n: float(cache.get(k)) for n, k in keys.items()}  # type: ignore[arg-type]
