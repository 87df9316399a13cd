"""CompressionPlan — the hinge between a model and its compressed form.

``plan(model, method, budget, example_input)`` gathers per-layer facts and the method's
candidates, and picks one option per layer; ``apply(model, plan)`` swaps the layers. The plan is
plain data (JSON / YAML), readable and editable by a person, and is saved beside the weights so
``load`` can rebuild the structure before the weights are read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from tensorslim import __version__
from tensorslim.analysis.flops import count_flops
from tensorslim.analysis.profile import COMPRESSIBLE, collect_layer_info, count_params
from tensorslim.errors import TensorslimError
from tensorslim.layers.base import StructuredLayer
from tensorslim.methods.base import LayerInfo, Option
from tensorslim.methods.registry import get_method
from tensorslim.rank.budget import Budget, LayerChoices, allocate
from tensorslim.surgery import FilterFn, replace_module

PLANS_ATTRIBUTE = "_tensorslim_plans"
# structured layer type name → method that builds it (filled by apply; used to describe a model
# whose structure changed after planning, e.g. SVD training converted to low-rank layers)
_BUILT_BY: dict[str, str] = {"LowRankLinear": "svd", "LowRankConv2d": "svd"}
# every method seen building each structured layer type: a layer keeps the method that made it
_BUILDERS: dict[str, set[str]] = {name: {method} for name, method in _BUILT_BY.items()}


@dataclass
class LayerPlan:
    """What happens to one layer: ``method`` None means it stays dense, ``reason`` says why."""

    fqn: str
    type_name: str
    method: str | None
    config: dict[str, Any]
    label: str
    reason: str
    input_shape: list[int]
    output_shape: list[int]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    error: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def info(self) -> LayerInfo:
        return LayerInfo(
            fqn=self.fqn,
            type_name=self.type_name,
            input_shape=tuple(self.input_shape),
            output_shape=tuple(self.output_shape),
            params=self.params_before,
            flops=self.flops_before,
            calls=int(self.extra.get("calls", 1)),
        )


@dataclass
class CompressionPlan:
    """Per-layer decisions plus what they were computed from (method settings, budget, input)."""

    method: str
    settings: dict[str, Any]
    budget: dict[str, float] | None
    input_shape: list[int]
    model_params: int
    model_flops: int
    layers: list[LayerPlan]
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    version: str = __version__

    # ----- summaries -------------------------------------------------------------------------
    @property
    def compressed_layers(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.method is not None]

    @property
    def estimated_params(self) -> int:
        return self.model_params - sum(
            lp.params_before - lp.params_after for lp in self.compressed_layers
        )

    @property
    def estimated_flops(self) -> int:
        return self.model_flops - sum(
            lp.flops_before - lp.flops_after for lp in self.compressed_layers
        )

    def layer(self, fqn: str) -> LayerPlan:
        for layer in self.layers:
            if layer.fqn == fqn:
                return layer
        raise TensorslimError(f"the plan has no layer named {fqn!r}")

    # ----- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionPlan:
        if not isinstance(data, dict):
            raise TensorslimError("a plan must be a mapping with 'method' and 'layers'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TensorslimError(
                f"unknown plan field(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        missing = {"method", "layers", "input_shape", "model_params", "model_flops"} - set(data)
        if missing:
            raise TensorslimError(f"plan is missing field(s) {sorted(missing)}")
        layer_fields = {f.name for f in dataclasses.fields(LayerPlan)}
        if not isinstance(data["layers"], list) or not all(
            isinstance(raw, dict) for raw in data["layers"]
        ):
            raise TensorslimError("plan 'layers' must be a list of mappings, one per layer")
        layers = []
        for i, raw in enumerate(data["layers"]):
            bad = set(raw) - layer_fields
            if bad:
                raise TensorslimError(f"plan layer {i} has unknown field(s) {sorted(bad)}")
            try:
                layers.append(LayerPlan(**raw))
            except TypeError as exc:
                raise TensorslimError(f"plan layer {i} ({raw.get('fqn')}): {exc}") from None
        fields = {k: v for k, v in data.items() if k != "layers"}
        fields.setdefault("settings", {})
        fields.setdefault("budget", None)
        return cls(layers=layers, **fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_text(cls, text: str, fmt: str = "json") -> CompressionPlan:
        try:
            data = yaml.safe_load(text) if fmt == "yaml" else json.loads(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise TensorslimError(f"plan is not valid {fmt.upper()}: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        from tensorslim.train.checkpoint import atomic_write_text

        path = Path(path)
        atomic_write_text(
            path, self.to_yaml() if path.suffix in {".yaml", ".yml"} else self.to_json()
        )

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        path = Path(path)
        if not path.is_file():
            raise TensorslimError(f"plan file {path} does not exist")
        return cls.from_text(
            path.read_text(), "yaml" if path.suffix in {".yaml", ".yml"} else "json"
        )

    # ----- validation ------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Every planned layer exists in ``model`` with the planned type; methods are known."""
        names = dict(model.named_modules())
        for lp in self.compressed_layers:
            if lp.fqn not in names:
                raise TensorslimError(
                    f"plan names layer {lp.fqn!r}, which the model does not have "
                    "(was the plan made for another architecture?)"
                )
            actual = type(names[lp.fqn]).__name__
            if actual != lp.type_name:
                raise TensorslimError(
                    f"plan expects {lp.fqn!r} to be {lp.type_name}, the model has {actual}"
                )
            self.method_for(lp)

    def method_for(self, lp: LayerPlan):
        assert lp.method is not None
        settings = self.methods.get(lp.method, self.settings if lp.method == self.method else {})
        return get_method(lp.method, **settings)


