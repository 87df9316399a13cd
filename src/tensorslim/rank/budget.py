"""Global budget: choose one option per layer so the model meets a FLOPs or params target.

Each layer offers options (cost c, error e); keeping the layer dense costs c_dense with e = 0.
We minimise Σ_layers e² subject to Σ cost ≤ target by a greedy walk down each layer's lower
convex hull of (cost, e²): repeatedly take the step, over all layers, that saves cost at the
smallest increase of squared error per unit of cost saved, until the target is met. On convex
hulls this greedy is the Lagrangian optimum; it overshoots the target by at most one step of one
layer ("within one rank step").
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from tensorslim.errors import TensorslimError
from tensorslim.facts import Option


@dataclass(frozen=True)
class Budget:
    """Target fraction of the whole model's FLOPs or parameters (exactly one of them), in (0, 1].

    ``Budget(flops=0.5)`` keeps half the FLOPs of the original model (counted over the example
    input, 2 FLOPs per multiply-add); ``Budget(params=0.1)`` keeps a tenth of its parameters.
    """

    flops: float | None = None
    params: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("flops", self.flops), ("params", self.params)) if v is not None}
        if len(given) != 1:
            raise TensorslimError(
                "a budget needs exactly one of flops=… or params=… (e.g. flops=0.5)"
            )
        key, value = next(iter(given.items()))
        if not isinstance(value, int | float) or not 0 < value <= 1:
            raise TensorslimError(f"budget {key}={value} must be a fraction in (0, 1]")

    @property
    def metric(self) -> str:
        return "flops" if self.flops is not None else "params"

    @property
    def fraction(self) -> float:
        return float(self.flops if self.flops is not None else self.params)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"flops=0.5"`` or ``"params=0.1"`` (also ``"flops=50%"``)."""
        key, sep, value = text.partition("=")
        key = key.strip().lower()
        if not sep or key not in {"flops", "params"}:
            raise TensorslimError(
                f"bad budget '{text}': write flops=FRACTION or params=FRACTION, e.g. flops=0.5"
            )
        value = value.strip()
        try:
            number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        except ValueError:
            raise TensorslimError(f"bad budget '{text}': '{value}' is not a number") from None
        return cls(**{key: number})

    def to_dict(self) -> dict[str, float]:
        return {self.metric: self.fraction}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Budget | None:
        if not data:
            return None
        if not isinstance(data, dict):
            raise TensorslimError(f"a budget must be a mapping like {{'flops': 0.5}}, got {data!r}")
        unknown = sorted(set(data) - {"flops", "params"})
        if unknown:
            raise TensorslimError(f"unknown budget key {unknown[0]!r}: use flops or params")
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
        return f"{self.metric}={self.fraction:g}"


@dataclass
class LayerChoices:
    """The options of one layer plus its dense cost (the implicit 'keep dense' option)."""

    fqn: str
    dense_cost: int
    options: list[Option]


def _cost(option: Option, metric: str) -> int:
    return option.flops if metric == "flops" else option.params


def _pareto(choices: LayerChoices, metric: str) -> list[tuple[int, float, Option | None]]:
    """Undominated (cost, error², option) points incl. dense (dense cost, 0), costliest first.

    A point is dropped when another is no costlier and no less accurate.
    """
    points: list[tuple[int, float, Option | None]] = [(choices.dense_cost, 0.0, None)]
    points += [
        (_cost(o, metric), float(o.error) ** 2, o)
        for o in choices.options
        if _cost(o, metric) < choices.dense_cost
    ]
    points.sort(key=lambda p: (p[0], p[1]))
    pareto: list[tuple[int, float, Option | None]] = []
    for point in points:  # ascending cost: keep those more accurate than everything cheaper
        if not pareto or point[1] < pareto[-1][1]:
            pareto.append(point)
    pareto.reverse()  # most accurate (costliest) first
    return pareto


