"""Spending measured time under a FLOPs budget: the need stays in FLOPs, the walk is in ms."""

from __future__ import annotations

import pytest

from tensorslim.errors import TensorslimError
from tensorslim.facts import Option
from tensorslim.rank.allocate import LayerChoices, allocate


def timed(flops: int, ms: float, error: float, tag: str) -> Option:
    return Option(
        "svd", {"tag": tag}, params=flops, flops=flops, error=error, label=tag, latency=ms
    )


def layer(fqn: str, flops: int, ms: float, *options: Option) -> LayerChoices:
    costs = {"flops": flops, "params": flops, "latency": ms}
    return LayerChoices(fqn, flops, list(options), costs)


def two_layers() -> list[LayerChoices]:
    """'early' saves FLOPs cheaply in error but almost no time (memory-bound);
    'late' saves as many FLOPs for a little more error, and most of its time."""
    early = layer("early", 100, 10.0, timed(40, 9.5, 0.10, "early-r"))
    late = layer("late", 100, 10.0, timed(40, 4.0, 0.12, "late-r"))
    return [early, late]


def test_least_error_spends_flops_where_error_is_cheapest() -> None:
    picked, saved = allocate(two_layers(), "flops", 60)
    assert picked["early"] is not None and picked["late"] is None and saved == 60


def test_spending_latency_meets_the_flops_need_where_it_buys_time() -> None:
    picked, saved = allocate(two_layers(), "flops", 60, spend="latency")
    assert picked["late"] is not None and picked["early"] is None
    assert saved == 60  # the FLOPs budget is still met exactly


def test_spending_latency_takes_both_when_the_need_requires_it() -> None:
    picked, saved = allocate(two_layers(), "flops", 100, spend="latency")
    assert all(o is not None for o in picked.values()) and saved == 120


def test_a_need_off_the_latency_hull_is_met_by_blending_in_flops() -> None:
    # the low-FLOPs option is slower than the high-FLOPs one: on the ms hull it is dominated
    a = layer("a", 100, 10.0, timed(70, 5.0, 0.10, "fast"), timed(20, 6.0, 0.30, "few-flops"))
    picked, saved = allocate([a], "flops", 70, spend="latency")
    assert picked["a"] is not None and picked["a"].label == "few-flops" and saved == 80


def test_spending_needs_measured_options() -> None:
    untimed = Option("svd", {}, params=10, flops=10, error=0.1)
    with pytest.raises(TensorslimError, match="no measured latency"):
        allocate([layer("a", 100, 10.0, untimed)], "flops", 50, spend="latency")


def test_a_slack_takes_the_least_error_walk_within_it_of_the_fastest() -> None:
    # least time: 'late' (14 ms for the two layers), least error: 'early' (19.5 ms)
    fastest, _ = allocate(two_layers(), "flops", 60, spend="latency", slack=5.0)
    assert fastest["late"] is not None and fastest["early"] is None  # 19.5 > 14 + 5
    within, saved = allocate(two_layers(), "flops", 60, spend="latency", slack=6.0)
    assert within["early"] is not None and within["late"] is None and saved == 60
    least_error, _ = allocate(two_layers(), "flops", 60, spend="latency", slack=float("inf"))
    assert least_error == within


def test_allocate_each_makes_the_walks_once_and_matches_allocate_per_slack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plan records its objective's allocation and the least-time and least-error ones: one
    set of walks, each slack selecting among them as allocate() would."""
    import importlib

    # the module (the package exports the function allocate under its name)
    allocator = importlib.import_module("tensorslim.rank.allocate")

    layers = two_layers()
    slacks = (0.0, 6.0, float("inf"))
    want = [allocator.allocate(layers, "flops", 60, spend="latency", slack=s) for s in slacks]
    assert want[0] != want[1]  # the slacks select different walks
    calls: list[int] = []
    real = allocator._spend_walks

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(allocator, "_spend_walks", counted)
    got = allocator.allocate_each(layers, "flops", 60, slacks, spend="latency")
    assert got == want and len(calls) == 1
