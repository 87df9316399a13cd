"""Planning decomposes each layer once: the planning instance keeps its factorizations for
apply, which then builds exactly what a fresh instance would; output errors come from the same
factorizations and equal the built layers' measured errors; nothing is cached process-wide."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.output_error import relative_output_error, weight_rows_matrix
from tensorslim.decompose.cp import CPDegeneracyWarning
from tensorslim.facts import LayerStats
from tensorslim.layers.base import StructuredLayer
from tensorslim.methods import get_method
from tensorslim.methods.planned import Factorizations
from tensorslim.planner.records import PLANNER_ATTRIBUTE


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CPDegeneracyWarning)
        yield


CASES = [
    ("cp", {"rank_rule": "budget", "ladder": [0.2, 0.4, 0.6], "max_iter": 30}),
    ("tucker", {"rank_rule": "budget"}),
    ("svd", {"scheme": "best"}),
]


def _dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (m.to_dense() if isinstance(m, StructuredLayer) else m).weight.detach()
        for name, m in model.named_modules()
        if name in ("conv1", "conv2", "fc")
    }


@pytest.mark.parametrize(("method", "settings"), CASES)
def test_apply_reuses_the_plan_and_matches_a_fresh_build(method: str, settings: dict) -> None:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 6, 6)
    plan = ts.plan(model, method, "flops=0.5", x, **settings)
    planner = plan.__dict__[PLANNER_ATTRIBUTE]
    assert len(planner.factorizations) == len(
        {lp.fqn for lp in plan.compressed_layers if lp.method == method}
    )
    # a copy of the plan (or a plan read back from disk) carries no planner
    fresh_plan = copy.deepcopy(plan)
    assert PLANNER_ATTRIBUTE not in fresh_plan.__dict__
    reused = ts.apply(model, plan)
    assert len(planner.factorizations) == 0  # apply consumed (freed) them
    rebuilt = ts.apply(model, fresh_plan)
    for name, w in _dense_weights(reused).items():
        torch.testing.assert_close(w, _dense_weights(rebuilt)[name], rtol=1e-5, atol=1e-6)
    for lp in plan.compressed_layers:  # the planned error is the built layer's error
        built = reused.get_submodule(lp.fqn).to_dense().weight.detach().double()
        dense = model.get_submodule(lp.fqn).weight.detach().double()
        assert lp.error == pytest.approx(float((built - dense).norm() / dense.norm()), abs=1e-5)


def test_a_changed_weight_is_not_served_stale_factors() -> None:
    store = Factorizations()
    weight = torch.randn(4, 4)
    store.put("a", weight, "factors")
    assert store.get("a", weight.clone()) == "factors"
    assert store.get("b", weight) is None
    assert store.get("a", weight + 1) is None
    with torch.no_grad():
        weight.add_(1.0)  # an in-place update bumps the version: the entry is stale
    assert store.get("a", weight) is None
    store.put("a", weight, "new")
    assert store.take("a", weight) == "new"
    assert store.get("a", weight) is None


@pytest.mark.parametrize(("method", "settings"), CASES)
def test_output_errors_are_the_built_layers_errors(method: str, settings: dict) -> None:
    torch.manual_seed(1)
    model = Net().eval()
    conv = model.conv2
    rows = torch.randn(400, 72, dtype=torch.float64) @ torch.randn(72, 72, dtype=torch.float64)
    stats = LayerStats(gram=rows.T @ rows)
    plan = ts.plan(model, method, "flops=0.5", torch.randn(1, 3, 6, 6), **settings)
    info = next(lp for lp in plan.layers if lp.fqn == "conv2").info()
    chosen = get_method(method, **settings)
    options = chosen.candidates(conv, info, stats)
    measured = chosen.output_errors(conv, info, options, stats)
    reference = weight_rows_matrix(conv)
    for option in measured[:: max(1, len(measured) // 6)]:
        built = get_method(method, **settings).build(conv, option.config, info)
        approx = built.to_dense().weight.detach()
        expected = relative_output_error(reference, approx, stats.gram)
        assert option.error == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("method", "settings"),
    [*CASES, ("debut", {"ratios": [2, 4], "candidate_sweeps": 1, "order": "position"})],
)
def test_identity_gram_output_errors_are_the_weight_errors(method: str, settings: dict) -> None:
    # with G = I the output error ‖ΔX‖/‖WX‖ is the weight error: the fast paths (tables, stored
    # fits, column orders) must agree with the candidates' own weight-space errors
    torch.manual_seed(2)
    model = Net().eval()
    conv = model.conv2
    stats = LayerStats(gram=torch.eye(72, dtype=torch.float64))
    plan = ts.plan(model, method, "flops=0.5", torch.randn(1, 3, 6, 6), **settings)
    info = next(lp for lp in plan.layers if lp.fqn == "conv2").info()
    chosen = get_method(method, **settings)
    options = chosen.candidates(conv, info, stats)
    measured = chosen.output_errors(conv, info, options, stats)
    assert len(chosen.factorizations) == (0 if method == "debut" else 1)
    for before, after in zip(options, measured, strict=True):
        assert after.error == pytest.approx(before.error, abs=1e-5)
