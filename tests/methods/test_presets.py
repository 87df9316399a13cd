"""Named presets: ``preset="paper"`` everywhere a method is built; explicit settings win."""

from __future__ import annotations

import pytest
import torch

import tensorslim as ts
from tensorslim.cli.common import parse_method
from tensorslim.errors import TensorslimError
from tensorslim.methods import get_method, list_methods, method_class
from tensorslim.methods.presets import get_preset, preset_names, resolve_training
from tensorslim.models import create_model
from tensorslim.recipes.schema import parse_recipe


def test_every_declared_preset_builds_its_method_with_its_values() -> None:
    for name in list_methods():
        cls = method_class(name)
        assert preset_names(cls)[0] == "default"
        for preset in cls.presets:
            built = get_method(name, preset=preset).settings()
            for key, value in get_preset(cls, preset).settings.items():
                assert built[key] == value, (name, preset, key)


def test_rpg_paper_preset_and_explicit_override() -> None:
    paper = get_method("rpg", preset="paper").settings()
    assert paper["schedule"] == "exponential" and paper["interval"] == 100
    assert paper["end"] == 0.9 and paper["scope"] == "global"
    assert paper["keep_first_dense"] is False
    mixed = get_method("rpg", preset="paper", end=0.5).settings()
    assert mixed["end"] == 0.5 and mixed["schedule"] == "exponential"
    # "default" (or no preset) is the method's own defaults
    assert get_method("rpg", preset="default").settings() == get_method("rpg").settings()


def test_unknown_preset_is_one_line_listing_the_valid_ones() -> None:
    with pytest.raises(
        TensorslimError,
        match=r"unknown preset 'papr' for method 'rpg' \(valid: "
        r"default, paper\)",
    ) as info:
        get_method("rpg", preset="papr")
    assert "\n" not in str(info.value)


def test_training_values_explicit_then_preset_then_defaults() -> None:
    cls = method_class("rpg")
    defaults = {"lr": 0.01, "optimizer": "sgd"}
    assert resolve_training(cls, None, defaults, lr=None) == defaults
    assert resolve_training(cls, "paper", defaults, lr=0.2)["lr"] == 0.2


def test_plan_takes_the_preset() -> None:
    model = create_model("small_cnn", in_channels=1, num_classes=10)
    plan = ts.plan(model, "rpg", "params=0.2", torch.randn(2, 1, 28, 28), preset="paper")
    assert plan.settings["schedule"] == "exponential" and plan.settings["interval"] == 100
    assert plan.settings["sparsity"] == pytest.approx(0.8)


def test_cli_preset_goes_into_the_settings_under_set_values() -> None:
    parsed = parse_method("rpg", "params=0.1", ["end=0.6"], "paper")
    assert parsed.method.schedule == "exponential" and parsed.method.end == 0.6
    with pytest.raises(TensorslimError, match="unknown preset"):
        parse_method("rpg", None, None, "nope")


RECIPE = """\
name: p
model: {name: lenet5}
data: {name: synthetic}
stages:
  - {stage: train, epochs: 1}
  - stage: prune
    method: rpg
    epochs: 1
    preset: PRESET
    settings: {end: 0.7}
"""


def test_recipe_preset_is_validated() -> None:
    stage = parse_recipe(RECIPE.replace("PRESET", "paper")).stages[1]
    assert stage.preset == "paper"
    with pytest.raises(
        TensorslimError,
        match=r"r\.yaml:9: stages\[1\]\.preset: unknown preset "
        r"'papr' for method 'rpg' \(valid: default, paper\)",
    ):
        parse_recipe(RECIPE.replace("PRESET", "papr"), "r.yaml")
