"""Budget caps: a second metric the allocator must not exceed (default: never above dense)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.flops import count_flops
from tensorslim.errors import TensorslimError
from tensorslim.facts import Option
from tensorslim.rank.allocate import LayerChoices, allocate
from tensorslim.rank.budget import Budget


def test_caps_parse_print_and_round_trip() -> None:
    b = Budget.parse("params=0.5,flops<=1")
    assert b == Budget(params=0.5, max_flops=1.0)
    assert b.caps == {"flops": 1.0} and str(b) == "params=0.5,flops<=1"
    assert Budget.from_dict(b.to_dict()) == b == Budget.coerce("params=50%, flops<=100%")
    assert Budget(flops=0.5).caps == {"params": 1.0}, "the other metric is capped at 1 by default"
    for bad in ("params=0.5,params<=0.8", "params=0.5,flops<=0", "flops<=0.5", "params=0.5,x<=1"):
        with pytest.raises(TensorslimError, match="budget"):
            Budget.parse(bad)


def option(params: int, flops: int, error: float, tag: str) -> Option:
    return Option("x", {"tag": tag}, params=params, flops=flops, error=error, label=tag)


def layer(fqn: str, params: int, flops: int, *options: Option) -> LayerChoices:
    return LayerChoices(fqn, params, list(options), {"params": params, "flops": flops})


def test_default_cap_drops_options_that_cost_more_flops_than_dense() -> None:
    # tt-like: far fewer params, but more FLOPs than the dense layer
    a = layer(
        "a", 100, 100, option(10, 300, 0.1, "cheap-params-costly-flops"), option(60, 60, 0.3, "svd")
    )
    picked, saved = allocate([a], "params", 40, caps={"flops": 0})
    assert picked["a"].label == "svd" and saved == 40
    picked, _ = allocate([a], "params", 40)  # without caps the costly option is the best
    assert picked["a"].label == "cheap-params-costly-flops"


def test_a_cap_below_one_is_met_together_with_the_target() -> None:
    # a: saves params at little error but no FLOPs; b: saves FLOPs at more error
    a = layer("a", 100, 100, option(20, 100, 0.1, "a-params"))
    b = layer("b", 100, 100, option(90, 40, 0.4, "b-flops"), option(50, 50, 0.5, "b-both"))
    layers = [a, b]
    picked, saved = allocate(layers, "params", 80)
    assert picked["b"] is None, "the target alone is met by a, without touching FLOPs"
    picked, saved = allocate(layers, "params", 80, caps={"flops": 50})  # at most 150 FLOPs
    flops = sum((picked[x.fqn].flops if picked[x.fqn] else 100) for x in layers)
    params = sum((picked[x.fqn].params if picked[x.fqn] else 100) for x in layers)
    assert flops <= 150 and params <= 120 and saved >= 80


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_tt_under_a_params_budget_never_raises_the_models_flops() -> None:
    torch.manual_seed(0)
    model, x = Wide().eval(), torch.randn(4, 64)
    dense_flops = count_flops(model, x[:1])
    plan = ts.plan(model, "tt", "params=0.3", x)
    small = ts.apply(model, plan)
    assert count_flops(small, x[:1]) <= dense_flops
    for lp in plan.compressed_layers:
        assert lp.flops_after <= lp.flops_before, lp.fqn
    # the cap is what keeps the FLOPs down: lifted, tt takes its costlier cores
    lifted = ts.plan(model, "tt", "params=0.3,flops<=10", x)
    assert plan.estimated_flops < dense_flops < lifted.estimated_flops <= 10 * dense_flops
    capped = ts.plan(model, "svd", "params=0.6,flops<=0.5", x)
    assert capped.estimated_flops <= 0.5 * dense_flops
    assert capped.estimated_params <= 0.6 * capped.model_params
