"""`tensorslim svd-train --resume` across its phases (base training → SVD training → pruning →
fine-tune): each phase starts from its own seed, so an interruption between two phases, then
--resume, gives bitwise the model of one uninterrupted command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from tensorslim.cli import app
from tensorslim.train.seeding import derive_seed

runner = CliRunner()
# the digits loader shuffles and BatchNorm recalibration draws batches: every phase draws
SVD_TRAIN = ["svd-train", "--model", "lenet5", "--data", "digits", "--limit-train", "256",
             "--limit-test", "128", "--batch-size", "64", "--seed", "2", "--no-progress",
             "--train-epochs", "1", "--epochs", "1", "--finetune-epochs", "1",
             "--target-flops", "0.5", "--recalibrate-bn", "2"]  # fmt: skip
PHASES = ["train", "decompose", "svd_train", "prune", "finetune"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _invoke(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """One uninterrupted `svd-train` that trains its own base."""
    out = tmp_path_factory.mktemp("whole") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    _invoke(*SVD_TRAIN, "--out", str(out))
    torch.set_num_threads(before)
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(out / "model" / "model.safetensors"))


def _as_killed(whole: Path, target: Path, keep: list[str]) -> Path:
    """A copy of ``whole`` holding only ``keep`` (the files a kill at that moment leaves)."""
    for name in ["args.json", *keep]:
        source, dest = whole / name, target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, dest)
    return target


def test_phase_seeds_are_recorded(whole: Path) -> None:
    seeds = json.loads((whole / "results.json").read_text())["seeds"]
    assert seeds == {phase: derive_seed(2, phase) for phase in PHASES}


@pytest.mark.parametrize(
    "keep",
    [["base"], ["base", "checkpoints/svd_train"]],
    ids=["after-base-training", "after-svd-training"],
)
def test_resume_between_phases_is_the_same_run(whole: Path, tmp_path: Path, keep) -> None:
    """Killed once base training was saved (SVD training, pruning and fine-tune redo), or once
    SVD training's last epoch was checkpointed (pruning with its BatchNorm batches and the
    fine-tune redo): the resumed run's weights are bitwise the uninterrupted run's."""
    out = _as_killed(whole, tmp_path / "run", keep)
    torch.rand(1000)  # what the process drew before must not matter
    _invoke(*SVD_TRAIN, "--out", str(out), "--resume")
    first, again = _weights(whole), _weights(out)
    assert first.keys() == again.keys()
    gap = max(float((first[k] - again[k]).abs().max()) for k in first)
    assert all(torch.equal(first[k], again[k]) for k in first), f"max |Δ| {gap}"
    resumed = json.loads((out / "results.json").read_text())
    original = json.loads((whole / "results.json").read_text())
    assert resumed["compressed"]["accuracy"] == original["compressed"]["accuracy"]
    assert resumed["seeds"] == original["seeds"]
    assert [r["rank_after"] for r in resumed["ranks"]] == [
        r["rank_after"] for r in original["ranks"]
    ]