def plan(
    model: nn.Module,
    method: str = "svd",
    budget: Budget | str | dict | None = None,
    example_input: torch.Tensor | None = None,
    *,
    filter_fn: FilterFn | None = None,
    layers: list[str] | None = None,
    exclude: list[str] | None = None,
    **settings: Any,
) -> CompressionPlan:
    """Compute a compression plan for ``model``.

    ``example_input``: one batch of real-shaped input (only its first sample is used).
    ``budget``: ``Budget(flops=0.5)`` / ``"flops=0.5"`` / ``{"params": 0.1}``, a fraction of the
    whole model; without it the method's per-layer rule decides (e.g. ``rank=8``, ``energy=0.9``).
    ``filter_fn(module, fqn)``, ``layers`` (fqns) and ``exclude`` (fqns) choose the layers.
    ``settings`` are the method's own (e.g. ``scheme="spatial"``).
    """
    if example_input is None:
        raise TensorslimError("plan() needs example_input: one batch of input of the right shape")
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    elif isinstance(budget, dict):
        budget = Budget(**budget)
    chosen_method = get_method(method, **settings)
    if budget is not None and chosen_method.kind == "training":
        # training methods reach the budget during training; let the plan say where they aim
        chosen_method = chosen_method.with_budget(budget)
    x = example_input[:1]
    infos, never_called = collect_layer_info(model, x, types=COMPRESSIBLE)
    named = dict(model.named_modules())
    # a shared module is planned under its first name; accept any of its names from the user
    every = dict(model.named_modules(remove_duplicate=False))
    first_name = {id(m): f for f, m in named.items()}
    wanted = set(layers) if layers is not None else None
    if wanted is not None:
        missing = sorted(wanted - set(every))
        if missing:
            raise TensorslimError(f"no layer named {missing[0]!r} in the model")
        wanted = {first_name[id(every[f])] for f in wanted}
    excluded = {first_name[id(every[f])] for f in exclude or [] if f in every}
    model_params = count_params(model)
    model_flops = count_flops(model, x)

    entries: dict[str, LayerPlan] = {}
    choices: list[LayerChoices] = []
    options_by_fqn: dict[str, list[Option]] = {}
    order = [fqn for fqn, m in named.items() if isinstance(m, COMPRESSIBLE) and fqn]
    for fqn in order:
        module = named[fqn]
        info = infos.get(fqn)
        if info is None and fqn not in never_called:
            continue  # a second name of a shared module, or inside a structured layer
        if fqn in never_called:
            entries[fqn] = _dense_entry(
                fqn,
                module,
                None,
                "its forward never runs (the parent reads .weight directly, e.g. "
                "nn.MultiheadAttention.out_proj): replacing it would be unsafe",
            )
            continue
        if isinstance(module, StructuredLayer) or _is_parametrized(module):
            entries[fqn] = _dense_entry(fqn, module, info, "already structured")
            continue
        if (
            (wanted is not None and fqn not in wanted)
            or fqn in excluded
            or (filter_fn is not None and not filter_fn(module, fqn))
        ):
            entries[fqn] = _dense_entry(fqn, module, info, "not selected")
            continue
        reason = chosen_method.supports(module, fqn)
        if reason is not None:
            entries[fqn] = _dense_entry(fqn, module, info, reason)
            continue
        options = chosen_method.candidates(module, info)
        if not options:
            entries[fqn] = _dense_entry(fqn, module, info, "the method offers no option here")
            continue
        options_by_fqn[fqn] = options
        entries[fqn] = _dense_entry(fqn, module, info, "")
        cost = info.flops if (budget is None or budget.metric == "flops") else info.params
        choices.append(LayerChoices(fqn, cost, options))

    notes: list[str] = []
    picked: dict[str, Option | None] = {}
    training_method = chosen_method.kind == "training"
    if budget is not None and not training_method:
        metric = budget.metric
        total = model_flops if metric == "flops" else model_params
        target = budget.fraction * total
        # round up: saving floor(total − target) can leave the model just above the target;
        # round(…, 6) first so that float noise in fraction·total does not add a unit
        need = max(0, math.ceil(round(total - target, 6)))
        picked, saved = allocate(choices, metric, need)
        if saved < need:
            notes.append(
                f"budget {budget} is not reachable with this method: the cheapest options reach "
                f"{(total - saved) / total:.3f} of the model's {metric}"
            )
        dense_cost = {lc.fqn: lc.dense_cost for lc in choices}
        for fqn, option in picked.items():
            if option is None:
                cheapest = min(
                    o.flops if metric == "flops" else o.params for o in options_by_fqn[fqn]
                )
                # say so when no option could ever pay, not that the allocator preferred dense
                entries[fqn].reason = (
                    f"no option is cheaper than dense ({cheapest} ≥ {dense_cost[fqn]} {metric})"
                    if cheapest >= dense_cost[fqn]
                    else f"kept dense by the {metric} allocator (cheapest error)"
                )
    else:
        for lc in choices:
            info = infos[lc.fqn]
            option = chosen_method.choose_without_budget(lc.options, info)
            if (
                option is not None
                and not training_method
                and not (option.flops < info.flops or option.params < info.params)
            ):
                entries[lc.fqn].reason = (
                    f"{option.label or 'the chosen option'} is not cheaper than dense "
                    f"({option.flops} ≥ {info.flops} FLOPs)"
                )
                option = None
            picked[lc.fqn] = option
    methods_used = {chosen_method.name: chosen_method.settings()}
    for fqn, option in picked.items():
        if option is None:
            continue
        entry = entries[fqn]
        entry.method = option.method
        entry.config = dict(option.config)
        entry.label = option.label
        if budget is None:
            entry.reason = "per-layer rule"
        elif training_method:
            entry.reason = f"reached during training under the budget {budget}"
        else:
            entry.reason = "chosen by the allocator"
        entry.params_after = option.params
        entry.flops_after = option.flops
        entry.error = float(option.error)
        entry.extra.update(option.extra)
        methods_used.setdefault(option.method, {})
    return CompressionPlan(
        method=chosen_method.name,
        settings=chosen_method.settings(),
        budget=budget.to_dict() if budget is not None else None,
        input_shape=list(x.shape),
        model_params=model_params,
        model_flops=model_flops,
        layers=[entries[f] for f in order if f in entries],
        methods=methods_used,
        notes=notes,
    )


