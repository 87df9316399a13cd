"""The cp, tucker and tt methods: support and fallbacks, candidates that tell the truth, rank
rules, and plan → apply → save → load round trips for every new layer."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tensorslim as ts
from conftest import counted_flops
from tensorslim.decompose.cp import CPDegeneracyWarning
from tensorslim.errors import TensorslimError
from tensorslim.layers.base import dense_weight_error
from tensorslim.layers.cp import CPConv2d
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear
from tensorslim.layers.tt import TTLinear
from tensorslim.layers.tucker import TuckerConv2d
from tensorslim.methods import get_method, list_methods
from tensorslim.methods.base import LayerInfo
from tensorslim.methods.tt import rank_ladder


@pytest.fixture(autouse=True)
def _quiet_degeneracy():
    # Random (untrained) kernels make CP-ALS meet degenerate problems; the method records them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CPDegeneracyWarning)
        yield


def info_for(module: nn.Module, x: torch.Tensor, fqn: str = "layer") -> LayerInfo:
    with torch.no_grad():
        y = module(x)
    return LayerInfo(
        fqn,
        type(module).__name__,
        tuple(x.shape),
        tuple(y.shape),
        sum(p.numel() for p in module.parameters()),
        counted_flops(module, x),
    )


def conv_case(seed: int = 0, **kw) -> tuple[nn.Conv2d, torch.Tensor]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 12, 3, padding=1, **kw)
    return conv, torch.randn(1, 8, 10, 10)


def test_methods_are_registered() -> None:
    assert {"cp", "tucker", "tt"} <= set(list_methods())


@pytest.mark.parametrize("name", ["cp", "tucker", "tt"])
def test_grouped_and_foreign_modules_get_reasons(name: str) -> None:
    method = get_method(name)
    assert "grouped" in method.supports(nn.Conv2d(4, 4, 3, groups=2), "g") or name == "tt"
    assert method.supports(nn.ReLU(), "r") is not None
    assert method.supports(nn.Linear(4, 3), "l") is None


def test_tt_refuses_convs_with_a_reason() -> None:
    assert "Linear layers only" in get_method("tt").supports(nn.Conv2d(3, 4, 3), "c")


@pytest.mark.parametrize("name", ["cp", "tucker"])
@pytest.mark.parametrize("rule", [{}, {"rank_rule": "vbmf"}, {"rank": 3}])
def test_pointwise_layers_delegate_to_svd(name: str, rule: dict) -> None:
    method = get_method(name, **rule)
    for module, x in (
        (nn.Linear(20, 12), torch.randn(1, 20)),
        (nn.Conv2d(20, 12, 1), torch.randn(1, 20, 5, 5)),
    ):
        options = method.candidates(module, info_for(module, x))
        assert options and all(o.method == "svd" for o in options)
        if rule:
            assert len(options) == 1
        if "rank" in rule:
            assert options[0].config["rank"] == 3


def test_tucker_ladder_is_a_truthful_pareto_front() -> None:
    conv, x = conv_case()
    info = info_for(conv, x)
    method = get_method("tucker", rank_rule="budget")
    options = method.candidates(conv, info)
    assert len(options) > 5 and all(o.method == "tucker" for o in options)
    by_flops = sorted(options, key=lambda o: o.flops)
    errors = [o.error for o in by_flops]
    assert errors == sorted(errors, reverse=True)  # more FLOPs, less error
    for option in by_flops[:: max(1, len(by_flops) // 5)]:
        layer = method.build(conv, option.config, info)
        assert isinstance(layer, TuckerConv2d)
        assert option.flops == layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)
        assert option.params == layer.analytic_params()
        assert option.error == pytest.approx(dense_weight_error(conv, layer), abs=1e-5)


def test_tucker_vbmf_rule_and_auto_default() -> None:
    torch.manual_seed(0)
    # A trained-like kernel: multilinear rank (5, 3) plus a little noise.
    conv = nn.Conv2d(16, 24, 3, padding=1)
    with torch.no_grad():
        core = torch.randn(5, 3, 3, 3) * 4
        u0, u1 = torch.linalg.qr(torch.randn(24, 5))[0], torch.linalg.qr(torch.randn(16, 3))[0]
        conv.weight.copy_(
            torch.einsum("pqyx,op,iq->oiyx", core, u0, u1) + 0.01 * torch.randn(24, 16, 3, 3)
        )
    x = torch.randn(1, 16, 8, 8)
    info = info_for(conv, x)
    (only,) = get_method("tucker", rank_rule="vbmf").candidates(conv, info)
    assert only.config == {"rank_out": 5, "rank_in": 3}
    assert only.error < 0.05
    auto = get_method("tucker")
    options = auto.candidates(conv, info)
    assert len(options) > 1
    assert auto.choose_without_budget(options, info).config == only.config
    weak = get_method("tucker", rank_rule="vbmf", weaken=0.5).candidates(conv, info)[0]
    assert weak.config == {"rank_out": 15, "rank_in": 10}


def test_tucker_fixed_rank_and_budget_rule_without_budget() -> None:
    conv, x = conv_case()
    info = info_for(conv, x)
    (opt,) = get_method("tucker", rank=[4, 100]).candidates(conv, info)
    assert opt.config == {"rank_out": 4, "rank_in": 8}
    budget_only = get_method("tucker", rank_rule="budget")
    with pytest.raises(TensorslimError, match="needs a budget"):
        budget_only.choose_without_budget(budget_only.candidates(conv, info), info)


def test_cp_candidates_are_real_decompositions() -> None:
    conv, x = conv_case(1, stride=2)
    info = info_for(conv, x)
    method = get_method("cp", rank_rule="budget", ladder=[0.1, 0.4], max_iter=40)
    options = method.candidates(conv, info)
    assert [o.config["rank"] for o in options] == sorted(o.config["rank"] for o in options)
    assert options[0].error > options[-1].error
    for option in options:
        layer = method.build(conv, option.config, info)
        assert isinstance(layer, CPConv2d)
        assert option.flops == layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)
        assert option.params == layer.analytic_params()
        # build reuses the cached decomposition, so the error is exactly the built layer's
        assert option.error == pytest.approx(dense_weight_error(conv, layer), abs=1e-5)
        assert option.flops < info.flops


def test_cp_vbmf_rank_matches_tucker_params() -> None:
    conv, x = conv_case(2)
    info = info_for(conv, x)
    (opt,) = get_method("cp", rank_rule="vbmf", max_iter=20).candidates(conv, info)
    ro, ri = get_method("tucker").vbmf_ranks(conv.weight)
    expected = round((8 * ri + ri * ro * 9 + ro * 12) / (8 + 3 + 3 + 12))
    assert opt.config["rank"] == max(1, expected)


def test_tt_candidates_and_rules() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(96, 40)
    x = torch.randn(1, 96)
    info = info_for(lin, x)
    method = get_method("tt")
    options = method.candidates(lin, info)
    assert len(options) > 3 and all(o.method == "tt" for o in options)
    exact = [o for o in options if o.error < 1e-5]
    assert exact, "the ladder reaches the exact TT"
    for option in options:
        layer = method.build(lin, option.config, info)
        assert isinstance(layer, TTLinear)
        assert option.flops == layer.analytic_flops(tuple(x.shape)) == counted_flops(layer, x)
        assert option.params == layer.analytic_params()
        assert option.error == pytest.approx(dense_weight_error(lin, layer), abs=1e-5)
    (fixed,) = get_method("tt", rank=2).candidates(lin, info)
    assert max(fixed.config["ranks"]) == 2
    (eps,) = get_method("tt", eps=0.5).candidates(lin, info)
    assert eps.error <= 0.5 + 1e-6
    with pytest.raises(TensorslimError, match="needs a budget"):
        method.choose_without_budget(options, info)


def test_rank_ladder() -> None:
    assert rank_ladder(1) == [1]
    assert rank_ladder(20) == [1, 2, 3, 4, 6, 8, 12, 17, 20]


@pytest.mark.parametrize(
    ("name", "settings", "match"),
    [
        ("tucker", {"rank_rule": "magic"}, "rank_rule"),
        ("tucker", {"rank_rule": "fixed"}, "needs a rank"),
        ("tucker", {"weaken": 2.0}, "weaken"),
        ("tucker", {"rank": [1, 2, 3]}, "rank"),
        ("cp", {"ladder": [0.0]}, "ladder"),
        ("cp", {"on_degenerate": "shrug"}, "on_degenerate"),
        ("tt", {"rank": 2, "eps": 0.1}, "not both"),
        ("tt", {"d": 1}, "modes per side"),
        ("tt", {"rank_rule": "eps"}, "needs eps"),
    ],
)
def test_bad_settings(name: str, settings: dict, match: str) -> None:
    with pytest.raises(TensorslimError, match=match):
        get_method(name, **settings)


@pytest.mark.parametrize(
    ("method", "budget", "settings", "layer_types"),
    [
        ("tucker", "flops=0.5", {}, (TuckerConv2d, LowRankLinear)),
        ("tucker", None, {"rank_rule": "vbmf", "hooi_iters": 2}, (TuckerConv2d, LowRankLinear)),
        (
            "cp",
            "flops=0.5",
            {"rank_rule": "budget", "ladder": [0.2, 0.5], "max_iter": 30},
            (CPConv2d, LowRankLinear),
        ),
        ("tt", "params=0.3", {}, (TTLinear,)),
    ],
)
def test_plan_apply_save_load_round_trip(
    method: str,
    budget: str | None,
    settings: dict,
    layer_types: tuple,
    tiny_cnn,
    tiny_input,
    tmp_path,
) -> None:
    plan = ts.plan(tiny_cnn, method, budget, tiny_input, **settings)
    small = ts.apply(tiny_cnn, plan)
    built = [m for m in small.modules() if isinstance(m, layer_types)]
    assert built, f"{method} built none of {layer_types}"
    new_types = (TuckerConv2d, CPConv2d, TTLinear)
    assert any(isinstance(m, new_types) for m in built)
    with torch.no_grad():
        expected = small(tiny_input)
    ts.save(small, tmp_path)
    torch.manual_seed(123)
    base = type(tiny_cnn)().eval()
    again = ts.load(tmp_path, base_model=base)
    with torch.no_grad():
        torch.testing.assert_close(again(tiny_input), expected, rtol=0, atol=0)
    for lp in plan.compressed_layers:
        module = again.get_submodule(lp.fqn)
        assert module.config() == small.get_submodule(lp.fqn).config()


def test_budget_plan_meets_its_target(tiny_cnn, tiny_input) -> None:
    plan = ts.plan(tiny_cnn, "tucker", "flops=0.6", tiny_input)
    assert plan.estimated_flops <= 0.6 * plan.model_flops * 1.02
    small = ts.apply(tiny_cnn, plan)
    assert counted_flops(small, tiny_input[:1]) == plan.estimated_flops


def test_low_rank_conv_fallback_for_1x1(tiny_input) -> None:
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 10, 1))
    plan = ts.plan(model, "tucker", None, tiny_input, rank=2)
    methods = {lp.fqn: lp.method for lp in plan.compressed_layers}
    assert methods == {"0": "tucker", "1": "svd"}
    small = ts.apply(model, plan)
    assert isinstance(small[1], LowRankConv2d) and isinstance(small[0], TuckerConv2d)


class TwiceConv(nn.Module):
    """One conv applied twice (a shared layer): its FLOPs count for both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


