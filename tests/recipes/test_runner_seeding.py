"""A resumed recipe is the same run: every stage starts from its own seed, so deleting finished
stages (the state a kill leaves) or stopping after a stage and resuming gives bitwise the weights
of one uninterrupted run — also when a stage draws random numbers at its start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

import tensorslim.train.loop as loop
from tensorslim.errors import TensorslimError
from tensorslim.recipes.runner import run_recipe
from tensorslim.recipes.schema import STRUCTURE_STAGES
from tensorslim.train.seeding import derive_seed

# Dropout in the model and a shuffling loader: the fine-tune draws random numbers from its first
# step; the randomized SVD draws them at the start of the compress stage.
NET = """\
from torch import nn


def build(in_channels=1, num_classes=10):
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(6 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(128, num_classes),
    )
"""
RECIPE = """\
name: seeded
model: {{name: "{net}:build"}}
data: {{name: digits, batch_size: 64, limit_train: 256, limit_test: 128, shuffle: true}}
seed: 3
stages:
  - {{stage: train, epochs: 1, lr: 0.05}}
  - {{stage: compress, method: svd, budget: flops=0.3, allow_slower: true,
     settings: {{driver: randomized}}}}
  - {{stage: finetune, epochs: 2, lr: 0.01}}
  - {{stage: evaluate, latency: false}}
"""
# SVD training from scratch: the structured layers' factors are drawn at random at its start
FROM_SCRATCH = """\
name: scratch
model: {{name: "{net}:build"}}
data: {{name: digits, batch_size: 64, limit_train: 256, limit_test: 128, shuffle: true}}
seed: 5
stages:
  - {{stage: train, epochs: 1, lr: 0.05}}
  - {{stage: svd_train, epochs: 1, finetune_epochs: 1, budget: flops=0.6,
      settings: {{from_scratch: true}}}}
  - {{stage: evaluate, latency: false}}
"""


def _quiet(message: str) -> None:
    """Log sink."""


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seeded")
    net = root / "net.py"
    net.write_text(NET)
    paths = {}
    for name, text in (("seeded", RECIPE), ("scratch", FROM_SCRATCH)):
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(text.format(net=net))
    return paths


@pytest.fixture(scope="module")
def uninterrupted(recipes, tmp_path_factory) -> dict[str, Path]:
    """Each recipe run once to the end, in one process."""
    root = tmp_path_factory.mktemp("whole")
    runs = {}
    for name, path in recipes.items():
        runs[name] = root / name
        run_recipe(path, runs[name], progress=False, log=_quiet)
    return runs


def _stage_weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        stage.name: safetensors.torch.load_file(str(stage / "model" / "model.safetensors"))
        for stage in sorted((run / "stages").iterdir())
    }


def assert_same_run(resumed: Path, whole: Path) -> None:
    """Every stage's weights bitwise equal (the message gives max |Δ| per stage if not)."""
    a, b = _stage_weights(resumed), _stage_weights(whole)
    assert a.keys() == b.keys()
    gaps = {
        stage: max(float((a[stage][k] - b[stage][k]).abs().max()) for k in b[stage]) for stage in b
    }
    assert all(a[s].keys() == b[s].keys() for s in b)
    assert all(torch.equal(a[s][k], b[s][k]) for s in b for k in b[s]), f"max |Δ| {gaps}"
    resumed_results = json.loads((resumed / "results.json").read_text())
    whole_results = json.loads((whole / "results.json").read_text())
    assert resumed_results["compressed"]["accuracy"] == whole_results["compressed"]["accuracy"]


def _cut(whole: Path, target: Path, first_missing: int) -> Path:
    """A copy of a finished run as a kill right after stage ``first_missing - 1`` leaves it."""
    shutil.copytree(whole, target)
    stages = sorted((target / "stages").iterdir())
    for stage in stages[first_missing:]:
        shutil.rmtree(stage)
    if not any(kind in s.name for s in stages[:first_missing] for kind in STRUCTURE_STAGES):
        shutil.rmtree(target / "original")  # written when the first structure stage starts
    for name in ("results.json", "report.md", "report.html"):
        (target / name).unlink()
    return target


