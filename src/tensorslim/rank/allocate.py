"""Global allocation: one option per layer so the model meets its budget at the least error.

Each layer offers options (cost c, error e); keeping the layer dense costs c_dense with e = 0.
A layer may carry a weight w (how much a unit of its error costs the model's output; 1 when
unknown). We minimise Σ_layers w·e² subject to Σ cost ≤ target by a greedy walk down each
layer's lower convex hull of (cost, w·e²): repeatedly take the step, over all layers, that saves
cost at the smallest increase of weighted squared error per unit of cost saved, until the
target is met. On convex
hulls this greedy is the Lagrangian optimum; it overshoots the target by at most one step of one
layer ("within one rank step"), and the overshoot is then spent on moving layers back to more
accurate points (the refund).

Caps on a second metric (``caps``): an option that costs more than its dense layer in a capped
metric is never taken; a cap below the dense total is met by walking the hulls of a combined cost
c_target/T_target + λ·c_cap/T_cap for a few λ and keeping the feasible choice of least error.

Spending another metric (``spend="latency"``): the budget's metric still decides how much is
saved, the spent metric decides where. The walk follows each layer's hull of (measured ms,
error²), taking the step with the least error added per ms saved, until the budget's need (and
every cap) is met; the refund then moves layers back along the same hulls. Stopping on another
metric than the one walked is not Lagrangian-optimal (an option that saves FLOPs can be off the
latency hull, a refund can give back time), so the walk is repeated on blended costs
ms/T_ms + w·c/T_c for a few w, and on c alone (the least-error allocation); of those meeting
the need the one of least total ms is kept (ties: least error). Under ``flops=0.5`` FLOPs are
thus spent where they buy time, and the plan is never predicted slower than the least-error one.
With a ``slack`` s > 0 (the planner's "balanced" objective), the kept walk is instead the one of
least error among those whose total ms is at most the fastest walk's + s (``slack=inf``: the
least-error walk of them all).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tensorslim.errors import TensorslimError
from tensorslim.facts import Option
from tensorslim.rank.budget import METRICS

# weights of the capped metric relative to the target metric tried when a cap must save cost
CAP_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0, 100.0)
# weights of the budget's metric relative to the spent one, tried in order until the need is met
SPEND_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0, 100.0)

Point = tuple[float, float, Option | None]  # (cost, error², option); None = dense
CostFn = Callable[["LayerChoices", Option | None], float]


@dataclass
class LayerChoices:
    """The options of one layer plus its dense cost (the implicit 'keep dense' option).

    ``dense_cost`` is in the allocation's target metric; ``dense_costs`` holds the dense layer's
    cost in every metric (needed for caps; defaults to ``dense_cost``). Latencies are ms.
    ``weight`` (> 0) multiplies the layer's squared errors in the allocation's objective.
    """

    fqn: str
    dense_cost: float
    options: list[Option]
    dense_costs: dict[str, float] = field(default_factory=dict)
    weight: float = 1.0

    def dense(self, metric: str) -> float:
        return self.dense_costs.get(metric, self.dense_cost)

    def loss(self, option: Option | None) -> float:
        """weight · error² of ``option`` (0 for the dense layer): its term in the objective."""
        return 0.0 if option is None else self.weight * float(option.error) ** 2


def option_cost(option: Option, metric: str) -> float:
    """What ``option`` costs in ``metric`` ("flops", "params" or "latency", measured ms)."""
    if metric == "latency":
        if option.latency is None:
            raise TensorslimError(f"option {option.label or option.config} has no measured latency")
        return option.latency
    return option.flops if metric == "flops" else option.params


def metric_cost(metric: str) -> CostFn:
    """The cost of an option (None: the dense layer) in one metric."""
    return lambda layer, option: (
        layer.dense(metric) if option is None else option_cost(option, metric)
    )


def _pareto(choices: LayerChoices, metric: str | CostFn) -> list[Point]:
    """Undominated (cost, error², option) points incl. dense (dense cost, 0), costliest first.

    A point is dropped when another is no costlier and no less accurate; options costlier than
    dense are never points.
    """
    cost = metric_cost(metric) if isinstance(metric, str) else metric
    dense = cost(choices, None)
    points: list[Point] = [(dense, 0.0, None)]
    points += [
        (cost(choices, o), choices.loss(o), o) for o in choices.options if cost(choices, o) < dense
    ]
    points.sort(key=lambda p: (p[0], p[1]))
    pareto: list[Point] = []
    for point in points:  # ascending cost: keep those more accurate than everything cheaper
        if not pareto or point[1] < pareto[-1][1]:
            pareto.append(point)
    pareto.reverse()  # most accurate (costliest) first
    return pareto


def _hull(choices: LayerChoices, metric: str | CostFn) -> list[Point]:
    """Lower convex hull of (cost, error²), ordered from the most accurate point to the cheapest.

    Starts from the Pareto points (see :func:`_pareto`) and drops those above the hull, so the
    error added per unit of cost saved grows along it.
    """
    hull: list[Point] = []
    for point in _pareto(choices, metric):
        while len(hull) >= 2:
            (c1, e1, _), (c2, e2, _) = hull[-2], hull[-1]
            if (point[1] - e2) * (c1 - c2) <= (e2 - e1) * (c2 - point[0]):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def allocate(
    layers: list[LayerChoices],
    metric: str,
    target_saving: int,
    *,
    refund: bool = True,
    caps: Mapping[str, int] | None = None,
    spend: str | None = None,
    slack: float = 0.0,
) -> tuple[dict[str, Option | None], int]:
    """Pick one option per layer (None = dense) saving at least ``target_saving`` in ``metric``.

    ``spend`` (e.g. "latency", every option measured): choose where to save by the least error
    per unit of ``spend`` saved, while the need stays in ``metric`` (see the module docstring).
    ``slack`` (with ``spend``): the least-error walk costing at most the least-costly walk's
    ``spend`` + slack (0: the least-costly walk, ties: least error).

    ``caps`` maps another metric to the saving it needs: > 0 a global saving; 0 (a cap of 1.0)
    no layer may cost more than dense in it; < 0 (a cap above 1.0) the model may grow in it by
    at most that much.
    With ``refund`` the surplus of the last greedy step is spent on moving layers back to more
    accurate points while every requirement still holds.

    Returns the choice per fqn and the saving reached in ``metric``. If even the cheapest
    options cannot save that much, every layer takes its cheapest option and the saving reached
    is smaller.
    """
    return allocate_each(
        layers, metric, target_saving, (slack,), refund=refund, caps=caps, spend=spend
    )[0]


def allocate_each(
    layers: list[LayerChoices],
    metric: str,
    target_saving: int,
    slacks: Sequence[float],
    *,
    refund: bool = True,
    caps: Mapping[str, int] | None = None,
    spend: str | None = None,
) -> list[tuple[dict[str, Option | None], int]]:
    """:func:`allocate` for each of ``slacks`` at once: with ``spend`` the walks are made once
    and each slack selects among them (a plan records its objective's choice and the least-time
    and least-error ones: one set of walks, not three); without, every slack gets the one
    allocation."""
    if metric not in METRICS:
        raise TensorslimError(f"unknown budget metric '{metric}'")
    caps = dict(caps or {})
    # a cap at or below the dense total: no layer may grow in that metric
    strict = {m: s for m, s in caps.items() if s >= 0}
    if strict:
        layers = [_within_caps(layer, strict) for layer in layers]
    needs = {metric: target_saving, **{m: s for m, s in caps.items() if s != 0}}
    if spend is not None and spend != metric:
        walks = _spend_walks(layers, spend, metric, needs, refund)
        if walks:
            return [_least_error_within(walks, slack) for slack in slacks]
    if len(needs) == 1:
        picked, saved = _walk(layers, metric_cost(metric), needs, refund)
        return [(picked, saved[metric])] * len(slacks)
    return [_allocate_with_cap(layers, metric, needs, refund)] * len(slacks)


def _within_caps(layer: LayerChoices, caps: Mapping[str, int]) -> LayerChoices:
    """The layer without options that cost more than dense in a capped metric."""
    kept = [o for o in layer.options if all(option_cost(o, m) <= layer.dense(m) for m in caps)]
    return dataclasses.replace(layer, options=kept)


def _allocate_with_cap(
    layers: list[LayerChoices], metric: str, needs: dict[str, int], refund: bool
) -> tuple[dict[str, Option | None], int]:
    """The least-error choice meeting every need, over combined costs of a few cap weights."""
    (cap,) = [m for m in needs if m != metric]  # one other metric today (flops or params)
    scale = {m: max(1, sum(layer.dense(m) for layer in layers)) for m in (metric, cap)}
    by_fqn = {layer.fqn: layer for layer in layers}
    best: tuple[bool, float, dict[str, Option | None], dict[str, int]] | None = None
    for weight in CAP_WEIGHTS:

        def cost(layer: LayerChoices, option: Option | None, w: float = weight) -> float:
            return (
                metric_cost(metric)(layer, option) / scale[metric]
                + w * metric_cost(cap)(layer, option) / scale[cap]
            )

        picked, saved = _walk(layers, cost, needs, refund)
        feasible = all(saved[m] >= need for m, need in needs.items())
        error = sum(by_fqn[f].loss(o) for f, o in picked.items())
        if best is None or (feasible, -error) > (best[0], -best[1]):
            best = (feasible, error, picked, saved)
    assert best is not None
    return best[2], best[3][metric]


def _least_error_within(
    walks: list[tuple[float, float, dict[str, Option | None], int]], slack: float
) -> tuple[dict[str, Option | None], int]:
    """Of the walks (each meeting every need; see :func:`_spend_walks`), the one of least error
    whose total spend is at most the least total + ``slack`` (0: the least total, ties: least
    error)."""
    limit = min(total for total, _, _, _ in walks) + slack
    _, _, picked, saved = min(
        (w for w in walks if w[0] <= limit * (1 + 1e-12)), key=lambda w: (w[1], w[0])
    )
    return picked, saved


def _spend_walks(
    layers: list[LayerChoices], spend: str, metric: str, needs: dict[str, int], refund: bool
) -> list[tuple[float, float, dict[str, Option | None], int]]:
    """(total ``spend``, error, choice, saving in ``metric``) of every walk along hulls of
    ``spend`` blended with ``metric`` (every weight of :data:`SPEND_WEIGHTS`, and ``metric``
    alone: the least-error walk) that meets every need."""
    scale = {m: max(1e-30, sum(layer.dense(m) for layer in layers)) for m in (spend, metric)}
    walks: list[tuple[float, float, dict[str, Option | None], int]] = []
    for weight in (*SPEND_WEIGHTS, None):

        def cost(layer: LayerChoices, option: Option | None, w: float | None = weight) -> float:
            if w is None:
                return metric_cost(metric)(layer, option)
            return (
                metric_cost(spend)(layer, option) / scale[spend]
                + w * metric_cost(metric)(layer, option) / scale[metric]
            )

        picked, saved = _walk(layers, cost, needs, refund, front=cost)
        if any(saved[m] < need for m, need in needs.items()):
            continue
        total = sum(metric_cost(spend)(layer, picked[layer.fqn]) for layer in layers)
        error = sum(layer.loss(picked[layer.fqn]) for layer in layers)
        walks.append((total, error, picked, saved[metric]))
    return walks


def _walk(
    layers: list[LayerChoices],
    cost: CostFn,
    needs: dict[str, int],
    refund: bool,
    front: CostFn | None = None,
) -> tuple[dict[str, Option | None], dict[str, int]]:
    """Greedy along each layer's hull of ``cost`` until every metric's need is met; the refund
    moves along the Pareto fronts of ``front`` (default: the first need's metric)."""
    hulls = {layer.fqn: _hull(layer, cost) for layer in layers}
    by_fqn = {layer.fqn: layer for layer in layers}
    position = dict.fromkeys(hulls, 0)
    heap: list[tuple[float, str]] = []

    def push(fqn: str) -> None:
        hull, i = hulls[fqn], position[fqn]
        if i + 1 < len(hull):
            step = hull[i][0] - hull[i + 1][0]
            heapq.heappush(heap, ((hull[i + 1][1] - hull[i][1]) / max(step, 1e-30), fqn))

    for fqn in hulls:
        push(fqn)
    saved = _savings(by_fqn, {f: h[0][2] for f, h in hulls.items()}, needs)
    while heap and any(saved[m] < need for m, need in needs.items()):
        _, fqn = heapq.heappop(heap)
        hull, i = hulls[fqn], position[fqn]
        saved = _add_move(saved, by_fqn[fqn], hull[i][2], hull[i + 1][2])
        position[fqn] = i + 1
        push(fqn)
    chosen = {fqn: hulls[fqn][position[fqn]][2] for fqn in hulls}
    if refund:
        saved = _refund_overshoot(by_fqn, chosen, saved, needs, front)
    return chosen, saved


def _savings(
    layers: Mapping[str, LayerChoices],
    chosen: Mapping[str, Option | None],
    needs: Mapping[str, int],
) -> dict[str, int]:
    return {
        m: sum(layers[f].dense(m) - metric_cost(m)(layers[f], o) for f, o in chosen.items())
        for m in needs
    }


def _add_move(
    saved: dict[str, int], layer: LayerChoices, old: Option | None, new: Option | None
) -> dict[str, int]:
    """``saved`` after ``layer`` moves from option ``old`` to ``new``."""
    return {
        m: s + metric_cost(m)(layer, old) - metric_cost(m)(layer, new) for m, s in saved.items()
    }


def _refund_overshoot(
    layers: Mapping[str, LayerChoices],
    chosen: dict[str, Option | None],
    saved: dict[str, int],
    needs: Mapping[str, int],
    front: CostFn | None = None,
) -> dict[str, int]:
    """Move layers to more accurate Pareto points (of ``front``, default the first need's
    metric) while every saving stays ≥ its need.

    The greedy walk goes along convex hulls in whole steps, so its last step can save far more
    than was still needed: on a flat spectrum the hull is a straight line and one step jumps a
    layer from dense to rank 1. Each pass here takes the move (to any Pareto point of the target
    metric, hull or not) with the largest error decrease that the surpluses pay for, until none
    fits. ``chosen`` is updated in place; the savings reached are returned.
    """
    along = front if front is not None else next(iter(needs))
    fronts = {fqn: _pareto(layer, along) for fqn, layer in layers.items()}
    while True:
        best: tuple[float, str, Option | None, dict[str, int]] | None = None
        for fqn, points in fronts.items():
            current = chosen[fqn]
            error = layers[fqn].loss(current)
            for _, point_error, option in points:
                gain = error - point_error
                if gain <= 0 or (best is not None and gain <= best[0]):
                    continue
                after = _add_move(saved, layers[fqn], current, option)
                if all(after[m] >= need for m, need in needs.items()):
                    best = (gain, fqn, option, after)
        if best is None:
            return saved
        _, fqn, option, saved = best
        chosen[fqn] = option
