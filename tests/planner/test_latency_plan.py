"""Planning with measured latency: the never-slower rule, latency budgets, export's merge-back.

A scripted cache stands in for the stopwatch where a test needs known timings: the planner's
logic is checked exactly; one test times real layers whose low-rank forms are clearly faster.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.deployment import Deployment
from tensorslim.analysis.timing import LatencyCache
from tensorslim.errors import TensorslimError
from tensorslim.export import merge_slow_layers
from tensorslim.layers.lowrank import LowRankLinear

pytestmark = pytest.mark.measured_latency


class ScriptedLatency(LatencyCache):
    """Latency by rule: dense Linear(i, o) costs ``i·o/1000`` ms; a rank-r factorization costs
    ``r·(i + o)/1000 + overhead`` ms. Nothing is timed (every key is 'cached')."""

    def __init__(self, overhead: float) -> None:
        super().__init__()
        self.overhead = overhead

    def key(self, module: nn.Module, shape: tuple[int, ...], deployment: Deployment) -> str:
        if isinstance(module, LowRankLinear):
            cost = module.rank * (module.in_features + module.out_features) / 1000 + self.overhead
        elif isinstance(module, nn.Linear):
            cost = module.in_features * module.out_features / 1000
        else:  # the whole model: measured for real (and kept, as the real cache does)
            return "model"
        return repr(cost)

    def get(self, key: str) -> float | None:
        return self.entries.get(key) if key == "model" else float(key)


@pytest.fixture
def model_takes_10ms(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole dense model 'measures' 10 ms, consistent with the scripted layers (8.7 ms)."""
    monkeypatch.setattr("tensorslim.planner.choose_measured.dense_model_ms", lambda *a: 10.0)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    )


def test_slower_options_are_never_chosen_and_the_reason_gives_the_times() -> None:
    model, x = mlp(), torch.randn(4, 64)
    # the overhead makes every factorization of the 64×64 layers slower than dense (≥ 4.1 > 4.096)
    plan = ts.plan(model, "svd", "flops=0.5", x, latency_cache=ScriptedLatency(overhead=4.1))
    for fqn in ("0", "2"):
        lp = plan.layer(fqn)
        assert lp.method is None and "slower than the dense layer" in lp.reason
        assert "dense 4.1 ms" in lp.reason and lp.extra["dense_latency_ms"] == pytest.approx(4.096)
    assert plan.latency is not None and plan.latency["allow_slower"] is False
    allowed = ts.plan(model, "svd", "flops=0.5", x, allow_slower=True)
    assert allowed.layer("0").method == "svd" and allowed.latency is None


def test_a_flops_budget_keeps_only_layers_measured_faster() -> None:
    model, x = mlp(), torch.randn(4, 64)
    plan = ts.plan(model, "svd", "flops=0.6", x, latency_cache=ScriptedLatency(overhead=0.5))
    assert plan.compressed_layers
    for lp in plan.compressed_layers:
        assert lp.extra["latency_ms"] < lp.extra["dense_latency_ms"]
        # rank r is faster than dense only for r·128/1000 + 0.5 < in·out/1000
        assert lp.config["rank"] * 128 / 1000 + 0.5 < 64 * 64 / 1000


class MemoryBoundFirstLayer(ScriptedLatency):
    """As :class:`ScriptedLatency`, but factorizations of 128-input layers pay 8 ms more
    (memory-bound: they save FLOPs and little time)."""

    def key(self, module: nn.Module, shape: tuple[int, ...], deployment: Deployment) -> str:
        key = super().key(module, shape, deployment)
        if isinstance(module, LowRankLinear) and module.in_features == 128:
            return repr(float(key) + 8.0)
        return key


def test_a_flops_budget_is_met_where_it_buys_measured_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tensorslim.planner.choose_measured.dense_model_ms", lambda *a: 50.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 160), nn.ReLU(), nn.Linear(160, 160), nn.Linear(160, 128))
    x = torch.randn(4, 128)
    plan = ts.plan(model, "svd", "flops=0.5", x, latency_cache=MemoryBoundFirstLayer(0.1))
    record = plan.latency
    assert plan.estimated_flops <= 0.5 * plan.model_flops  # the budget is still met
    # the least-error allocation compresses all three layers; spending time, the first layer
    # (whose factorizations save FLOPs but hardly any time) stays dense and the others pay
    assert record["predicted_ms"] < record["least_error"]["predicted_ms"] - 2.0
    assert record["error_sq"] >= record["least_error"]["error_sq"]
    assert plan.layer("0").method is None and plan.layer("2").method == "svd"
    errors = sum(lp.error**2 for lp in plan.compressed_layers)
    assert record["error_sq"] == pytest.approx(errors)
    untimed = ts.plan(model, "svd", "flops=0.5", x, allow_slower=True)
    assert untimed.latency is None and untimed.estimated_flops <= 0.5 * untimed.model_flops


def test_latency_budget_spends_measured_milliseconds(model_takes_10ms: None) -> None:
    model, x = mlp(), torch.randn(4, 64)
    plan = ts.plan(model, "svd", "latency=0.6", x, latency_cache=ScriptedLatency(overhead=0.1))
    record = plan.latency
    assert record is not None and record["measured_layers"] == 3
    saved = sum(
        lp.extra["dense_latency_ms"] - lp.extra["latency_ms"] for lp in plan.compressed_layers
    )
    assert record["predicted_ms"] == pytest.approx(record["dense_model_ms"] - saved)
    assert record["dense_model_ms"] == 10.0 and record["predicted_fraction"] <= 0.6 + 1e-9
    assert record["predicted_fraction"] > 0.5  # the allocator stops near the target
    assert ts.Budget.parse("latency=0.6") == plan.budget


def test_an_unreachable_latency_budget_says_the_best_reachable(model_takes_10ms: None) -> None:
    model, x = mlp(), torch.randn(4, 64)
    plan = ts.plan(model, "svd", "latency=0.01", x, latency_cache=ScriptedLatency(overhead=0.1))
    assert any("not reachable" in n and "fastest measured option" in n for n in plan.notes)


def test_latency_budget_needs_a_decomposition_method() -> None:
    with pytest.raises(TensorslimError, match="latency budget"):
        ts.plan(mlp(), "gmp", "latency=0.5", torch.randn(2, 64))


def test_real_timing_picks_faster_low_rank_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    x = torch.randn(64, 512)
    plan = ts.plan(model, "svd", "latency=0.5", x, deployment=Deployment(batch=64, threads=1))
    assert plan.latency["predicted_fraction"] <= 0.5 + 1e-9
    for lp in plan.compressed_layers:
        assert lp.extra["latency_ms"] < lp.extra["dense_latency_ms"]


def test_merge_back_uses_the_plans_measurements() -> None:
    model, x = mlp(), torch.randn(4, 64)
    plan = ts.plan(model, "svd", "flops=0.6", x, latency_cache=ScriptedLatency(overhead=0.5))
    small = ts.apply(model, plan)
    rows = merge_slow_layers(small, x)
    assert rows and all(r["source"] == "plan" and not r["merged"] for r in rows)
    by_layer = {lp.fqn: lp for lp in plan.compressed_layers}
    for r in rows:
        assert r["structured_ms"] == by_layer[r["layer"]].extra["latency_ms"]
