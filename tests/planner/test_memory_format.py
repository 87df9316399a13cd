"""memory_format="auto": a convolutional model planned in both layouts, the faster kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.deployment import Deployment
from tensorslim.planner.memory_format import formats_to_try

pytestmark = pytest.mark.measured_latency


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1), nn.ReLU()
    )


def test_auto_is_the_default_and_compares_layouts_only_for_eager_convolutions() -> None:
    assert Deployment().memory_format == "auto"
    assert formats_to_try(convnet(), Deployment()) == ("nchw", "channels_last")
    assert formats_to_try(convnet(), Deployment(backend="onnxruntime")) == ("nchw",)
    assert formats_to_try(nn.Linear(4, 4), Deployment()) == ("nchw",)
    assert formats_to_try(convnet(), Deployment(memory_format="channels_last")) == (
        "channels_last",
    )


def test_auto_plans_in_the_layout_of_the_faster_compressed_model() -> None:
    model, x = convnet(), torch.randn(1, 8, 16, 16)
    plan = ts.plan(model, "svd", "flops=0.5", x, deployment=Deployment(batch=2, threads=1))
    record = plan.latency
    layouts = record["memory_format"]
    formats = layouts["formats"]
    assert set(formats) == {"nchw", "channels_last"}
    chosen, dense = layouts["chosen"], layouts["dense"]
    assert record["deployment"]["memory_format"] == chosen
    # the compressed model in its layout, against the dense model in its own faster one
    assert formats[chosen]["predicted_ms"] == min(f["predicted_ms"] for f in formats.values())
    assert record["dense_model_ms"] == min(f["dense_ms"] for f in formats.values())
    assert formats[dense]["dense_ms"] == record["dense_model_ms"]
    chains = layouts["chains"]  # its two convs are two chains (tensorslim.planner.layout_chains)
    scale = chains["model_ms"]["per_chain"] / chains["model_ms"][chosen] if chains["kept"] else 1
    assert record["predicted_fraction"] == pytest.approx(
        scale * formats[chosen]["predicted_ms"] / record["dense_model_ms"]
    )
    for lp in plan.compressed_layers:  # measured in the chosen layout, never slower there
        assert lp.extra["latency_ms"] < lp.extra["dense_latency_ms"]


def test_a_model_without_convolutions_is_planned_in_nchw_once() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(256, 256), nn.ReLU()), torch.randn(8, 256)
    plan = ts.plan(model, "svd", "flops=0.5", x, deployment=Deployment(batch=8, threads=1))
    assert plan.latency["deployment"]["memory_format"] == "nchw"
    assert "memory_format" not in plan.latency


def test_a_latency_budget_is_a_fraction_of_the_faster_dense_layout() -> None:
    from tensorslim.planner.choose_measured import _in_this_layout

    budget = ts.Budget(latency=0.5)
    # dense takes 20 ms in this layout, 10 ms in the faster one: aim at 5 ms, 0.25 of 20
    assert _in_this_layout(budget, 10.0 / 20.0) == ts.Budget(latency=0.25)
    assert _in_this_layout(budget, 1.0) == budget


def test_a_latency_budget_keeps_the_layout_meeting_it_with_least_error() -> None:
    from tensorslim.facts import Option
    from tensorslim.planner.choose import Choice
    from tensorslim.planner.memory_format import _pick

    def choice(error: float) -> Choice:
        return Choice(picked={"a": Option("svd", {}, params=1, flops=1, error=error)})

    # NCHW reaches 0.43 of the faster dense layout only by cutting deep (error 0.9)
    choices = {"nchw": choice(0.9), "channels_last": choice(0.3)}
    fraction = {"nchw": 0.43, "channels_last": 0.50}
    assert _pick(ts.Budget(latency=0.5), choices, fraction) == "channels_last"
    assert _pick(ts.Budget(latency=0.4), choices, fraction) == "nchw"  # neither meets: fastest
    assert _pick(ts.Budget(flops=0.5), choices, fraction) == "nchw"  # FLOPs met in both: fastest


def test_a_flops_budget_times_both_layouts_and_their_plans_in_one_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a FLOPs budget the dense model's layouts and both planned structures are timed
    together (one whole-model run), not the dense layouts first and each plan after."""
    import tensorslim.analysis.timing as timing

    runs: list[list[str]] = []
    real = timing.time_interleaved

    def recorded(runners, threads, **kwargs):
        runs.append(sorted(runners))
        return real(runners, threads, **kwargs)

    monkeypatch.setattr(timing, "time_interleaved", recorded)
    model, x = convnet(), torch.randn(1, 8, 16, 16)
    plan = ts.plan(model, "svd", "flops=0.5", x, deployment=Deployment(batch=2, threads=1))
    whole = [r for r in runs if any(name.endswith("/planned") for name in r)]
    assert whole == [["channels_last/dense", "channels_last/planned", "nchw/dense", "nchw/planned"]]
    formats = plan.latency["memory_format"]["formats"]
    assert all(f["dense_ms"] > 0 and f["predicted_ms"] > 0 for f in formats.values())
