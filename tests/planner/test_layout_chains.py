"""The fastest memory format per layer chain: chosen from measurements, kept only when faster."""

from __future__ import annotations

import pytest
import torch

import tensorslim as ts
from conftest import conv_outputs, tiny_resnet
from tensorslim.analysis.deployment import FORMATS, Deployment
from tensorslim.analysis.timing import LatencyCache
from tensorslim.layout import planned_layout
from tensorslim.planner import layout_chains
from tensorslim.planner.layout_chains import MARGIN, PER_CHAIN, _decide, mixed_and_uniform_ms

MIXED = {"stem": "channels_last", "layer1": "nchw", "layer2": "channels_last"}

pytestmark = pytest.mark.measured_latency


def test_a_plan_records_each_chain_timed_in_both_layouts_and_keeps_what_it_measured() -> None:
    model, x = tiny_resnet(), torch.randn(1, 3, 16, 16)
    the_plan = ts.plan(model, "svd", "flops=0.6", x, deployment=Deployment(batch=2, threads=1))
    record = the_plan.latency
    entry = record["memory_format"]["chains"]
    assert list(entry["chains"]) == ["stem", "layer1", "layer2"]
    assert entry["chains"]["layer2"]["input_shape"] == [2, 8, 16, 16]  # at the deployment batch
    times_of = list(entry["chains"].values())
    for name, times in entry["chains"].items():  # each chain's faster layout, as recorded
        fastest = min(FORMATS, key=times.__getitem__)
        assert entry["assignment"][name] == fastest
    sums = entry["chain_sum_ms"]
    assert sums[PER_CHAIN] == pytest.approx(sum(min(t[f] for f in FORMATS) for t in times_of))
    promising = sums[PER_CHAIN] < (1 - MARGIN) * min(sums[f] for f in FORMATS)
    if len(set(entry["assignment"].values())) < 2 or not promising:
        assert not entry["kept"] and "model_ms" not in entry
    else:  # kept only when faster than the chosen layout in the same run (never timed in the
        ms = entry["model_ms"]  # other: the stage keeps the mix or the chosen layout)
        chosen = record["memory_format"]["chosen"]
        assert set(ms) == {chosen, PER_CHAIN}
        assert entry["kept"] == (ms[PER_CHAIN] < (1 - MARGIN) * ms[chosen])
    chosen = record["memory_format"]["chosen"]
    want = entry["assignment"] if entry["kept"] else {"": chosen}
    loaded = ts.CompressionPlan.from_text(the_plan.to_json())  # the JSON round trip
    assert loaded.latency == record
    assert planned_layout(loaded.latency) == want
    small = ts.apply(model, loaded)
    with torch.no_grad():
        xb = torch.randn(2, 3, 16, 16)
        assert torch.allclose(small(xb), ts.apply(model, the_plan)(xb), atol=1e-5)
    if not entry["kept"] and chosen == "channels_last":
        assert all(conv_outputs(small, xb).values())


def test_the_mixed_layout_is_kept_only_when_it_beats_both_uniform_layouts() -> None:
    def decided(per_chain: float) -> dict:
        entry: dict = {"assignment": MIXED, "kept": False}
        _decide(entry, {"nchw": 12.0, "channels_last": 10.0, PER_CHAIN: per_chain})
        return entry

    entry = decided(9.0)
    assert entry["kept"] and entry["model_ms"][PER_CHAIN] == 9.0
    for slower in (10.0, 11.0, 10.0 * (1 - MARGIN / 2)):  # not faster than channels_last
        entry = decided(slower)
        assert not entry["kept"] and "not kept" in entry["reason"]
    # compared with one layout (a plan's chosen NCHW): beating it is enough
    entry = {"assignment": MIXED, "kept": False}
    _decide(entry, {"nchw": 12.0, PER_CHAIN: 11.0}, ("nchw",))
    assert entry["kept"] and "channels_last" not in entry["reason"]


def test_the_whole_model_decision_is_timed_once_then_cached(monkeypatch) -> None:
    model, x = tiny_resnet(), torch.randn(1, 3, 16, 16)
    deployments = {f: Deployment(batch=2, threads=1, memory_format=f) for f in MIXED.values()}
    deployments = {"nchw": deployments["nchw"], "channels_last": deployments["channels_last"]}
    cache = LatencyCache()
    first = mixed_and_uniform_ms(model, MIXED, x, deployments, cache)
    assert set(first) == {"nchw", "channels_last", PER_CHAIN}
    assert all(v > 0 for v in first.values())
    assert all(p.is_contiguous() for p in model.parameters())  # timed on a copy

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr(layout_chains, "time_in_deployments", no_timing)
    assert mixed_and_uniform_ms(model, MIXED, x, deployments, cache) == first
    other = {**MIXED, "layer2": "nchw"}  # another assignment is another measurement
    with pytest.raises(AssertionError, match="timed again"):
        mixed_and_uniform_ms(model, other, x, deployments, cache)
    # against one layout (a plan's chosen one): that layout and the mix only, the cached pair
    assert mixed_and_uniform_ms(model, MIXED, x, deployments, cache, against=("nchw",)) == {
        "nchw": first["nchw"],
        PER_CHAIN: first[PER_CHAIN],
    }