@pytest.mark.parametrize(
    ("method", "settings"),
    [("tucker", {}), ("cp", {"rank_rule": "budget", "ladder": [0.2, 0.4], "max_iter": 20})],
)
def test_layer_called_twice_is_costed_for_both_calls(method: str, settings: dict) -> None:
    torch.manual_seed(0)
    model = TwiceConv().eval()
    x = torch.randn(1, 6, 8, 8)
    plan = ts.plan(model, method, "flops=0.5", x, **settings)
    (lp,) = plan.compressed_layers
    assert lp.flops_before == 2 * counted_flops(model.conv, x)
    small = ts.apply(model, plan)
    assert counted_flops(small, x) == plan.estimated_flops <= 0.5 * plan.model_flops


def test_tucker_ladder_offers_aligned_pairs_only() -> None:
    """Rank pairs fill the CPU's vector blocks (tensorslim.rank.alignment): multiples of 16 in
    a 128-channel mode, of 8 in a 64-channel one, or the full rank."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3, padding=1)
    options = get_method("tucker", rank_rule="budget").candidates(
        conv, info_for(conv, torch.randn(1, 64, 8, 8))
    )
    assert len(options) > 5
    for o in options:
        assert o.config["rank_out"] % 16 == 0 or o.config["rank_out"] == 128
        assert o.config["rank_in"] % 8 == 0 or o.config["rank_in"] == 64
