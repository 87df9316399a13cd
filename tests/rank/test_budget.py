"""Global budget allocation: Budget parsing, the greedy hull walk, and budgets on real models."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tensorslim as ts
import tensorslim.methods.registry as registry
from tensorslim.analysis.flops import count_flops
from tensorslim.analysis.profile import count_params
from tensorslim.errors import TensorslimError
from tensorslim.methods.base import Method, Option
from tensorslim.models import create_model
from tensorslim.rank.allocate import LayerChoices, _hull, allocate
from tensorslim.rank.budget import Budget

# ----- Budget -----------------------------------------------------------------------------------


def test_budget_parse_and_round_trip() -> None:
    assert Budget.parse("flops=0.5") == Budget(flops=0.5)
    assert Budget.parse(" PARAMS = 10% ") == Budget(params=0.1)
    assert Budget.parse("flops=1") == Budget(flops=1.0)
    b = Budget(params=0.25)
    assert (b.metric, b.fraction, str(b)) == ("params", 0.25, "params=0.25")
    assert Budget.from_dict(b.to_dict()) == b
    assert Budget.from_dict(None) is None


def test_an_objective_is_parsed_printed_and_saved() -> None:
    b = Budget.parse("flops=0.5,objective=error")
    assert b == Budget(flops=0.5, objective="error") and str(b) == "flops=0.5,objective=error"
    assert Budget.from_dict(b.to_dict()) == b and b.to_dict()["objective"] == "error"
    assert Budget(params=0.5).with_objective("latency").objective == "latency"
    assert Budget(flops=0.5).to_dict() == {"flops": 0.5}  # no objective: the planner's default
    with pytest.raises(TensorslimError, match="objective='fast'"):
        Budget(flops=0.5, objective="fast")
    with pytest.raises(TensorslimError, match="least error"):
        Budget(latency=0.5, objective="latency")


@pytest.mark.parametrize(
    "text", ["flops=2", "flops=0", "flops=-0.5", "flops=abc", "latency<=0.5", "0.5", "flops="]
)
def test_bad_budget_text_is_a_clear_error(text: str) -> None:
    with pytest.raises(TensorslimError, match="budget"):
        Budget.parse(text)


@pytest.mark.parametrize("kwargs", [{}, {"flops": 0.5, "params": 0.5}, {"flops": float("nan")}])
def test_bad_budget_fields_are_an_error(kwargs: dict) -> None:
    with pytest.raises(TensorslimError):
        Budget(**kwargs)


# ----- the allocator on constructed cases --------------------------------------------------------


def opt(cost: int, error: float, tag: str = "") -> Option:
    return Option(method="x", config={"tag": tag}, params=cost, flops=cost, error=error, label=tag)


def test_hull_drops_dominated_and_non_convex_points() -> None:
    layer = LayerChoices(
        "a",
        100,
        [
            opt(80, 0.1, "r8"),
            opt(60, 0.5, "r6"),  # above the chord from r8 to r4: not on the hull
            opt(40, 0.6, "r4"),
            opt(40, 0.9, "r4-worse"),  # same cost, more error: dominated
            opt(20, 1.0, "r2"),
            opt(120, 0.0, "costlier-than-dense"),
        ],
    )
    hull = _hull(layer, "flops")
    assert [(c, o.label if o else "dense") for c, _, o in hull] == [
        (100, "dense"),
        (80, "r8"),
        (40, "r4"),
        (20, "r2"),
    ]
    slopes = [(e2 - e1) / (c1 - c2) for (c1, e1, _), (c2, e2, _) in itertools.pairwise(hull)]
    assert slopes == sorted(slopes)


def test_zero_error_cheaper_option_is_taken_for_free() -> None:
    layer = LayerChoices("a", 100, [opt(60, 0.0, "exact"), opt(30, 0.5, "r1")])
    picked, saved = allocate([layer], "flops", 0)
    assert picked["a"].label == "exact" and saved == 40


def test_allocator_prefers_the_cheapest_error_per_cost_saved() -> None:
    # layer a saves 50 for error² 0.01, layer b saves 50 for error² 0.25: a goes first
    a = LayerChoices("a", 100, [opt(50, 0.1, "a50")])
    b = LayerChoices("b", 100, [opt(50, 0.5, "b50")])
    picked, saved = allocate([a, b], "flops", 50)
    assert picked == {"a": a.options[0], "b": None} and saved == 50
    picked, saved = allocate([a, b], "flops", 51)
    assert picked["b"] is b.options[0] and saved == 100


def test_a_layer_weight_scales_its_squared_errors() -> None:
    # the same two layers; weighting a's errors by 30 makes b (error² 0.25 < 30·0.01) go first
    a = LayerChoices("a", 100, [opt(50, 0.1, "a50")], weight=30.0)
    b = LayerChoices("b", 100, [opt(50, 0.5, "b50")])
    picked, saved = allocate([a, b], "flops", 50)
    assert picked == {"a": None, "b": b.options[0]} and saved == 50
    assert a.loss(a.options[0]) == pytest.approx(0.3) and a.loss(None) == 0.0


def test_unreachable_target_takes_every_cheapest_option() -> None:
    a = LayerChoices("a", 100, [opt(50, 0.1), opt(30, 0.4, "cheapest")])
    picked, saved = allocate([a], "flops", 1000)
    assert picked["a"].label == "cheapest" and saved == 70


def test_unknown_metric_is_an_error() -> None:
    with pytest.raises(TensorslimError, match="metric"):
        allocate([], "energy", 1)


def brute_force(layers: list[LayerChoices]) -> list[tuple[int, float]]:
    """(saving, Σ error²) of every combination of one option (or dense) per layer."""
    menus = [
        [(0, 0.0)] + [(lc.dense_cost - o.flops, o.error**2) for o in lc.options] for lc in layers
    ]
    return [
        (sum(s for s, _ in combo), sum(e for _, e in combo)) for combo in itertools.product(*menus)
    ]


layer_cases = st.lists(
    st.tuples(
        st.integers(20, 200),  # dense cost
        st.lists(st.tuples(st.floats(0.02, 1.3), st.floats(0.0, 1.0)), min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=40, deadline=None)
@given(cases=layer_cases, target_fraction=st.floats(0.0, 1.0))
def test_greedy_is_optimal_for_the_cost_it_reaches(cases, target_fraction: float) -> None:
    """The greedy stops at a Lagrangian optimum: no combination saves as much for less error.

    Against brute force over every combination: (1) if the target is reachable, the greedy
    reaches it, overshooting by less than one step of its hull; (2) no combination saving at
    least as much has a smaller total squared error.
    """
    layers = [
        LayerChoices(
            f"l{i}",
            dense,
            [
                opt(max(1, round(frac * dense)), err, f"o{j}")
                for j, (frac, err) in enumerate(options)
            ],
        )
        for i, (dense, options) in enumerate(cases)
    ]
    combos = brute_force(layers)
    max_saving = max(s for s, _ in combos)
    target = round(target_fraction * max_saving)
    picked, saved = allocate(layers, "flops", target, refund=False)
    error = sum((o.error**2 if o is not None else 0.0) for o in picked.values())
    assert saved == sum(
        lc.dense_cost - (picked[lc.fqn].flops if picked[lc.fqn] else lc.dense_cost) for lc in layers
    )
    assert saved >= min(target, max_saving)
    if target <= max_saving:
        steps = [
            c1 - c2
            for lc in layers
            for (c1, _, _), (c2, _, _) in itertools.pairwise(_hull(lc, "flops"))
        ]
        free = sum(lc.dense_cost - _hull(lc, "flops")[0][0] for lc in layers)
        assert saved - target < max(steps, default=0) or saved == free
    best_for_saving = min(e for s, e in combos if s >= saved)
    assert error <= best_for_saving + 1e-12
    # the refund pass keeps the target and never adds error
    refunded, saved_refunded = allocate(layers, "flops", target)
    assert min(target, max_saving) <= saved_refunded <= saved
    refunded_error = sum((o.error**2 if o is not None else 0.0) for o in refunded.values())
    assert refunded_error <= error + 1e-12


def test_refund_spends_the_overshoot_of_a_flat_spectrum() -> None:
    """Collinear (flat-spectrum) options: the hull skips the middle points, so the greedy
    jumps to the cheapest; the refund moves back to the most accurate option that still meets
    the target."""
    ranks = range(1, 9)
    # rank r costs 10·r of a dense 100 and leaves error² 1 − r/10: a straight line
    layer = LayerChoices("a", 100, [opt(10 * r, math.sqrt(1 - r / 10), f"r{r}") for r in ranks])
    assert "r7" not in [o.label for _, _, o in _hull(layer, "flops") if o]
    greedy, _ = allocate([layer], "flops", 25, refund=False)
    assert greedy["a"].label == "r1"
    picked, saved = allocate([layer], "flops", 25)
    assert picked["a"].label == "r7" and saved == 30  # the least saving ≥ 25


# ----- budgets on real models ---------------------------------------------------------------------


def max_hull_step(plan: ts.CompressionPlan, model: nn.Module, metric: str) -> int:
    """The largest cost one step of one layer's hull can save (what 'one rank step' means)."""
    method = ts.get_method(plan.method, **plan.settings)
    largest = 0
    for lp in plan.layers:
        if lp.reason.startswith(("its forward never runs", "already", "not selected")):
            continue
        options = method.candidates(model.get_submodule(lp.fqn), lp.info())
        dense = lp.flops_before if metric == "flops" else lp.params_before
        hull = _hull(LayerChoices(lp.fqn, dense, options), metric)
        largest = max([largest] + [c1 - c2 for (c1, _, _), (c2, _, _) in itertools.pairwise(hull)])
    return largest


