"""The svd method: settings, support, candidates (costs and errors that match the built layer)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from conftest import counted_flops
from tensorslim.errors import TensorslimError
from tensorslim.layers.base import dense_weight_error
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear
from tensorslim.methods import get_method
from tensorslim.methods.base import LayerInfo
from tensorslim.methods.svd import MAX_LADDER, SVDMethod, _ladder, layer_spectrum
from tensorslim.rank.select import energy_kept


def info_for(module: nn.Module, input_shape: tuple[int, ...], calls: int = 1) -> LayerInfo:
    with torch.no_grad():
        out = module(torch.zeros(input_shape))
    return LayerInfo(
        fqn="layer",
        type_name=type(module).__name__,
        input_shape=input_shape,
        output_shape=tuple(out.shape),
        params=sum(p.numel() for p in module.parameters()),
        flops=0,
        calls=calls,
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"scheme": "diagonal"}, "scheme"),
        ({"rank": 4, "energy": 0.9}, "at most one"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"energy": 0.0}, "energy"),
        ({"energy": 1.2}, "energy"),
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"colour": "red"}, "bad settings"),
    ],
)
def test_bad_settings_are_clear_errors(settings: dict, message: str) -> None:
    with pytest.raises(TensorslimError, match=message):
        get_method("svd", **settings)


def test_settings_round_trip_through_the_registry() -> None:
    method = get_method("svd", scheme="spatial", energy=0.8, driver="full")
    assert isinstance(method, SVDMethod)
    assert method.settings() == {
        "scheme": "spatial",
        "rank": None,
        "ratio": None,
        "energy": 0.8,
        "driver": "full",
    }
    assert get_method("svd", **method.settings()) == method


def test_supports() -> None:
    svd = SVDMethod()
    assert svd.supports(nn.Linear(3, 4), "fc") is None
    assert svd.supports(nn.Conv2d(3, 4, 3), "conv") is None
    assert "grouped" in svd.supports(nn.Conv2d(4, 4, 3, groups=4), "dw")
    assert "padding_mode" in svd.supports(nn.Conv2d(4, 4, 3, padding_mode="circular"), "c")
    assert svd.supports(nn.Conv1d(3, 4, 3), "c1d") is None
    assert "grouped" in svd.supports(nn.Conv1d(4, 4, 3, groups=2), "c1d")
    assert "Conv3d is not" in svd.supports(nn.Conv3d(3, 4, 3), "c3d")


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_every_candidate_states_the_cost_and_error_of_what_build_makes(scheme: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
    shape = (1, 3, 9, 9)
    info = info_for(conv, shape, calls=2)
    method = SVDMethod(scheme=scheme)
    options = method.candidates(conv, info)
    full = 6 if scheme == "channel" else min(6 * 3, 3 * 3)
    assert [o.config["rank"] for o in options] == list(range(1, full + 1))
    spectrum = layer_spectrum(conv, scheme)
    for option in options:
        layer = method.build(conv, option.config, info)
        assert isinstance(layer, LowRankConv2d) and layer.scheme == scheme
        assert option.params == layer.analytic_params()
        assert option.flops == 2 * counted_flops(layer, torch.randn(shape))  # two calls
        assert option.error == pytest.approx(dense_weight_error(conv, layer), rel=1e-5, abs=1e-6)
        kept = float(energy_kept(spectrum)[option.config["rank"] - 1])
        assert option.extra == {"energy_kept": pytest.approx(kept), "full_rank": full}
        assert option.error == pytest.approx(math.sqrt(max(0.0, 1 - kept)))


def test_best_scheme_offers_both_views_only_where_they_differ() -> None:
    best = SVDMethod(scheme="best")
    conv3 = nn.Conv2d(2, 4, 3)
    schemes = {o.config["scheme"] for o in best.candidates(conv3, info_for(conv3, (1, 2, 6, 6)))}
    assert schemes == {"channel", "spatial"}
    conv1 = nn.Conv2d(2, 4, 1)
    schemes = {o.config["scheme"] for o in best.candidates(conv1, info_for(conv1, (1, 2, 6, 6)))}
    assert schemes == {"channel"}
    linear = nn.Linear(5, 7)
    schemes = {o.config["scheme"] for o in best.candidates(linear, info_for(linear, (1, 5)))}
    assert schemes == {"channel"}


def test_rules_give_a_single_candidate() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(40, 20)
    info = info_for(linear, (1, 40))
    assert [o.config["rank"] for o in SVDMethod(rank=5).candidates(linear, info)] == [5]
    assert [o.config["rank"] for o in SVDMethod(ratio=0.5).candidates(linear, info)] == [10]
    (option,) = SVDMethod(energy=0.5).candidates(linear, info)
    assert option.extra["energy_kept"] >= 0.5
    assert SVDMethod(rank=5).choose_without_budget([option], info) is option
    with pytest.raises(TensorslimError, match=r"rank 21 is impossible for layer: choose 1\.\.20"):
        SVDMethod(rank=21).candidates(linear, info)
    with pytest.raises(TensorslimError, match="needs a budget"):
        SVDMethod().choose_without_budget(SVDMethod().candidates(linear, info), info)


def test_ladder_is_dense_at_low_ranks_and_bounded() -> None:
    assert _ladder(10) == list(range(1, 11))
    assert _ladder(MAX_LADDER) == list(range(1, MAX_LADDER + 1))
    for full in (MAX_LADDER + 1, 100, 512, 4096):
        ladder = _ladder(full)
        assert ladder[0] == 1 and ladder[-1] == full
        assert ladder == sorted(set(ladder)) and len(ladder) <= MAX_LADDER
        gaps = [b - a for a, b in itertools.pairwise(ladder)]
        assert gaps[0] <= gaps[-1], "steps grow towards the full rank"


def test_build_without_init_makes_only_the_structure() -> None:
    linear = nn.Linear(8, 6, dtype=torch.float64)
    skeleton = SVDMethod().build(linear, {"rank": 3}, None, init=False)
    assert isinstance(skeleton, LowRankLinear)
    assert skeleton.down.weight.shape == (3, 8) and skeleton.up.weight.shape == (6, 3)
    assert skeleton.down.weight.dtype == torch.float64
    assert skeleton.down.weight.device.type == "cpu"
    conv = nn.Conv2d(2, 5, (3, 1), stride=(2, 1), padding=(1, 0), bias=False)
    built = SVDMethod().build(conv, {"rank": 2, "scheme": "spatial"}, None, init=False)
    assert isinstance(built, LowRankConv2d) and built.up.bias is None
    x = torch.randn(1, 2, 7, 5)
    assert built(x).shape == conv(x).shape


def test_build_with_init_decomposes_with_the_chosen_driver() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(30, 20)
    exact = SVDMethod(driver="full").build(linear, {"rank": 20}, None)
    torch.testing.assert_close(exact.to_dense().weight, linear.weight, rtol=1e-4, atol=1e-5)
    fast = SVDMethod(driver="randomized").build(linear, {"rank": 4}, None)
    best = SVDMethod(driver="full").build(linear, {"rank": 4}, None)
    assert dense_weight_error(linear, fast) == pytest.approx(
        dense_weight_error(linear, best), rel=0.05
    )
