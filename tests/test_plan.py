"""CompressionPlan: plan(), apply(), JSON/YAML round trip, validation of edited plans."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

import tensorslim as ts
from tensorslim.analysis.flops import count_flops
from tensorslim.analysis.profile import count_params
from tensorslim.errors import TensorslimError
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear
from tensorslim.plan import CompressionPlan, plans_of, refresh_plan


@pytest.fixture
def planned(tiny_cnn, tiny_input) -> CompressionPlan:
    return ts.plan(tiny_cnn, "svd", ts.Budget(flops=0.5), tiny_input, scheme="best")


def test_plan_records_rank_flops_and_energy_per_layer(planned: CompressionPlan, tiny_cnn) -> None:
    assert [lp.fqn for lp in planned.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert planned.method == "svd" and planned.settings["scheme"] == "best"
    assert planned.budget == ts.Budget(flops=0.5)
    assert planned.to_dict()["budget"] == {"flops": 0.5}
    assert planned.input_shape == [1, 1, 14, 14]
    assert planned.compressed_layers, "a 0.5 FLOPs budget must compress something"
    for lp in planned.compressed_layers:
        assert lp.config["rank"] >= 1 and lp.config["scheme"] in {"channel", "spatial"}
        assert lp.flops_after < lp.flops_before
        assert 0 < lp.extra["energy_kept"] <= 1
        assert lp.reason == "chosen by the allocator"
    assert planned.layer("conv2").params_before == sum(
        p.numel() for p in tiny_cnn.conv2.parameters()
    )
    with pytest.raises(TensorslimError, match="no layer named 'nope'"):
        planned.layer("nope")


def test_json_round_trip_is_exact(planned: CompressionPlan, tmp_path) -> None:
    text = planned.to_json()
    assert json.loads(text) == planned.to_dict()
    again = CompressionPlan.from_text(text)
    assert again.to_dict() == planned.to_dict()
    planned.save(tmp_path / "plan.json")
    assert CompressionPlan.load(tmp_path / "plan.json").to_dict() == planned.to_dict()


def test_yaml_round_trip_is_exact(planned: CompressionPlan, tmp_path) -> None:
    text = planned.to_yaml()
    assert yaml.safe_load(text) == planned.to_dict()
    assert CompressionPlan.from_text(text, "yaml").to_dict() == planned.to_dict()
    planned.save(tmp_path / "plan.yaml")
    assert not (tmp_path / "plan.yaml").read_text().lstrip().startswith("{")
    assert CompressionPlan.load(tmp_path / "plan.yaml").to_dict() == planned.to_dict()


def test_a_round_tripped_plan_applies_to_the_same_model(planned, tiny_cnn, tiny_input) -> None:
    again = CompressionPlan.from_text(planned.to_yaml(), "yaml")
    a, b = ts.apply(tiny_cnn, planned), ts.apply(tiny_cnn, again)
    torch.testing.assert_close(a(tiny_input), b(tiny_input), rtol=0, atol=0)


def test_apply_swaps_layers_in_a_copy_and_records_the_plan(planned, tiny_cnn, tiny_input) -> None:
    small = ts.apply(tiny_cnn, planned)
    assert small is not tiny_cnn
    assert type(tiny_cnn.conv1) is nn.Conv2d, "the original model must be left untouched"
    for lp in planned.layers:
        module = small.get_submodule(lp.fqn)
        if lp.method is None:
            assert type(module) is type(tiny_cnn.get_submodule(lp.fqn))
        else:
            assert isinstance(module, LowRankConv2d | LowRankLinear)
            assert module.config()["rank"] == lp.config["rank"]
    assert plans_of(small) == [planned]
    assert plans_of(tiny_cnn) == []
    assert small(tiny_input).shape == (4, 10)
    inplace = ts.apply(tiny_cnn, planned, inplace=True)
    assert inplace is tiny_cnn and plans_of(tiny_cnn) == [planned]


def test_rules_without_a_budget(tiny_cnn, tiny_input) -> None:
    by_rank = ts.plan(tiny_cnn, "svd", None, tiny_input, rank=2)
    assert {lp.config["rank"] for lp in by_rank.compressed_layers} == {2}
    assert all(lp.reason == "per-layer rule" for lp in by_rank.compressed_layers)
    by_ratio = ts.plan(tiny_cnn, "svd", None, tiny_input, ratio=0.25)
    # fc1 is 32 × 784: full rank 32, a quarter is 8
    assert by_ratio.layer("fc1").config["rank"] == 8
    by_energy = ts.plan(tiny_cnn, "svd", None, tiny_input, energy=0.5)
    assert all(lp.extra["energy_kept"] >= 0.5 for lp in by_energy.compressed_layers)
    with pytest.raises(TensorslimError, match="needs a budget"):
        ts.plan(tiny_cnn, "svd", None, tiny_input)
    with pytest.raises(TensorslimError, match=r"rank 12 is impossible for conv1"):
        ts.plan(tiny_cnn, "svd", None, tiny_input, rank=12)  # conv1 is 8 × 9: full rank 8


def test_layer_selection(tiny_cnn, tiny_input) -> None:
    only = ts.plan(tiny_cnn, "svd", None, tiny_input, rank=1, layers=["fc1"])
    assert [lp.fqn for lp in only.compressed_layers] == ["fc1"]
    assert only.layer("conv1").reason == "not selected"
    excluded = ts.plan(tiny_cnn, "svd", None, tiny_input, rank=1, exclude=["fc1", "fc2"])
    assert [lp.fqn for lp in excluded.compressed_layers] == ["conv1", "conv2"]
    convs = ts.plan(
        tiny_cnn,
        "svd",
        None,
        tiny_input,
        rank=1,
        filter_fn=lambda module, fqn: isinstance(module, nn.Linear),
    )
    assert [lp.fqn for lp in convs.compressed_layers] == ["fc1", "fc2"]
    with pytest.raises(TensorslimError, match="no layer named 'fc9'"):
        ts.plan(tiny_cnn, "svd", None, tiny_input, rank=1, layers=["fc9"])


def test_plan_input_errors(tiny_cnn, tiny_input) -> None:
    with pytest.raises(TensorslimError, match="example_input"):
        ts.plan(tiny_cnn, "svd", "flops=0.5")
    with pytest.raises(TensorslimError, match=r"unknown method 'svdd'.*did you mean 'svd'"):
        ts.plan(tiny_cnn, "svdd", "flops=0.5", tiny_input)
    with pytest.raises(TensorslimError, match="bad settings"):
        ts.plan(tiny_cnn, "svd", "flops=0.5", tiny_input, rnak=3)
    with pytest.raises(TensorslimError, match="budget"):
        ts.plan(tiny_cnn, "svd", "flops=1.5", tiny_input)
    plan = ts.plan(tiny_cnn, "svd", {"params": 0.5}, tiny_input)
    assert plan.budget == ts.Budget(params=0.5)


def test_grouped_conv_stays_dense_with_the_reason(tiny_input) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3, groups=2), nn.Flatten())
    plan = ts.plan(model, "svd", None, tiny_input, rank=1)
    assert plan.layer("1").method is None and "grouped" in plan.layer("1").reason
    assert plan.layer("0").method == "svd"


# ----- edited plans ------------------------------------------------------------------------------


def edited(plan: CompressionPlan, **changes) -> CompressionPlan:
    data = plan.to_dict()
    for path, value in changes.items():
        target = data
        *keys, last = path.split("__")
        for key in keys:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[last] = value
    return CompressionPlan.from_dict(data)


def first_compressed_index(plan: CompressionPlan) -> int:
    return next(i for i, lp in enumerate(plan.layers) if lp.method is not None)


@pytest.mark.parametrize("rank", [10_000, 0, 2.5, "eight", None])
def test_impossible_rank_in_an_edited_plan_names_the_layer(planned, tiny_cnn, rank) -> None:
    i = first_compressed_index(planned)
    bad = edited(planned, **{f"layers__{i}__config__rank": rank})
    fqn = planned.layers[i].fqn
    with pytest.raises(TensorslimError, match=rf"layer {fqn}:.*rank"):
        ts.apply(tiny_cnn, bad)
    with pytest.raises(TensorslimError, match=rf"layer {fqn}:.*rank"):
        ts.apply(tiny_cnn, bad, init=False)


def test_unknown_fqn_in_an_edited_plan_is_a_clear_error(planned, tiny_cnn) -> None:
    i = first_compressed_index(planned)
    bad = edited(planned, **{f"layers__{i}__fqn": "encoder.conv7"})
    with pytest.raises(TensorslimError, match=r"'encoder.conv7'.*does not have"):
        ts.apply(tiny_cnn, bad)


def test_wrong_layer_type_in_an_edited_plan_is_a_clear_error(planned, tiny_cnn) -> None:
    i = first_compressed_index(planned)
    bad = edited(planned, **{f"layers__{i}__type_name": "Conv3d"})
    with pytest.raises(TensorslimError, match=r"expects .* to be Conv3d"):
        ts.apply(tiny_cnn, bad)


def test_unknown_method_in_an_edited_plan_is_a_clear_error(planned, tiny_cnn) -> None:
    i = first_compressed_index(planned)
    bad = edited(planned, **{f"layers__{i}__method": "magic"})
    with pytest.raises(TensorslimError, match="unknown method 'magic'"):
        ts.apply(tiny_cnn, bad)


def test_bad_scheme_in_an_edited_plan_is_a_clear_error(planned, tiny_cnn) -> None:
    bad = edited(planned, layers__0__method="svd", layers__0__config={"rank": 1, "scheme": "x"})
    with pytest.raises(TensorslimError, match=r"layer conv1:.*scheme"):
        ts.apply(tiny_cnn, bad)


def test_unknown_and_missing_fields_are_clear_errors(planned) -> None:
    data = planned.to_dict()
    with pytest.raises(TensorslimError, match=r"unknown plan field\(s\) \['colour'\]"):
        CompressionPlan.from_dict({**data, "colour": "blue"})
    layers = [dict(data["layers"][0], rnak=3), *data["layers"][1:]]
    with pytest.raises(TensorslimError, match=r"plan layer 0 has unknown field\(s\) \['rnak'\]"):
        CompressionPlan.from_dict({**data, "layers": layers})
    with pytest.raises(TensorslimError, match="missing"):
        CompressionPlan.from_dict({k: v for k, v in data.items() if k != "model_flops"})
    short = [{k: v for k, v in data["layers"][0].items() if k != "flops_after"}]
    with pytest.raises(TensorslimError, match=r"plan layer 0 .*flops_after"):
        CompressionPlan.from_dict({**data, "layers": short})
    for not_layers in ("conv1", [5], None):
        with pytest.raises(TensorslimError, match="layers"):
            CompressionPlan.from_dict({**data, "layers": not_layers})
    with pytest.raises(TensorslimError, match="mapping"):
        CompressionPlan.from_dict(["not", "a", "plan"])  # type: ignore[arg-type]


def test_invalid_text_and_missing_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(TensorslimError, match="not valid JSON"):
        CompressionPlan.from_text("{nope")
    with pytest.raises(TensorslimError, match="not valid YAML"):
        CompressionPlan.from_text("a: [1, 2", "yaml")
    with pytest.raises(TensorslimError, match="does not exist"):
        CompressionPlan.load(tmp_path / "missing.json")


# ----- stages and refresh ------------------------------------------------------------------------


def test_second_plan_sees_structured_layers_as_already_structured(tiny_cnn, tiny_input) -> None:
    first = ts.plan(tiny_cnn, "svd", None, tiny_input, rank=2, layers=["fc1"])
    small = ts.apply(tiny_cnn, first)
    second = ts.plan(small, "svd", None, tiny_input, rank=2)
    # the factors inside a structured layer (fc1.down, fc1.up) are not layers to compress
    assert [lp.fqn for lp in second.layers] == ["conv1", "conv2", "fc2"]
    twice = ts.apply(small, second)
    assert plans_of(twice) == [first, second]
    assert isinstance(twice.fc1, LowRankLinear) and isinstance(twice.conv1, LowRankConv2d)


def test_refresh_plan_follows_conversions_back_to_dense(tiny_cnn, tiny_input) -> None:
    planned = ts.plan(tiny_cnn, "svd", None, tiny_input, rank=2, scheme="spatial")
    small = ts.apply(tiny_cnn, planned)
    small.fc1 = small.fc1.to_dense()
    fresh = refresh_plan(small, planned)
    assert fresh.layer("fc1").method is None
    assert fresh.layer("fc1").extra["finalized_from"] == "svd"
    assert planned.layer("fc1").method == "svd", "refresh must not modify the original plan"
    assert fresh.layer("fc1").flops_after == fresh.layer("fc1").flops_before
    assert fresh.layer("fc1").params_after == count_params(small.fc1)
    # a structure changed after planning (rank 2 → 1) is read back from the module
    small.conv2 = LowRankConv2d.from_dense(small.conv2.to_dense(), 1, "channel")
    conv2 = refresh_plan(small, planned).layer("conv2")
    assert conv2.method == "svd" and conv2.config == {"rank": 1, "scheme": "channel"}
    assert conv2.label == "svd: channel-wise, 8 → 1 → 16"  # short enough for a table
    # …and so are its costs: the refreshed plan predicts what the model measures
    assert conv2.params_after == count_params(small.conv2)
    assert conv2.flops_after == small.conv2.analytic_flops(tuple(conv2.input_shape))
    final = refresh_plan(small, planned)
    assert final.estimated_flops == count_flops(small, tiny_input[:1])
    assert final.estimated_params == count_params(small)
    assert refresh_plan(small, planned).layer("conv1").config == {"rank": 2, "scheme": "spatial"}
