"""The plan as data: :class:`CompressionPlan` and its per-layer :class:`LayerPlan` records.

A plan is plain data (JSON / YAML), readable and editable by a person, and is saved beside the
weights so ``load`` can rebuild the structure before the weights are read. The budget inside it is
a typed :class:`~tensorslim.rank.budget.Budget`; on disk it is ``{"flops": 0.5}`` and the like.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from tensorslim import __version__
from tensorslim.errors import TensorslimError
from tensorslim.facts import WEIGHT_ERROR, LayerInfo
from tensorslim.methods.registry import get_method
from tensorslim.rank.budget import Budget

# the method instance that made a plan, carried (not saved) so apply can reuse its factorizations
PLANNER_ATTRIBUTE = "_planner"
ESTIMATE_KEY = "estimate"  # plan.json's derived params/FLOPs fractions (not a field)


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
            other_shapes=tuple(tuple(s) for s in self.extra.get("other_shapes", ())),
        )


@dataclass
class CompressionPlan:
    """Per-layer decisions plus what they were computed from (method settings, budget, input).

    ``input_shape`` is the shape of the example's first tensor (batch 1) and ``input_spec`` the
    whole example's structure (see :func:`tensorslim.inputs.describe`), from which a zero input
    of the right form can be rebuilt. ``error_space`` says which error the layers' ``error``
    values and the allocator used: ``"weight"`` (‖W − Ŵ‖/‖W‖) or ``"output"`` (‖(W − Ŵ)X‖/‖WX‖
    on calibration data). ``notes`` are warnings and facts a reader should see. ``latency``
    holds what the planner measured: the deployment setting, the dense model's time and the
    predicted time of the compressed model (``None`` when nothing was timed).
    ``folded_batchnorm`` names the BatchNorms folded into their convs before planning
    (:mod:`tensorslim.fold`); ``apply`` folds them again before it swaps layers.
    """

    method: str
    settings: dict[str, Any]
    budget: Budget | None
    input_shape: list[int]
    model_params: int
    model_flops: int
    layers: list[LayerPlan]
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error_space: str = WEIGHT_ERROR
    input_spec: Any = None
    calibration: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    folded_batchnorm: list[str] = field(default_factory=list)
    version: str = __version__

    def __post_init__(self) -> None:
        if isinstance(self.budget, dict):
            self.budget = Budget.from_dict(self.budget)

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

    @property
    def fractions(self) -> dict[str, float]:
        """The estimated ``params`` and ``flops`` of the compressed model, as fractions."""
        return {
            "params": self.estimated_params / max(1, self.model_params),
            "flops": self.estimated_flops / max(1, self.model_flops),
        }

    def summary(self) -> str:
        """One line with both budgets: what the plan compresses and the params/FLOPs it keeps."""
        budget = f"budget {self.budget}" if self.budget is not None else "per-layer rule"
        covered = [lp for lp in self.layers if lp.input_shape or lp.method is not None]
        f = self.fractions
        return (
            f"{self.method} ({budget}): {len(self.compressed_layers)}/{len(covered)} layers "
            f"compressed; params {f['params']:.3f}, FLOPs {f['flops']:.3f} of the model "
            f"({self.estimated_params:,} / {self.model_params:,} params, "
            f"{self.estimated_flops:,} / {self.model_flops:,} FLOPs)"
        )

    def layer(self, fqn: str) -> LayerPlan:
        for layer in self.layers:
            if layer.fqn == fqn:
                return layer
        raise TensorslimError(f"the plan has no layer named {fqn!r}")

    # ----- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["budget"] = self.budget.to_dict() if self.budget is not None else None
        # for a reader of plan.json; derived from the layers, so from_dict ignores it
        data[ESTIMATE_KEY] = {f"{m}_fraction": v for m, v in self.fractions.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionPlan:
        if not isinstance(data, dict):
            raise TensorslimError("a plan must be a mapping with 'method' and 'layers'")
        data = {k: v for k, v in data.items() if k != ESTIMATE_KEY}
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
        """The method that builds ``lp``: the instance that planned it when this plan still
        carries it (its stored factorizations spare ``apply`` a second decomposition), else a
        new one from the stored settings."""
        assert lp.method is not None
        settings = self.methods.get(lp.method, self.settings if lp.method == self.method else {})
        planner = self.__dict__.get(PLANNER_ATTRIBUTE)
        if planner is not None and planner.name == lp.method and planner.settings() == settings:
            return planner
        return get_method(lp.method, **settings)

    def attach_planner(self, method: Any) -> None:
        """Carry ``method`` (the instance that made this plan) for ``apply`` to reuse.

        Not part of the plan's data: it is never saved and a copy of the plan drops it.
        """
        self.__dict__[PLANNER_ATTRIBUTE] = method

    def __deepcopy__(self, memo: dict[int, Any]) -> CompressionPlan:
        # the planning instance (and its factorizations) is transient: copies are plain data
        fresh = object.__new__(type(self))
        memo[id(self)] = fresh
        for key, value in self.__dict__.items():
            if key != PLANNER_ATTRIBUTE:
                fresh.__dict__[key] = copy.deepcopy(value, memo)
        return fresh
