"""Recipe validation: every bad input is a one-line error naming the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorslim.errors import TensorslimError
from tensorslim.recipes.schema import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[2]
GOOD = """\
name: ok
model: {name: lenet5}
data: {name: synthetic, batch_size: 32}
stages:
  - stage: train
    epochs: 1
  - stage: compress
    method: svd
    budget: flops=0.5
  - stage: finetune
    epochs: 1
"""


def test_good_recipe_parses_with_defaults() -> None:
    recipe = parse_recipe(GOOD)
    assert [s.stage for s in recipe.stages] == ["train", "compress", "finetune"]
    assert recipe.stages[0].lr == 0.05 and recipe.stages[2].lr == 0.01
    assert recipe.data.batch_size == 32 and recipe.seed == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace("    epochs: 1\n  - stage: compress", "    epocs: 1\n  - stage: compress"),
            ["r.yaml:6:", "stages[0].epocs", "unknown key 'epocs'"],
        ),
        (
            GOOD.replace("epochs: 1\n  - stage: compress", "epochs: one\n  - stage: compress"),
            ["r.yaml:6:", "stages[0].epochs", "integer"],
        ),
        (
            GOOD.replace("budget: flops=0.5", "budget: flops=2"),
            ["r.yaml:9:", "stages[1].budget", "fraction"],
        ),
        (
            GOOD.replace("stage: finetune", "stage: fine-tune"),
            ["r.yaml:10:", "stages[2]", "fine-tune"],
        ),
        (
            GOOD.replace(
                "data: {name: synthetic, batch_size: 32}", "data: {name: synthetic, batch: 3}"
            ),
            ["r.yaml:3:", "data.batch", "unknown key"],
        ),
        (GOOD.replace("model: {name: lenet5}\n", ""), ["model", "missing key 'model'"]),
        (
            GOOD.replace("  - stage: train\n    epochs: 1\n", ""),
            ["r.yaml:5:", "stages[0]", "needs a trained model"],
        ),
        (
            GOOD.replace("method: svd", "method: svdd"),
            ["r.yaml:8:", "stages[1].method", "unknown method 'svdd'", "did you mean 'svd'"],
        ),
        (
            GOOD.replace(
                "    budget: flops=0.5", "    budget: flops=0.5\n    settings: {schem: x}"
            ),
            ["r.yaml:10:", "stages[1].settings", "method 'svd'", "schem"],
        ),
        (
            GOOD.replace(
                "    budget: flops=0.5", "    budget: flops=0.5\n    settings: {scheme: x}"
            ),
            ["r.yaml:10:", "stages[1].settings", "scheme"],
        ),
        (
            GOOD.replace("method: svd", "method: rpg"),
            ["r.yaml:8:", "stages[1].method", "during training", "'prune' stage"],
        ),
        (
            GOOD + "  - {stage: prune, epochs: 1, settings: {sparsty: 0.5}}\n",
            ["r.yaml:12:", "stages[3].settings", "method 'rpg'", "sparsty"],
        ),
        (
            GOOD + "  - {stage: svd_train, epochs: 1, settings: {reg: l3}}\n",
            ["r.yaml:12:", "stages[3].settings", "l3"],
        ),
        ("model: [unclosed", ["r.yaml", "not valid YAML"]),
        ("- just a list", ["r.yaml", "mapping"]),
    ],
)
def test_bad_recipes_name_line_and_key(text: str, expected: list[str]) -> None:
    with pytest.raises(TensorslimError) as info:
        parse_recipe(text, "r.yaml")
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_weights_make_a_model_trained(tmp_path: Path) -> None:
    text = GOOD.replace("model: {name: lenet5}", "model: {name: lenet5, weights: w.safetensors}")
    text = text.replace("  - stage: train\n    epochs: 1\n", "")
    assert parse_recipe(text).stages[0].stage == "compress"


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path: Path) -> None:
    load_recipe(path)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(TensorslimError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