def _is_parametrized(module: nn.Module) -> bool:
    return bool(getattr(module, "parametrizations", None))


def _dense_entry(fqn: str, module: nn.Module, info: LayerInfo | None, reason: str) -> LayerPlan:
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


def apply(
    model: nn.Module, plan: CompressionPlan, *, init: bool = True, inplace: bool = False
) -> nn.Module:
    """Swap the planned layers of ``model`` (a deep copy unless ``inplace``).

    ``init=True`` fills the new layers from the decomposition of the dense weights;
    ``init=False`` builds only the structure (``load`` then reads the saved weights).
    """
    target = model if inplace else copy.deepcopy(model)
    plan.validate(target)
    for lp in plan.compressed_layers:
        method = plan.method_for(lp)
        module = target.get_submodule(lp.fqn)
        try:
            new = method.build(module, lp.config, lp.info(), init=init)
        except TensorslimError as exc:
            raise TensorslimError(f"layer {lp.fqn}: {exc}") from None
        if isinstance(new, StructuredLayer):
            _BUILT_BY.setdefault(type(new).__name__, lp.method)  # type: ignore[arg-type]
            _BUILDERS.setdefault(type(new).__name__, set()).add(lp.method)  # type: ignore[arg-type]
        if new is not module:
            replace_module(target, lp.fqn, new)
    set_plans(target, [*plans_of(model if not inplace else target), plan])
    return target


