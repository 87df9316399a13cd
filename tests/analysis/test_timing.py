"""Deployment settings, interleaved timing and the latency cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tensorslim.analysis.deployment import Deployment, at_batch, make_runner
from tensorslim.analysis.timing import (
    LatencyCache,
    time_against_reference,
    time_interleaved,
    time_models,
)
from tensorslim.errors import TensorslimError


def test_deployment_parse_validate_and_default() -> None:
    d = Deployment.parse("batch=8, threads=2, format=channels_last, backend=onnxruntime")
    assert (d.batch, d.threads, d.memory_format, d.backend) == (
        8,
        2,
        "channels_last",
        "onnxruntime",
    )
    assert Deployment.coerce(d.to_dict()) == d and d.key != Deployment().key
    assert Deployment.coerce(None, torch.zeros(5, 3)).batch == 5
    for bad in ("batch=0", "threads=x", "format=nhwc", "backend=tvm", "colour=red"):
        with pytest.raises(TensorslimError):
            Deployment.parse(bad)


def test_at_batch_repeats_the_first_sample() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(at_batch(x, 4), x[:1].expand(4, 3))


def test_runners_compute_the_module_in_every_setting() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(2, 3, 8, 8)
    want = conv(x).detach()
    for d in (
        Deployment(),
        Deployment(memory_format="channels_last"),
        Deployment(backend="onnxruntime"),
    ):
        got = make_runner(conv, x, d)()
        got = torch.as_tensor(got[0]) if isinstance(got, list) else got
        assert torch.allclose(got, want, atol=1e-5)


def test_interleaved_timing_ranks_a_bigger_matmul_slower() -> None:
    a, b = torch.randn(64, 64), torch.randn(512, 512)
    timed = time_interleaved(
        {"small": lambda: a @ a, "big": lambda: b @ b}, threads=1, max_rounds=12
    )
    assert timed["big"].ms > 5 * timed["small"].ms
    assert (
        timed["small"].wall_ms <= timed["small"].wall_median_ms and 8 <= timed["small"].rounds <= 12
    )


def test_cache_keys_and_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dense, low = nn.Linear(32, 32), nn.Sequential(nn.Linear(32, 4), nn.Linear(4, 32))
    cache = LatencyCache(tmp_path / "lat.json")
    d = Deployment(batch=4)
    assert cache.key(dense, (1, 32), d) != cache.key(dense, (1, 16), d)
    assert cache.key(dense, (1, 32), d) != cache.key(dense, (1, 32), Deployment(batch=8))
    assert cache.key(dense, (1, 32), d) != cache.key(low, (1, 32), d)
    first = time_against_reference(dense, {"low": low}, (1, 32), d, cache)
    cache.save()
    again = LatencyCache(tmp_path / "lat.json")

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached latency was measured again")

    monkeypatch.setattr("tensorslim.analysis.timing.time_interleaved", no_timing)
    assert time_against_reference(dense, {"low": low}, (1, 32), d, again) == first


def test_time_models_is_interleaved_over_whole_models() -> None:
    small, big = nn.Linear(16, 16), nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    timed = time_models({"a": small}, torch.randn(1, 16), Deployment(batch=2))
    assert timed["a"].ms > 0
    with pytest.raises(TensorslimError):
        make_runner(big, {"x": torch.randn(1, 256)}, Deployment(backend="onnxruntime"))


class _Recording(nn.Module):
    """A Linear that records, in a list its copies share, the weight storage and mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.seen: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.linear.weight.data_ptr(), self.training))
        return self.linear(x)


def test_whole_models_and_layers_are_timed_on_their_own_weights_in_eval_mode() -> None:
    """No weight is copied to time a whole model (planning GPT-2 once held two of it), the
    runs are in eval mode and the model's own mode is untouched."""
    model = _Recording().train()
    time_models({"m": model}, torch.randn(1, 8), Deployment())
    assert model.seen and set(model.seen) == {(model.linear.weight.data_ptr(), False)}
    assert model.training and model.linear.training
    dense, variant = _Recording().train(), _Recording()
    time_against_reference(dense, {"v": variant}, (1, 8), Deployment(), LatencyCache())
    assert set(dense.seen) == {(dense.linear.weight.data_ptr(), False)} and dense.training
    assert set(variant.seen) == {(variant.linear.weight.data_ptr(), False)}


