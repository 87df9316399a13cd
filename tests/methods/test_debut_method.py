"""The "debut" method: support, candidate ladder, build, planning under a budget, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorslim.decompose.debut_als import als_fit
from tensorslim.errors import TensorslimError
from tensorslim.layers.base import dense_weight_error
from tensorslim.layers.debut import DeButConv2d, DeButLinear
from tensorslim.layers.debut_chain import DeButChain
from tensorslim.methods import get_method, list_methods
from tensorslim.methods.base import LayerInfo


def linear_info(fqn: str, layer: nn.Linear, rows: int = 1) -> LayerInfo:
    return LayerInfo(
        fqn,
        "Linear",
        (rows, layer.in_features),
        (rows, layer.out_features),
        layer.weight.numel() + layer.bias.numel(),
        2 * rows * layer.in_features * layer.out_features,
    )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 6 * 6, 96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_registered_and_supports() -> None:
    assert "debut" in list_methods()
    method = get_method("debut")
    assert method.supports(nn.Linear(4, 4), "a") is None
    assert method.supports(nn.Conv2d(4, 4, 3), "b") is None
    assert "grouped" in method.supports(nn.Conv2d(4, 4, 3, groups=2), "c")
    assert "not a Linear" in method.supports(nn.ReLU(), "d")
    with pytest.raises(TensorslimError, match="init"):
        get_method("debut", init="svd")
    with pytest.raises(TensorslimError, match="five integers"):
        get_method("debut", chain="1 2 3")


def test_candidates_are_a_ladder_with_honest_costs_and_errors() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(96, 64)
    method = get_method("debut", ratios=[2, 4, 8], candidate_sweeps=2)
    info = linear_info("fc", layer, rows=3)
    options = method.candidates(layer, info)
    assert len(options) >= 2
    for option in options:
        chain = DeButChain.parse(option.config["chain"])
        assert chain.qualified and (chain.in_features, chain.out_features) == (96, 64)
        assert option.params == chain.nnz + 64
        assert option.flops == 2 * 3 * chain.nnz
        _, errors = als_fit(
            layer.weight,
            chain,
            sweeps=2,
            generator=torch.Generator().manual_seed(0),
            dtype=torch.float32,
        )
        assert option.error == pytest.approx(errors[-1], rel=1e-5)
        assert 0.0 < option.error < 1.0
    by_size = sorted(options, key=lambda o: o.params)
    assert by_size[0].error >= by_size[-1].error  # fewer nonzeros, larger error


def test_explicit_chains_text_and_per_layer() -> None:
    layer = nn.Linear(18, 12)
    text = "12 18 2 3 1  12 12 2 2 2  12 12 3 3 4"
    options = get_method("debut", chain=text).candidates(layer, linear_info("fc", layer))
    assert [o.config["chain"] for o in options] == [text]
    per_layer = get_method("debut", chain={"fc": text}, ratios=[2])
    assert per_layer.candidates(layer, linear_info("fc", layer))[0].config["chain"] == text
    other = per_layer.candidates(layer, linear_info("other", layer))
    assert other and other[0].config["chain"] != text
    with pytest.raises(TensorslimError, match="layer fc"):
        get_method("debut", chain={"fc": "8 8 8 8 1"}).candidates(layer, linear_info("fc", layer))


def test_build_fits_the_weight_with_the_chosen_init() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(48, 32)
    info = linear_info("fc", layer)
    method = get_method("debut", ratio=2, als_sweeps=6, candidate_sweeps=1)
    (option,) = method.candidates(layer, info)
    built = method.build(layer, option.config, info)
    assert isinstance(built, DeButLinear)
    assert dense_weight_error(layer, built) <= option.error + 1e-9  # more sweeps, no worse
    assert built.config()["init"]["method"] == "als"
    random = get_method("debut", ratio=2, init="random").build(layer, option.config, info)
    assert dense_weight_error(layer, random) > dense_weight_error(layer, built)
    skeleton = method.build(
        layer, {"chain": option.config["chain"], "init": {"method": "als"}}, info, init=False
    )
    assert skeleton.config() == {"chain": option.config["chain"], "init": {"method": "als"}}
    conv = nn.Conv2d(3, 8, 3)
    conv_option = get_method("debut", ratio=2).candidates(
        conv, LayerInfo("c", "Conv2d", (1, 3, 8, 8), (1, 8, 6, 6), 224, 2 * 36 * 8 * 27)
    )[0]
    assert conv_option.flops == 2 * 36 * DeButChain.parse(conv_option.config["chain"]).nnz
    assert isinstance(method.build(conv, conv_option.config, None), DeButConv2d)


def test_no_budget_needs_a_rule() -> None:
    layer = nn.Linear(48, 32)
    method = get_method("debut", ratios=[2, 4])
    options = method.candidates(layer, linear_info("fc", layer))
    with pytest.raises(TensorslimError, match="needs a budget"):
        method.choose_without_budget(options, linear_info("fc", layer))


def test_plan_under_a_budget_apply_save_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ts = pytest.importorskip("tensorslim")
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 4, 6, 6)
    the_plan = ts.plan(
        model, "debut", ts.Budget(flops=0.5), x, candidate_sweeps=1, als_sweeps=3, ratios=[2, 4, 8]
    )
    chosen = [lp for lp in the_plan.layers if lp.method == "debut"]
    assert chosen
    assert the_plan.estimated_flops <= 0.5 * the_plan.model_flops * 1.001
    small = ts.apply(model, the_plan)
    assert any(isinstance(m, DeButLinear | DeButConv2d) for m in small.modules())
    with torch.no_grad():
        expected = small(x)
    ts.save(small, tmp_path / "out")
    torch.manual_seed(123)
    again = ts.load(tmp_path / "out", Net().eval())
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected)
    for name, module in again.named_modules():
        if isinstance(module, DeButLinear | DeButConv2d):
            assert module.config() == small.get_submodule(name).config()


def test_chain_kind_setting_does_not_shadow_the_method_family() -> None:
    """``chain_kind`` picks the chain shape; the class-level ``kind`` still says decomposition."""
    method = get_method("debut", chain_kind="monotonic")
    assert method.chain_kind == "monotonic"
    assert type(method).kind == "decomposition" and method.kind == "decomposition"
    with pytest.raises(TensorslimError, match="chain_kind"):
        get_method("debut", chain_kind="zigzag")


def test_conv_order_is_part_of_the_plan_and_legacy_entries_load_channel_major() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 8, 3)
    info = LayerInfo("c", "Conv2d", (1, 3, 8, 8), (1, 8, 6, 6), 224, 2 * 36 * 8 * 27)
    method = get_method("debut", ratio=2, candidate_sweeps=1, als_sweeps=2)
    (option,) = method.candidates(conv, info)
    assert option.config["order"] == "position"
    built = method.build(conv, option.config, info)
    assert isinstance(built, DeButConv2d) and built.order == "position"
    assert built.config()["order"] == "position"
    # the error is the position-major kernel's: permute the kernel to (C_out, kh, kw, C_in)
    matrix = conv.weight.detach().permute(0, 2, 3, 1).reshape(8, -1)
    generator = torch.Generator().manual_seed(0)
    chain = option.config["chain"]
    _, errors = als_fit(matrix, chain, sweeps=1, generator=generator, dtype=torch.float32)
    assert option.error == pytest.approx(errors[-1], rel=1e-6)
    channel = get_method("debut", ratio=2, order="channel").candidates(conv, info)[0]
    assert channel.config["order"] == "channel"
    # a saved entry from before the order existed (no "order" key) was channel-major
    legacy = method.build(conv, {"chain": option.config["chain"]}, info, init=False)
    assert isinstance(legacy, DeButConv2d) and legacy.order == "channel"
    with pytest.raises(TensorslimError, match="order"):
        get_method("debut", order="rows")


def test_explicit_padded_chain_per_layer() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(13, 11)
    info = linear_info("fc", layer)
    with pytest.raises(TensorslimError, match="pad=True"):
        get_method("debut", chain={"fc": "16 16 4 4 1  16 16 4 4 4"}).candidates(layer, info)
    method = get_method("debut", chain={"fc": "16 16 4 4 1  16 16 4 4 4"}, pad=True)
    (option,) = method.candidates(layer, info)
    assert option.config["pad"] is True and option.params == 128 + 11
    built = method.build(layer, option.config, info)
    assert isinstance(built, DeButLinear) and built.padded
    assert built(torch.randn(2, 13)).shape == (2, 11)


def test_paper_preset_initialises_as_the_official_code() -> None:
    torch.manual_seed(4)
    layer = nn.Linear(48, 32)
    info = linear_info("fc", layer)
    method = get_method("debut", preset="paper", ratio=2, candidate_sweeps=1)
    assert method.als_sweeps == 10 and method.als_start == "uniform"
    assert method.als_first == "output" and method.als_balance is False
    (option,) = method.candidates(layer, info)
    built = method.build(layer, option.config, info)
    assert built.init_info["als_start"] == "uniform" and built.init_info["balance"] is False
    weights, errors = als_fit(
        layer.weight,
        option.config["chain"],
        sweeps=10,
        generator=torch.Generator().manual_seed(0),
        start="uniform",
        first="output",
        balance=False,
    )
    for p, w in zip(built.factors, weights, strict=True):
        torch.testing.assert_close(p.detach(), w.float())
    assert built.init_info["error"] == pytest.approx(errors[-1], abs=1e-6)
    random = get_method("debut", preset="paper", ratio=2, init="random")
    made = random.build(layer, option.config, info)
    values = torch.cat([p.detach().reshape(-1) for p in made.factors])
    assert values.std().item() == pytest.approx(0.5**0.5, rel=0.15)


def test_pad_generates_chains_for_the_padded_shape_of_rough_sizes() -> None:
    from tensorslim.layers.debut_layout import padded_shape

    # 127 is prime: padded to 128; 100 = 2²·5² and 9·6 factor into small primes: kept;
    # a conv's channels grow (13 → 16), giving kh·kw·16 columns as the official rule
    assert padded_shape(100, 127) == (100, 128)
    assert padded_shape(12, 54, positions=9) == (12, 54)
    assert padded_shape(22, 117, positions=9) == (32, 144)
    torch.manual_seed(5)
    layer = nn.Linear(127, 100)
    info = linear_info("fc", layer)
    plain = get_method("debut", ratio=4, candidate_sweeps=1).candidates(layer, info)
    padded = get_method("debut", ratio=4, candidate_sweeps=1, pad=True).candidates(layer, info)
    (option,) = padded
    chain = DeButChain.parse(option.config["chain"])
    assert (chain.out_features, chain.in_features) == (100, 128) and option.config["pad"]
    assert option.extra["compression"] == pytest.approx(127 * 100 / chain.nnz, rel=1e-3)
    built = get_method("debut", pad=True, als_sweeps=2).build(layer, option.config, info)
    assert isinstance(built, DeButLinear) and built.padded
    # the option's error is that of the layer's own block (what the layer computes)
    error = dense_weight_error(layer, built)
    assert 0 < error < 1 and option.error == pytest.approx(error, rel=0.3)
    assert all(DeButChain.parse(o.config["chain"]).in_features == 127 for o in plain)