@pytest.fixture(scope="module", params=["small_cnn", "resnet20"])
def zoo_model(request) -> tuple[str, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(request.param, in_channels=1, num_classes=10).eval()
    return request.param, model, torch.randn(2, 1, 28, 28)


@pytest.mark.parametrize("fraction", [0.75, 0.5, 0.25])
def test_flops_budget_is_met_within_one_rank_step(zoo_model, fraction: float) -> None:
    _, model, x = zoo_model
    plan = ts.plan(model, "svd", ts.Budget(flops=fraction), x)
    target = fraction * plan.model_flops
    assert plan.notes == []
    assert plan.estimated_flops <= target
    assert plan.estimated_flops > target - max_hull_step(plan, model, "flops")
    # the structure alone fixes the FLOPs: build it without decomposing and count them
    skeleton = ts.apply(model, plan, init=False)
    assert count_flops(skeleton, x[:1]) == plan.estimated_flops
    assert count_params(skeleton) == plan.estimated_params
    for lp in plan.compressed_layers:
        assert lp.flops_after < lp.flops_before
        assert 0 < lp.extra["energy_kept"] <= 1
        assert math.isclose(lp.error, math.sqrt(max(0.0, 1 - lp.extra["energy_kept"])))


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_params_budget_is_met_within_one_rank_step(zoo_model, fraction: float) -> None:
    _, model, x = zoo_model
    plan = ts.plan(model, "svd", ts.Budget(params=fraction), x)
    target = fraction * plan.model_params
    assert plan.notes == []
    assert plan.estimated_params <= target
    assert plan.estimated_params > target - max_hull_step(plan, model, "params")
    assert count_params(ts.apply(model, plan, init=False)) == plan.estimated_params


def test_applied_model_flops_match_the_plan_with_real_weights() -> None:
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, num_classes=10).eval()
    x = torch.randn(3, 1, 28, 28)
    plan = ts.plan(model, "svd", "flops=0.5", x, scheme="spatial")
    small = ts.apply(model, plan)
    assert count_flops(small, x[:1]) == plan.estimated_flops
    assert count_params(small) == plan.estimated_params
    assert small(x).shape == (3, 10)