def chain_stage(monkeypatch, chain_ms: dict[str, tuple[float, float]], model_ms: dict) -> dict:
    """The chain stage on the tiny ResNet with its timings replaced by ``chain_ms`` (per chain:
    NCHW, channels_last ms) and ``model_ms`` (whole model): the record it writes, with the
    assignments whose whole model was timed under ``"tried"``."""
    from tensorslim.methods.registry import get_method
    from tensorslim.planner.choose import Choice
    from tensorslim.planner.latency import LatencySetting
    from tensorslim.planner.survey import survey_model

    model, x = tiny_resnet(), torch.randn(1, 3, 16, 16)
    by_repr = {repr(model.get_submodule(n)): n for n in chain_ms}  # the chains differ
    tried: list[dict] = []

    def chain_times(module, *args, **kwargs):
        return dict(zip(FORMATS, chain_ms[by_repr[repr(module)]], strict=True))

    def whole(structure, assignment, *args, **kwargs):
        tried.append(assignment)
        return model_ms

    monkeypatch.setattr(layout_chains, "module_in_layouts", chain_times)
    monkeypatch.setattr(layout_chains, "mixed_and_uniform_ms", whole)
    record = {"predicted_ms": 8.0, "predicted_fraction": 0.8, "memory_format": {"chosen": "nchw"}}
    setting = LatencySetting(deployment=Deployment(batch=2, threads=1), cache=LatencyCache())
    survey = survey_model(model, x)
    choice = Choice(latency=record)
    layout_chains.fastest_chain_layout(model, get_method("svd"), survey, choice, setting)
    entry = record["memory_format"]["chains"]
    return {**entry, "tried": tried, "record": record}


def test_the_chain_stage_tries_a_mix_only_when_the_chains_promise_one(monkeypatch) -> None:
    uniform = {"nchw": 10.0, "channels_last": 11.0}
    # stem and layer2 faster in channels_last, layer1 in NCHW: the sums promise 3.0 vs 3.5
    chains = {"stem": (1.0, 0.5), "layer1": (1.0, 2.0), "layer2": (2.0, 1.5)}
    kept = chain_stage(monkeypatch, chains, {**uniform, PER_CHAIN: 9.0})
    assert kept["assignment"] == MIXED
    assert kept["chain_sum_ms"] == {"nchw": 4.0, "channels_last": 4.0, PER_CHAIN: 3.0}
    assert kept["tried"] == [kept["assignment"]] and kept["kept"]
    assert kept["record"]["predicted_ms"] == pytest.approx(8.0 * 9.0 / 10.0)  # chosen: nchw
    assert kept["uniform_predicted_ms"] == 8.0
    assert kept["record"]["predicted_fraction"] == pytest.approx(0.8 * 0.9)
    slower = chain_stage(monkeypatch, chains, {**uniform, PER_CHAIN: 10.5})
    assert not slower["kept"] and slower["record"]["predicted_ms"] == 8.0
    # a mix whose chains gain under the margin is not timed as a whole model
    close = {"stem": (1.0, 0.999), "layer1": (1.0, 2.0), "layer2": (2.0, 2.5)}
    untried = chain_stage(monkeypatch, close, {**uniform, PER_CHAIN: 1.0})
    assert untried["tried"] == [] and not untried["kept"] and "not tried" in untried["reason"]
    same = chain_stage(monkeypatch, {c: (1.0, 2.0) for c in chains}, {})
    assert same["tried"] == [] and "nothing to mix" in same["reason"]


def test_a_mix_is_timed_only_against_the_layouts_it_must_beat(monkeypatch) -> None:
    model, x = tiny_resnet(), torch.randn(1, 3, 16, 16)
    deployments = {f: Deployment(batch=2, threads=1, memory_format=f) for f in FORMATS}
    timed: list[list[str]] = []
    real = layout_chains.time_in_deployments

    def recorded(models, *args, **kwargs):
        timed.append(sorted(models))
        return real(models, *args, **kwargs)

    monkeypatch.setattr(layout_chains, "time_in_deployments", recorded)
    ms = mixed_and_uniform_ms(model, MIXED, x, deployments, LatencyCache(), against=("nchw",))
    assert timed == [["nchw", PER_CHAIN]] and set(ms) == {"nchw", PER_CHAIN}
