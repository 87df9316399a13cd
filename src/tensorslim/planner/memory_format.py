"""``memory_format="auto"``: a convolutional model planned in its fastest measured layout.

oneDNN runs a dense 3×3 convolution several times faster in channels_last than in NCHW on some
shapes and not on others, and a factorized layer (1×1 convolutions, thin k×k cores) gains
differently from its dense form. So neither layout is right for every model: with "auto" the
plan is made twice, once per layout (each layer's options timed in it, the dense model timed in
it), and the layout whose compressed model is predicted faster is kept. The dense baseline is
the dense model in *its* faster layout, so a plan's predicted fraction (and a latency budget)
is against the fastest dense model, not the slower layout of it.

The latency record gains ``memory_format``: the chosen layout, the dense model's faster layout,
and per layout the dense model's measured ms and the compressed model's predicted ms.

This is one layout for the whole model; :mod:`tensorslim.planner.layout_chains` then tries
one layout per chain of layers on the chosen structure and keeps it where the whole model,
re-timed, is faster than in either layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from tensorslim.analysis.deployment import AUTO, FORMATS, Deployment, at_batch, make_runner
from tensorslim.analysis.timing import MODEL_ROUNDS, LatencyCache, Timing, time_interleaved
from tensorslim.errors import TensorslimError
from tensorslim.inputs import ForwardFn, first_tensor_shape
from tensorslim.methods.base import Method
from tensorslim.planner.candidates import Candidates
from tensorslim.planner.choose import Choice
from tensorslim.planner.choose_measured import (
    allocate_measured,
    choose_measured,
    error_sq_of,
    finish_measured,
)
from tensorslim.planner.in_context import TOLERANCE, measure_in_layouts
from tensorslim.planner.latency import LatencySetting
from tensorslim.planner.survey import ModelSurvey
from tensorslim.rank.budget import Budget


def formats_to_try(model: nn.Module, deployment: Deployment) -> tuple[str, ...]:
    """The layouts "auto" compares: both for an eager model with 2-D convolutions, else NCHW
    (channels_last changes nothing without 4-D activations; ONNX Runtime picks its own)."""
    if deployment.memory_format != AUTO:
        return (deployment.memory_format,)
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return FORMATS if has_conv and deployment.backend == "eager" else ("nchw",)


def choose_in_fastest_format(
    model: nn.Module,
    method: Method,
    budget: Budget,
    candidates: Candidates,
    survey: ModelSurvey,
    setting: LatencySetting,
) -> tuple[Choice, LatencySetting]:
    """The measured choice in the layout where the compressed model is predicted fastest, and
    the setting it was measured in (its deployment's layout concrete).

    The dense model is timed in both layouts interleaved (one run, so a load change does not
    pick the layout); each layout's plan is predicted as a fraction of the dense model in that
    layout (timed in context), so the compressed model in layout f is priced
    fraction_f · dense_f. Under a FLOPs or params budget (met in both) the layout of least price
    is kept; under a latency budget the layout whose plan meets it with the least error
    (Σ error²; a layout where dense is slower needs deeper cuts for the same ms), the fastest
    when neither meets it. The fraction is restated against the faster dense layout.
    """
    formats = formats_to_try(model, setting.deployment)
    settings = {
        f: dataclasses.replace(setting, deployment=setting.deployment.in_format(f), measured={})
        for f in formats
    }
    if len(formats) == 1:
        (only,) = settings.values()
        return choose_measured(model, method, budget, candidates, survey, only), only
    if budget.metric == "latency":
        dense = dense_in_layouts(model, survey, settings, setting.forward_fn)
        fastest_dense = min(dense, key=dense.__getitem__)
        choices = {
            f: choose_measured(
                model, method, budget, candidates, survey, s, dense[fastest_dense] / dense[f]
            )
            for f, s in settings.items()
        }
    else:  # allocated in each layout first: one run times dense and planned in all of them
        choices, dense = _flops_in_layouts(model, method, budget, candidates, survey, settings)
        fastest_dense = min(dense, key=dense.__getitem__)
    price = {f: c.latency["predicted_fraction"] * dense[f] for f, c in choices.items()}  # type: ignore[index]
    chosen = _pick(budget, choices, {f: p / dense[fastest_dense] for f, p in price.items()})
    choice = choices[chosen]
    record: dict[str, Any] = choice.latency  # type: ignore[assignment]
    record["memory_format"] = {
        "chosen": chosen,
        "dense": fastest_dense,
        "formats": {
            f: {
                "dense_ms": dense[f],
                "predicted_ms": price[f],
                "error_sq": error_sq_of(choices[f].picked),
            }
            for f in formats
        },
    }
    record["dense_model_ms"] = dense[fastest_dense]
    record["predicted_ms"] = price[chosen]
    record["predicted_fraction"] = price[chosen] / dense[fastest_dense]
    return choice, settings[chosen]


def _flops_in_layouts(
    model: nn.Module,
    method: Method,
    budget: Budget,
    candidates: Candidates,
    survey: ModelSurvey,
    settings: dict[str, LatencySetting],
) -> tuple[dict[str, Choice], dict[str, float]]:
    """A FLOPs or params budget in every layout: each layout's allocation, then the dense model
    and every layout's planned structure timed in one interleaved run
    (:func:`~tensorslim.planner.in_context.measure_in_layouts`). (choices, dense ms) per layout."""
    allocated = {
        f: allocate_measured(method, budget, candidates, survey, s) for f, s in settings.items()
    }
    picks = {f: a.choice.picked for f, a in allocated.items()}
    contexts = measure_in_layouts(model, method, survey, settings, picks)
    choices = {
        f: finish_measured(budget, s, allocated[f], contexts[f]) for f, s in settings.items()
    }
    return choices, {f: c.dense_ms for f, c in contexts.items()}


def _pick(budget: Budget, choices: dict[str, Choice], fraction: dict[str, float]) -> str:
    """The layout kept: fastest, or under a latency budget the least error among those
    meeting it (within the in-context tolerance)."""
    fastest = min(fraction, key=fraction.__getitem__)
    if budget.metric != "latency":
        return fastest
    meeting = [f for f in fraction if fraction[f] <= budget.fraction * (1 + TOLERANCE)]
    if not meeting:
        return fastest
    return min(meeting, key=lambda f: (error_sq_of(choices[f].picked), fraction[f]))


def dense_in_layouts(
    model: nn.Module,
    survey: ModelSurvey,
    settings: dict[str, LatencySetting],
    forward_fn: ForwardFn | None,
) -> dict[str, float]:
    """The dense model's ms in every layout of ``settings``, timed interleaved in one run and
    kept in the settings' cache as each layout's dense reference (a cached plan times none)."""
    deployments = {f: s.deployment for f, s in settings.items()}
    cache = next(iter(settings.values())).cache
    return module_in_layouts(model, survey.example, deployments, cache, forward_fn)


def module_in_layouts(
    module: nn.Module,
    example: Any,
    deployments: dict[str, Deployment],
    cache: LatencyCache,
    forward_fn: ForwardFn | None = None,
    rounds: dict[str, Any] | None = None,
) -> dict[str, float]:
    """``module``'s ms on ``example`` in each of ``deployments`` (one per layout), timed
    interleaved in one run when any is uncached (``rounds``: default :data:`MODEL_ROUNDS`);
    a time already cached stays (a dense model's is the reference its layers' ratios were
    scaled by)."""
    shape = tuple(first_tensor_shape(example))
    keys = {f: cache.key(module, shape, d) for f, d in deployments.items()}
    if any(cache.get(k) is None for k in keys.values()):
        models = {f: (module, d) for f, d in deployments.items()}
        timed = time_in_deployments(models, example, forward_fn, rounds or MODEL_ROUNDS)
        for f, key in keys.items():
            if cache.get(key) is None:
                cache.put(key, timed[f].ms)
    return {f: float(cache.get(k)) for f, k in keys.items()}  # type: ignore[arg-type]


def time_in_deployments(
    models: dict[str, tuple[nn.Module, Deployment]],
    example: Any,
    forward_fn: ForwardFn | None = None,
    rounds: dict[str, Any] | None = None,
) -> dict[str, Timing]:
    """Whole models, each in its own deployment (e.g. dense in its faster layout, compressed in
    its own), on ``example`` at the deployments' batch, timed interleaved (one thread count;
    ``rounds``: :func:`~tensorslim.analysis.timing.time_interleaved`'s settings, default at
    least 12 rounds, a check's)."""
    deployments = [d for _, d in models.values()]
    if len({(d.batch, d.threads) for d in deployments}) != 1:
        raise TensorslimError("time_in_deployments: give every deployment one batch and threads")
    x = at_batch(example, deployments[0].batch)
    runners = {name: make_runner(m, x, d, forward_fn) for name, (m, d) in models.items()}
    return time_interleaved(runners, deployments[0].threads, **(rounds or {"min_rounds": 12}))