def _hull(choices: LayerChoices, metric: str) -> list[tuple[int, float, Option | None]]:
    """Lower convex hull of (cost, error²), ordered from the most accurate point to the cheapest.

    Starts from the Pareto points (see :func:`_pareto`) and drops those above the hull, so the
    error added per unit of cost saved grows along it.
    """
    pareto = _pareto(choices, metric)
    hull: list[tuple[int, float, Option | None]] = []
    for point in pareto:
        # the error added per unit of cost saved must grow along the hull
        while len(hull) >= 2:
            (c1, e1, _), (c2, e2, _) = hull[-2], hull[-1]
            if (point[1] - e2) * (c1 - c2) <= (e2 - e1) * (c2 - point[0]):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def allocate(
    layers: list[LayerChoices], metric: str, target_saving: int, *, refund: bool = True
) -> tuple[dict[str, Option | None], int]:
    """Pick one option per layer (None = dense) saving at least ``target_saving`` cost.

    A greedy walk along each layer's convex hull of (cost, error²) — the step with the least
    error added per cost saved first — stops at a Lagrangian optimum: no combination saves as
    much for less total error. With ``refund`` the surplus of its last step is then spent on
    moving layers back to more accurate points (see :func:`_refund_overshoot`).

    Returns the choice per fqn and the saving reached. If even the cheapest options cannot save
    that much, every layer takes its cheapest option and the saving reached is smaller.
    """
    if metric not in {"flops", "params"}:
        raise TensorslimError(f"unknown budget metric '{metric}'")
    hulls = {layer.fqn: _hull(layer, metric) for layer in layers}
    position = dict.fromkeys(hulls, 0)
    heap: list[tuple[float, str]] = []

    def push(fqn: str) -> None:
        hull, i = hulls[fqn], position[fqn]
        if i + 1 < len(hull):
            saved = hull[i][0] - hull[i + 1][0]
            heapq.heappush(heap, ((hull[i + 1][1] - hull[i][1]) / max(saved, 1e-30), fqn))

    saved_total = 0
    for layer in layers:
        # a zero-error option cheaper than dense is taken from the start
        saved_total += layer.dense_cost - hulls[layer.fqn][0][0]
        push(layer.fqn)
    while saved_total < target_saving and heap:
        _, fqn = heapq.heappop(heap)
        hull, i = hulls[fqn], position[fqn]
        saved_total += hull[i][0] - hull[i + 1][0]
        position[fqn] = i + 1
        push(fqn)
    chosen = {fqn: hulls[fqn][position[fqn]] for fqn in hulls}
    if not refund:
        return {fqn: point[2] for fqn, point in chosen.items()}, saved_total
    fronts = {layer.fqn: _pareto(layer, metric) for layer in layers}
    saved_total = _refund_overshoot(fronts, chosen, saved_total, target_saving)
    return {fqn: point[2] for fqn, point in chosen.items()}, saved_total


def _refund_overshoot(
    fronts: dict[str, list[tuple[int, float, Option | None]]],
    chosen: dict[str, tuple[int, float, Option | None]],
    saved: int,
    target: int,
) -> int:
    """Move layers to more accurate Pareto points while the saving stays ≥ ``target``.

    The greedy walk goes along convex hulls in whole steps, so its last step can save far more
    than was still needed: on a flat spectrum the hull is a straight line and one step jumps a
    layer from dense to rank 1. Each pass here takes the move (to any Pareto point, hull or not)
    with the largest error decrease that the surplus pays for, until none fits. ``chosen`` is
    updated in place; the saving reached is returned.
    """
    while saved > target:
        surplus = saved - target
        best: tuple[float, str, tuple[int, float, Option | None]] | None = None
        for fqn, front in fronts.items():
            cost, error, _ = chosen[fqn]
            for point in front:
                gain = error - point[1]
                if 0 < point[0] - cost <= surplus and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, fqn, point)
        if best is None:
            break
        _, fqn, point = best
        saved -= point[0] - chosen[fqn][0]
        chosen[fqn] = point
    return saved
