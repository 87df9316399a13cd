"""Planning with measured latency: each layer's options timed against its dense form.

A layer's options are timed at the layer's real input shape (recorded by the survey's forward
pass, batch replaced by the deployment's), interleaved with the dense layer (see
:func:`tensorslim.analysis.timing.time_against_reference`). Only the structure is built for
timing (``build(..., init=False)``, weights filled with random numbers): no decomposition runs.

A method may offer dozens of options per layer (48 SVD ranks); :func:`spread` keeps at most
``limit`` of them, spaced evenly in FLOPs along each (method, scheme) family's (FLOPs, error)
front, and only measured options are ever priced in latency. Layers alike in type,
configuration and input shape (a :func:`signature`: resnet56's 55 convs have 9) are timed once
for all of them (:func:`measure_layers`), and under a FLOPs or params budget only the options
cheaper than dense in that metric are timed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim.analysis.deployment import Deployment, layer_deployment
from tensorslim.analysis.timing import (
    LatencyCache,
    load_average,
    time_against_reference,
    time_models_against_reference,
)
from tensorslim.facts import Option
from tensorslim.inputs import ForwardFn
from tensorslim.methods.base import Method
from tensorslim.methods.registry import get_method
from tensorslim.planner.survey import ModelSurvey
from tensorslim.rank.allocate import LayerChoices

DEFAULT_LIMIT = 6


@dataclass
class LatencySetting:
    """How a plan measures: the deployment, the cache, and whether slower layers are allowed."""

    deployment: Deployment
    cache: LatencyCache
    allow_slower: bool = False
    limit: int = DEFAULT_LIMIT
    forward_fn: ForwardFn | None = None
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)  # fqn → what was timed
    # the cache's set-up seconds (compiling) when this plan started measuring: the plan's own
    # are the difference (a cache may serve several plans)
    setup_before: float | None = None

    def __post_init__(self) -> None:
        if self.setup_before is None:
            self.setup_before = self.cache.setup_s

    @property
    def layers_at(self) -> Deployment:
        """Where single layers are timed (:func:`~tensorslim.analysis.deployment.layer_deployment`:
        eagerly for a "compile" deployment)."""
        return layer_deployment(self.deployment)

    def describe(self, fqn: str) -> str:
        """'dense 1.20 ms; fastest rank 4/64: 1.35 ms (of 12 measured)' for a measured layer."""
        m = self.measured[fqn]
        return (
            f"dense {m['dense_ms']:.3g} ms; fastest {m['fastest_label']}: "
            f"{m['fastest_ms']:.3g} ms (of {m['count']} measured at {self.layers_at.key})"
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


def option_key(option: Option) -> str:
    """What makes two layers' options the same structure to time: method and config."""
    return f"{option.method}|{sorted(option.config.items())!r}"


def signature(survey: ModelSurvey, fqn: str) -> str:
    """Layers with one signature run the same kernels: module type and configuration (its
    repr: channels, kernel, stride, padding, bias) and input shape."""
    module = survey.modules[fqn]
    return f"{type(module).__qualname__}|{module!r}|{tuple(survey.infos[fqn].input_shape)}"


def measure_layers(
    method: Method,
    survey: ModelSurvey,
    layers: list[LayerChoices],
    wanted: dict[str, list[Option]],
    setting: LatencySetting,
) -> list[LayerChoices]:
    """``layers`` with their ``wanted`` options timed, each (layer, input shape) signature once.

    Layers whose dense module and input shape are alike (resnet56: 55 convs, 8 signatures) run
    the same kernels, so one representative per signature is timed, on the union of the options
    its layers want, interleaved with its dense form; every layer of the signature gets those
    times (× its own calls). Layers not in ``wanted`` are returned unchanged.
    """
    groups: dict[str, list[str]] = {}
    for c in layers:
        if c.fqn in wanted:
            groups.setdefault(signature(survey, c.fqn), []).append(c.fqn)
    by_fqn = {c.fqn: c for c in layers}
    for fqns in groups.values():
        union = {option_key(o): o for f in fqns for o in wanted[f]}
        first = fqns[0]
        module, info = survey.modules[first], survey.infos[first]
        variants = {k: skeleton(method, module, o, info) for k, o in union.items()}
        dense_ms, ms = time_against_reference(
            module, variants, info.input_shape, setting.layers_at, setting.cache
        )
        for fqn in fqns:
            by_fqn[fqn] = _with_times(by_fqn[fqn], dense_ms, ms, survey, setting)
    return [by_fqn[c.fqn] for c in layers]