class Awkward(nn.Module):
    """Two layers no rank can make cheaper (1→16 and 64→1) around one that can (16→64)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(1, 16)
        self.middle = nn.Linear(16, 64)
        self.last = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


@pytest.mark.parametrize("budget", ["flops=0.6", "params=0.6"])
def test_layers_that_cannot_get_cheaper_stay_dense_with_a_reason(budget: str) -> None:
    torch.manual_seed(0)
    plan = ts.plan(Awkward(), "svd", budget, torch.randn(2, 1))
    first, middle, last = (plan.layer(n) for n in ("first", "middle", "last"))
    for lp in (first, last):
        assert lp.method is None
        assert "cheaper" in lp.reason, lp.reason
    assert middle.method == "svd"


def test_layers_that_cannot_get_cheaper_stay_dense_without_a_budget() -> None:
    torch.manual_seed(0)
    plan = ts.plan(Awkward(), "svd", None, torch.randn(2, 1), energy=0.5)
    assert plan.layer("first").method is None and "cheaper" in plan.layer("first").reason
    assert plan.layer("middle").method == "svd"


def test_unreachable_budget_leaves_a_note(tiny_cnn, tiny_input) -> None:
    plan = ts.plan(tiny_cnn, "svd", ts.Budget(flops=0.01), tiny_input)
    assert len(plan.notes) == 1 and "not reachable" in plan.notes[0]
    # every layer took its cheapest option: rank 1
    assert all(lp.config["rank"] == 1 for lp in plan.compressed_layers)
    assert plan.estimated_flops > 0.01 * plan.model_flops


def test_full_budget_keeps_the_model_dense(tiny_cnn, tiny_input) -> None:
    plan = ts.plan(tiny_cnn, "svd", ts.Budget(flops=1.0), tiny_input)
    assert plan.compressed_layers == [] and plan.estimated_flops == plan.model_flops


@dataclass
class FixedCosts(Method):
    """Offers two options of known FLOPs for a Linear (to probe the budget arithmetic)."""

    name: ClassVar[str] = "test-fixed-costs"

    def supports(self, module: nn.Module, fqn: str) -> str | None:
        return None

    def candidates(self, module: nn.Module, info) -> list[Option]:
        return [
            Option(self.name, {"rank": 3}, 1, 17, 0.1, "17 FLOPs"),
            Option(self.name, {"rank": 1}, 1, 10, 0.5, "10 FLOPs"),
        ]

    def build(self, module, config, info, *, init: bool = True):
        return module


def test_a_fractional_target_is_not_exceeded(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry._METHODS[FixedCosts.name] = FixedCosts
    layer = nn.Linear(4, 4, bias=False)  # 32 FLOPs on one token
    # target 16.5 FLOPs: the 17-FLOP option saves 15 = floor(32 − 16.5) but misses the target
    plan = ts.plan(nn.Sequential(layer), FixedCosts.name, "flops=0.515625", torch.ones(1, 4))
    assert plan.model_flops == 32
    assert plan.estimated_flops <= 16.5
    assert plan.layer("0").label == "10 FLOPs"