@pytest.mark.parametrize("first_missing", [2, 1], ids=["finetune-on", "compress-on"])
def test_deleting_the_last_stages_then_resuming_is_the_same_run(
    recipes, uninterrupted, tmp_path: Path, first_missing: int
) -> None:
    """The issue's reproducer (delete 02-finetune and 03-evaluate), and the same from the
    randomized compress on."""
    run = _cut(uninterrupted["seeded"], tmp_path / "run", first_missing)
    run_recipe(recipes["seeded"], run, resume=True, progress=False, log=_quiet)
    assert_same_run(run, uninterrupted["seeded"])


def test_stopped_between_compress_and_finetune_then_resumed(
    recipes, uninterrupted, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    # whatever the process drew before must not matter: move the global generator on
    torch.rand(1000)
    stopped = run_recipe(recipes["seeded"], run, progress=False, log=_quiet, stop_after=1)
    assert stopped["stopped_after"] == 1
    assert [s["stage"] for s in stopped["stages"]] == ["train", "compress"]
    assert sorted(p.name for p in (run / "stages").iterdir()) == ["00-train", "01-compress"]
    assert not (run / "results.json").exists()
    torch.rand(1000)
    run_recipe(recipes["seeded"], run, resume=True, progress=False, log=_quiet)
    assert_same_run(run, uninterrupted["seeded"])


def test_killed_inside_the_finetune_after_a_resume(
    recipes, uninterrupted, tmp_path: Path, monkeypatch
) -> None:
    """Stage seed and epoch checkpoint together: resumed after compress, interrupted after the
    fine-tune's first epoch, resumed again: still the uninterrupted run."""
    run = _cut(uninterrupted["seeded"], tmp_path / "run", 2)
    real_save = loop.save_checkpoint

    def save_then_interrupt(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipes["seeded"], run, resume=True, progress=False, log=_quiet)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    checkpoint = run / "stages" / "02-finetune" / "checkpoints" / "last.pt"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    messages: list[str] = []
    run_recipe(recipes["seeded"], run, resume=True, progress=False, log=messages.append)
    assert any("after epoch 1" in m for m in messages), messages
    assert_same_run(run, uninterrupted["seeded"])


def test_random_init_of_a_structured_layer_after_a_resume(
    recipes, uninterrupted, tmp_path: Path
) -> None:
    """svd_train from scratch draws its factors at its start, then trains and fine-tunes."""
    run = _cut(uninterrupted["scratch"], tmp_path / "run", 1)
    run_recipe(recipes["scratch"], run, resume=True, progress=False, log=_quiet)
    assert_same_run(run, uninterrupted["scratch"])


def test_results_record_each_stage_seed(uninterrupted) -> None:
    results = json.loads((uninterrupted["seeded"] / "results.json").read_text())
    kinds = ["train", "compress", "finetune", "evaluate"]
    assert [s["stage"] for s in results["stages"]] == kinds
    assert [s["seed"] for s in results["stages"]] == [
        derive_seed(3, "stage", i, kind) for i, kind in enumerate(kinds)
    ]
    compress = results["stages"][1]
    assert compress["seeds"] == {"compress": derive_seed(compress["seed"], "compress")}
    done = json.loads(
        (uninterrupted["seeded"] / "stages" / "02-finetune" / "done.json").read_text()
    )
    assert done["seed"] == results["stages"][2]["seed"]


def test_stop_after_must_name_a_stage(recipes, tmp_path: Path) -> None:
    with pytest.raises(TensorslimError, match=r"stop_after=4 .*\(0\.\.3\)"):
        run_recipe(recipes["seeded"], tmp_path / "run", progress=False, stop_after=4)
    assert not (tmp_path / "run").exists()
