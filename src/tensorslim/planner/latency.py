"""Planning with measured latency: each layer's options timed against its dense form.

A layer's options are timed at the layer's real input shape (recorded by the survey's forward
pass, batch replaced by the deployment's), interleaved with the dense layer (see
:func:`tensorslim.analysis.timing.time_against_reference`). Only the structure is built for
timing (``build(..., init=False)``, weights filled with random numbers): no decomposition runs.

A method may offer dozens of options per layer (48 SVD ranks); :func:`spread` keeps at most
``limit`` of them, spaced evenly in FLOPs along each (method, scheme) family's (FLOPs, error)
front, and only measured options are ever priced in latency.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim.analysis.deployment import Deployment
from tensorslim.analysis.timing import (
    LatencyCache,
    load_average,
    time_against_reference,
    time_models,
)
from tensorslim.facts import Option
from tensorslim.inputs import ForwardFn, first_tensor_shape
from tensorslim.methods.base import Method
from tensorslim.methods.registry import get_method
from tensorslim.planner.survey import ModelSurvey
from tensorslim.rank.allocate import LayerChoices

DEFAULT_LIMIT = 8


@dataclass
class LatencySetting:
    """How a plan measures: the deployment, the cache, and whether slower layers are allowed."""

    deployment: Deployment
    cache: LatencyCache
    allow_slower: bool = False
    limit: int = DEFAULT_LIMIT
    forward_fn: ForwardFn | None = None
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)  # fqn → what was timed

    def describe(self, fqn: str) -> str:
        """'dense 1.20 ms; fastest rank 4/64: 1.35 ms (of 12 measured)' for a measured layer."""
        m = self.measured[fqn]
        return (
            f"dense {m['dense_ms']:.3g} ms; fastest {m['fastest_label']}: "
            f"{m['fastest_ms']:.3g} ms (of {m['count']} measured at {self.deployment.key})"
        )


def spread(options: list[Option], limit: int) -> list[Option]:
    """At most ``limit`` options per (method, scheme) family, evenly spaced in FLOPs along the
    family's (FLOPs, error) Pareto front (an option with more FLOPs and more error than another
    of its family is never the better choice)."""
    families: dict[tuple[str, str], list[Option]] = {}
    for o in options:
        families.setdefault((o.method, str(o.config.get("scheme", ""))), []).append(o)
    kept: list[Option] = []
    for family in families.values():
        front: list[Option] = []
        for o in sorted(family, key=lambda o: (o.flops, o.error)):
            if not front or o.error < front[-1].error:
                front.append(o)
        if len(front) <= limit:
            kept += front
            continue
        low, high = front[0].flops, front[-1].flops
        targets = [low + (high - low) * k / (limit - 1) for k in range(limit)]
        chosen = {id(min(front, key=lambda o, t=t: abs(o.flops - t))): None for t in targets}
        kept += [o for o in front if id(o) in chosen]
    return kept


def skeleton(method: Method, module: nn.Module, option: Option, survey_info: Any) -> nn.Module:
    """The option's structure (no decomposition), its weights random (no denormals)."""
    builder = method if option.method == method.name else get_method(option.method)
    built = builder.build(module, option.config, survey_info, init=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in built.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.05)
    return built


def measure_layer(
    method: Method,
    survey: ModelSurvey,
    layer: LayerChoices,
    options: list[Option],
    setting: LatencySetting,
) -> LayerChoices:
    """``layer`` with ``options`` timed (latency set, ms over the layer's calls) and its dense
    latency in ``dense_costs["latency"]``; the timing is recorded in ``setting.measured``."""
    module, info = survey.modules[layer.fqn], survey.infos[layer.fqn]
    variants = {str(i): skeleton(method, module, o, info) for i, o in enumerate(options)}
    dense_ms, ms = time_against_reference(
        module, variants, info.input_shape, setting.deployment, setting.cache
    )
    timed = [dataclasses.replace(o, latency=ms[str(i)] * info.calls) for i, o in enumerate(options)]
    dense_ms *= info.calls
    fastest = min(timed, key=lambda o: o.latency or 0.0)
    setting.measured[layer.fqn] = {
        "dense_ms": dense_ms,
        "fastest_ms": fastest.latency,
        "fastest_label": fastest.label or str(fastest.config),
        "count": len(timed),
    }
    costs = {**layer.dense_costs, "latency": dense_ms}
    return dataclasses.replace(layer, options=timed, dense_costs=costs)


def measure_all(
    method: Method, survey: ModelSurvey, layers: list[LayerChoices], setting: LatencySetting
) -> list[LayerChoices]:
    """Every layer with its :func:`spread` options measured (for a latency budget)."""
    return [
        measure_layer(method, survey, c, spread(c.options, setting.limit), setting) for c in layers
    ]


def faster_only(layer: LayerChoices) -> LayerChoices:
    """The layer's measured options that beat its dense form (the never-slower rule)."""
    dense = layer.dense("latency")
    kept = [o for o in layer.options if o.latency is not None and o.latency < dense]
    return dataclasses.replace(layer, options=kept)


def dense_model_ms(model: nn.Module, survey: ModelSurvey, setting: LatencySetting) -> float:
    """The whole dense model's latency at the deployment (best of interleaved rounds), cached
    beside its layers' so every plan from one cache prices "the rest of the model" alike."""
    shape = tuple(first_tensor_shape(survey.example))
    key = setting.cache.key(model, shape, setting.deployment)
    if setting.cache.get(key) is None:
        where, fn = setting.deployment, setting.forward_fn
        setting.cache.put(key, time_models({"dense": model}, survey.example, where, fn)["dense"].ms)
    return float(setting.cache.get(key))  # type: ignore[arg-type]


def latency_record(
    setting: LatencySetting, model_ms: float, picked: dict[str, Option | None]
) -> dict[str, Any]:
    """The plan's latency facts: the deployment, dense model and layer times, the prediction.

    Predicted latency = whole dense model − Σ over compressed layers (dense − chosen), i.e.
    the measured layer times plus the measured rest of the model.
    """
    saved = sum(
        setting.measured[f]["dense_ms"] - float(o.latency)
        for f, o in picked.items()
        if o is not None and o.latency is not None and f in setting.measured
    )
    return {
        "deployment": setting.deployment.to_dict(),
        "dense_model_ms": model_ms,
        "dense_layers_ms": sum(m["dense_ms"] for m in setting.measured.values()),
        "measured_layers": len(setting.measured),
        "predicted_ms": model_ms - saved,
        "predicted_fraction": (model_ms - saved) / model_ms if model_ms > 0 else 1.0,
        "allow_slower": setting.allow_slower,
        "load_average": load_average(),
    }