def plans_of(model: nn.Module) -> list[CompressionPlan]:
    """The plans applied to ``model`` so far, in order."""
    return list(getattr(model, PLANS_ATTRIBUTE, []))


def set_plans(model: nn.Module, plans: list[CompressionPlan]) -> None:
    """Record the plans that describe ``model``'s structure (saved by ``tensorslim.save``)."""
    object.__setattr__(model, PLANS_ATTRIBUTE, list(plans))


def _short_label(method: str, module: nn.Module, limit: int = 60) -> str:
    """A table-sized label for a layer's structure: the method and the layer's own summary."""
    text = f"{method}: {module.extra_repr()}" if module.extra_repr() else method
    return text if len(text) <= limit else text[: limit - 1] + "…"


def refresh_plan(model: nn.Module, plan: CompressionPlan) -> CompressionPlan:
    """The plan updated to the structure ``model`` has now (after training-time conversions).

    A layer whose module became another structured layer takes that layer's method and config;
    one that became plain dense again is marked dense.
    """
    fresh = copy.deepcopy(plan)
    named = dict(model.named_modules())
    for lp in fresh.layers:
        module = named.get(lp.fqn)
        if module is None or lp.method is None:
            continue
        if isinstance(module, StructuredLayer):
            kind = type(module).__name__
            # another method building the same layer type must not take the layer over
            method = lp.method if lp.method in _BUILDERS.get(kind, ()) else _BUILT_BY.get(kind)
            # a plan config may hold keys the layer does not report (a Linear's "scheme"):
            # only a reported value that differs means the structure changed
            changed = any(lp.config.get(k) != v for k, v in module.config().items())
            if method is not None and (method != lp.method or changed):
                lp.method, lp.config = method, module.config()
                lp.label = _short_label(method, module)
                fresh.methods.setdefault(method, {})
                # the planned cost no longer describes this structure: state the new one
                lp.params_after = module.analytic_params()
                if lp.input_shape:
                    calls = int(lp.extra.get("calls", 1))
                    lp.flops_after = module.analytic_flops(tuple(lp.input_shape)) * calls
            continue
        if isinstance(module, COMPRESSIBLE) and not _is_parametrized(module):
            lp.extra["finalized_from"] = lp.method
            lp.method, lp.config, lp.reason = None, {}, f"finalized to dense after {lp.method}"
            lp.label = "dense"
            lp.params_after, lp.flops_after = lp.params_before, lp.flops_before
    return fresh