def test_models_in_several_deployments_share_one_interleaved_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each group's dense model and variants in one run; a variant's ms is its ratio to its own
    group's dense model times that dense model's reference; a second call times nothing."""
    import tensorslim.analysis.timing as timing

    conv = nn.Conv2d(4, 8, 3, padding=1)
    small = nn.Conv2d(4, 8, 1)
    runs: list[list[str]] = []
    real = timing.time_interleaved

    def recorded(runners, threads, **kwargs):
        runs.append(sorted(runners))
        return real(runners, threads, **kwargs)

    monkeypatch.setattr(timing, "time_interleaved", recorded)
    cache = LatencyCache()
    groups = {
        f: (conv, {"small": small}, Deployment(memory_format=f)) for f in ("nchw", "channels_last")
    }
    x = torch.randn(1, 4, 8, 8)
    first = timing.time_models_in_deployments(groups, x, cache)
    assert runs == [["channels_last/dense", "channels_last/small", "nchw/dense", "nchw/small"]]
    assert set(first) == {"nchw", "channels_last"}
    assert all(dense > 0 and ms["small"] > 0 for dense, ms in first.values())
    assert timing.time_models_in_deployments(groups, x, cache) == first and len(runs) == 1
    with pytest.raises(TensorslimError, match="one thread count"):
        timing.time_models_in_deployments(
            {"a": (conv, {}, Deployment(threads=1)), "b": (conv, {}, Deployment(threads=2))},
            x,
            LatencyCache(),
        )


def test_rounds_that_agree_stop_early_and_others_wait_for_patience() -> None:
    from tensorslim.analysis.timing import AGREE_ROUNDS

    a = torch.randn(32, 32)
    runners = {"mm": lambda: a @ a}
    # "agree": every median within 10× of its best — always true: stops at AGREE_ROUNDS
    assert time_interleaved(runners, 1, min_rounds=8, stable=10.0)["mm"].rounds == AGREE_ROUNDS
    assert time_interleaved(runners, 1, min_rounds=8)["mm"].rounds >= 8
    # rounds that disagree (median > best) fall back to the patience rule
    assert time_interleaved(runners, 1, min_rounds=8, stable=-0.5)["mm"].rounds >= 8


def _scripted(monkeypatch: pytest.MonkeyPatch, rounds: dict[str, list[float]]) -> dict[str, int]:
    """Runners whose rounds take the scripted CPU seconds (round k: rounds[name][k], the last
    repeated); returns name → rounds run, counted."""
    import tensorslim.analysis.timing as timing

    calls = {n: 0 for n in rounds}

    def one_round(run, number):
        name = run.name
        k = calls[name]
        calls[name] += 1
        x = rounds[name][min(k, len(rounds[name]) - 1)]
        return x, x

    monkeypatch.setattr(timing, "_one_round", one_round)
    monkeypatch.setattr(timing, "_iterations", lambda run, round_time: 1)
    return calls


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> None:
        return None


def test_a_runner_clearly_slower_than_its_reference_stops_and_is_paired_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """drop_slower: the slow variant runs AGREE_ROUNDS rounds, the noisy close one keeps
    the run going; the slow one's reference_ms is dense's best over *its* rounds only."""
    from tensorslim.analysis.timing import AGREE_ROUNDS

    dense = [1.0, 1.0, 1.0, 1.0, 0.9]  # a better round after the slow variant stopped
    close = [1.0, 0.95, 1.0, 0.9, 1.0, 0.85, 1.0, 0.8, 0.8]  # keeps improving for a while
    calls = _scripted(monkeypatch, {"dense": dense, "close": close, "slow": [2.0]})
    runners = {n: _Named(n) for n in ("dense", "close", "slow")}
    refs = {"close": "dense", "slow": "dense"}
    kw = {"min_rounds": 4, "patience": 2, "references": refs}
    timed = time_interleaved(runners, 1, drop_slower=0.1, **kw)
    assert calls["slow"] == AGREE_ROUNDS < calls["close"] == calls["dense"]
    assert timed["slow"].reference_ms == pytest.approx(1000.0)  # dense over rounds 1-4
    assert timed["close"].reference_ms == pytest.approx(900.0)
    calls.update({n: 0 for n in calls})
    assert time_interleaved(runners, 1, **kw)["slow"].rounds == calls["close"]  # no dropping


def test_the_relative_rule_stops_when_every_best_moves_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both runners' bests improve 5 % a round (the machine got quieter): the absolute rule
    waits, the relative one stops at min_rounds since their ratio held."""
    falling = [1.0 * 0.95**k for k in range(12)] + [0.95**12]
    _scripted(monkeypatch, {"a": falling, "b": [2 * x for x in falling]})
    runners = {n: _Named(n) for n in ("a", "b")}
    kw = {"min_rounds": 6, "patience": 3, "max_rounds": 12}
    assert time_interleaved(runners, 1, **kw)["a"].rounds == 12
    _scripted(monkeypatch, {"a": falling, "b": [2 * x for x in falling]})
    timed = time_interleaved(runners, 1, relative=True, **kw)
    assert timed["a"].rounds == 6 and timed["b"].ms / timed["a"].ms == pytest.approx(2.0)
    # one runner improving alone is a moving ratio: the relative rule waits too
    _scripted(monkeypatch, {"a": falling, "b": [2.0]})
    assert time_interleaved(runners, 1, relative=True, **kw)["a"].rounds == 12
