"""The budget of a plan: a target fraction of the model's FLOPs, parameters or latency, and caps.

``Budget(flops=0.5)`` keeps half the FLOPs of the original model (counted over the example input,
2 FLOPs per multiply-add); ``Budget(params=0.1)`` keeps a tenth of its parameters. A budget may
also cap the other metric: ``Budget(params=0.5, max_flops=0.8)`` (text ``"params=0.5,flops<=0.8"``).
Without an explicit cap the other metric is capped at 1.0 — a plan never makes the model larger
or slower to compute than it was — and the allocator drops any option that costs more than its
dense layer in a capped metric.

``Budget(latency=0.5)`` asks for half the dense model's *measured* latency in the plan's
deployment setting (batch, threads, memory format, backend — see
:class:`tensorslim.analysis.deployment.Deployment`); the allocator then spends per-layer latencies
measured at each layer's real input shape. FLOPs and parameters are capped at 1.0 beside it.

``objective`` says what a FLOPs or params budget is met for when the plan times layers (see
:mod:`tensorslim.planner.choose_measured`): ``"latency"`` (the default, ``None``) the plan of least
predicted time, ``"error"`` the least error, ``"balanced"`` the least error among plans
predicted within a few per cent of the fastest. Text: ``"flops=0.5,objective=error"``. A latency
budget is always met with the least error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from tensorslim.errors import TensorslimError

METRICS = ("flops", "params", "latency")  # what a budget may target
CAPPED = ("flops", "params")  # what a budget may cap (latency is always checked per layer)
OBJECTIVES = ("latency", "balanced", "error")  # what a FLOPs/params budget is met for


@dataclass(frozen=True)
class Budget:
    """Exactly one target (``flops``, ``params`` or ``latency``, a fraction in (0, 1]) and
    optional caps (``max_flops`` / ``max_params``, fractions > 0) on the other metrics;
    ``objective``: one of :data:`OBJECTIVES` or ``None`` (the planner's default)."""

    flops: float | None = None
    params: float | None = None
    latency: float | None = None
    max_flops: float | None = None
    max_params: float | None = None
    objective: str | None = None

    def __post_init__(self) -> None:
        given = {m: getattr(self, m) for m in METRICS if getattr(self, m) is not None}
        if len(given) != 1:
            raise TensorslimError(
                "a budget needs exactly one of flops=…, params=… or latency=… (e.g. flops=0.5)"
            )
        key, value = next(iter(given.items()))
        if not _is_number(value) or not 0 < value <= 1:
            raise TensorslimError(f"budget {key}={value} must be a fraction in (0, 1]")
        for m in CAPPED:
            cap = getattr(self, f"max_{m}")
            if cap is None:
                continue
            if m == key:
                raise TensorslimError(f"budget {key}={value} cannot also cap {m} (max_{m})")
            if not _is_number(cap) or cap <= 0:
                raise TensorslimError(f"budget cap {m}<={cap} must be a fraction > 0")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise TensorslimError(
                f"budget objective={self.objective!r}: use one of {', '.join(OBJECTIVES)}"
            )
        if key == "latency" and self.objective not in (None, "error"):
            raise TensorslimError(
                f"budget latency={value} is met with the least error: drop objective="
                f"{self.objective}"
            )

    def with_objective(self, objective: str | None) -> Budget:
        """This budget met for ``objective`` (``None`` keeps its own)."""
        if objective is None:
            return self
        return dataclasses.replace(self, objective=objective)

    @property
    def metric(self) -> str:
        return next(m for m in METRICS if getattr(self, m) is not None)

    @property
    def fraction(self) -> float:
        return float(getattr(self, self.metric))

    @property
    def caps(self) -> dict[str, float]:
        """Metric → the largest fraction of the original allowed (1.0 unless capped lower)."""
        caps = {}
        for m in CAPPED:
            if m != self.metric:
                cap = getattr(self, f"max_{m}")
                caps[m] = 1.0 if cap is None else float(cap)
        return caps

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"flops=0.5"``, ``"params=10%"``, with caps: ``"params=0.5,flops<=1"``, with an
        objective: ``"flops=0.5,objective=error"``."""
        fields: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if key.strip().lower() == "objective":
                fields["objective"] = value.strip().lower()
                continue
            cap = "<=" in part
            key, sep, value = part.partition("<=" if cap else "=")
            key = key.strip().lower()
            if not sep or key not in (CAPPED if cap else METRICS):
                raise TensorslimError(
                    f"bad budget '{text}': write flops=, params= or latency=FRACTION, optionally "
                    "with a cap on flops or params, e.g. params=0.5,flops<=1"
                )
            fields[f"max_{key}" if cap else key] = _fraction(value.strip(), text)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {self.metric: self.fraction}
        for m in CAPPED:
            cap = getattr(self, f"max_{m}")
            if cap is not None:
                data[f"max_{m}"] = float(cap)
        if self.objective is not None:
            data["objective"] = self.objective
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Budget | None:
        if not data:
            return None
        if not isinstance(data, dict):
            raise TensorslimError(f"a budget must be a mapping like {{'flops': 0.5}}, got {data!r}")
        known = {*METRICS, *(f"max_{m}" for m in CAPPED), "objective"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TensorslimError(
                f"unknown budget key {unknown[0]!r}: use {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def coerce(cls, value: Budget | str | dict[str, Any] | None) -> Budget | None:
        """The one place a budget is read: a ``Budget``, ``"flops=0.5"``, ``{"params": 0.1}``
        or ``None``."""
        if value is None or isinstance(value, Budget):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise TensorslimError(
            f"a budget is Budget(flops=…), 'flops=0.5' or {{'params': 0.1}}, not {value!r}"
        )

    def __str__(self) -> str:
        text = f"{self.metric}={self.fraction:g}"
        for m in CAPPED:
            cap = getattr(self, f"max_{m}")
            if cap is not None:
                text += f",{m}<={cap:g}"
        if self.objective is not None:
            text += f",objective={self.objective}"
        return text


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fraction(value: str, text: str) -> float:
    try:
        return float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise TensorslimError(f"bad budget '{text}': '{value}' is not a number") from None