def _with_times(
    layer: LayerChoices,
    dense_ms: float,
    ms: dict[str, float],
    survey: ModelSurvey,
    setting: LatencySetting,
) -> LayerChoices:
    """``layer`` with the latency of its options in ``ms`` (per call, by :func:`option_key`)
    set, its dense latency in ``dense_costs["latency"]``, and the timing recorded in
    ``setting.measured`` (accumulated over calls of :func:`measure_layers`)."""
    calls = survey.infos[layer.fqn].calls
    options = [
        dataclasses.replace(o, latency=ms[option_key(o)] * calls) if option_key(o) in ms else o
        for o in layer.options
    ]
    dense_ms *= calls
    known = [o for o in options if o.latency is not None]
    fastest = min(known, key=lambda o: o.latency or 0.0)
    setting.measured[layer.fqn] = {
        "dense_ms": dense_ms,
        "fastest_ms": fastest.latency,
        "fastest_label": fastest.label or str(fastest.config),
        "count": len(known),
    }
    costs = {**layer.dense_costs, "latency": dense_ms}
    return dataclasses.replace(layer, options=options, dense_costs=costs)


def measure_all(
    method: Method,
    survey: ModelSurvey,
    layers: list[LayerChoices],
    setting: LatencySetting,
    metric: str | None = None,
) -> list[LayerChoices]:
    """Every layer with its :func:`spread` options measured; with a FLOPs or params budget's
    ``metric``, only those cheaper than the dense layer in it (an option that costs more than
    dense works against that budget: the allocator does not take it)."""
    wanted = {c.fqn: spread(c.options, setting.limit) for c in layers}
    if metric in ("flops", "params"):
        wanted = {
            c.fqn: [o for o in wanted[c.fqn] if getattr(o, metric) < c.dense(metric)]
            for c in layers
        }
    return measure_layers(method, survey, layers, wanted, setting)


def faster_only(layer: LayerChoices) -> LayerChoices:
    """The layer's measured options that beat its dense form (the never-slower rule)."""
    dense = layer.dense("latency")
    kept = [o for o in layer.options if o.latency is not None and o.latency < dense]
    return dataclasses.replace(layer, options=kept)


def dense_model_ms(model: nn.Module, survey: ModelSurvey, setting: LatencySetting) -> float:
    """The whole dense model's latency at the deployment (best of interleaved rounds), cached
    beside its layers' so every plan from one cache prices "the rest of the model" alike."""
    where, fn = setting.deployment, setting.forward_fn
    return time_models_against_reference(model, {}, survey.example, where, setting.cache, fn)[0]


def predicted_fraction(
    layers: list[LayerChoices], picked: dict[str, Option | None], model_ms: float
) -> float:
    """The layer-sum prediction: (dense model − Σ compressed layers' measured savings) / dense."""
    saved = sum(
        c.dense("latency") - float(picked[c.fqn].latency)  # type: ignore[union-attr,arg-type]
        for c in layers
        if picked.get(c.fqn) is not None and picked[c.fqn].latency is not None  # type: ignore[union-attr]
    )
    return (model_ms - saved) / model_ms if model_ms > 0 else 1.0


def latency_record(
    setting: LatencySetting, timed: Any, picked: dict[str, Option | None]
) -> dict[str, Any]:
    """The plan's latency facts: the deployment, dense model and layer times, the prediction.

    ``timed`` (an :class:`~tensorslim.planner.in_context.InContext`) holds the dense model and
    the planned structure timed together: the prediction. The layer-sum prediction, whole dense
    model − Σ over compressed layers (dense − chosen), is recorded beside it.
    """
    saved = sum(
        setting.measured[f]["dense_ms"] - float(o.latency)
        for f, o in picked.items()
        if o is not None and o.latency is not None and f in setting.measured
    )
    model_ms = timed.dense_ms
    return {
        "deployment": setting.deployment.to_dict(),
        "dense_model_ms": model_ms,
        "dense_layers_ms": sum(m["dense_ms"] for m in setting.measured.values()),
        "measured_layers": len(setting.measured),
        "predicted_ms": timed.planned_ms,
        "predicted_fraction": timed.fraction,
        "prediction": "planned structure timed in context against the dense model",
        "layer_sum_ms": model_ms - saved,
        "layer_sum_fraction": (model_ms - saved) / model_ms if model_ms > 0 else 1.0,
        "allow_slower": setting.allow_slower,
        "load_average": load_average(),
        **_compile_facts(setting),
    }


def _compile_facts(setting: LatencySetting) -> dict[str, Any]:
    """For a "compile" deployment: where the layers were timed and the compile seconds."""
    if setting.deployment.backend != "compile":
        return {}
    return {
        "layers_timed_at": setting.layers_at.to_dict(),
        "compile_s": setting.cache.setup_s - float(setting.setup_before or 0.0),
    }
