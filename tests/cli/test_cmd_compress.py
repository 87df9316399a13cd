"""`tensorslim compress --resume` across its phases (base training → compress → fine-tune →
post-finalize): each phase starts from its own seed, so an interruption between two phases,
then --resume, gives bitwise the model of one uninterrupted command."""

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
DATA = ["--model", "lenet5", "--data", "digits", "--limit-train", "256", "--limit-test", "128",
        "--batch-size", "64", "--seed", "2", "--no-progress"]  # fmt: skip
# svd_train has all four phases; the digits loader shuffles, so base training moves its generator
COMPRESS = ["compress", *DATA, "--train-epochs", "1", "--finetune-epochs", "1",
            "--method", "svd_train", "--budget", "flops=0.5"]  # fmt: skip


def _invoke(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """One uninterrupted `compress` that trains its own base."""
    out = tmp_path_factory.mktemp("whole") / "run"
    _invoke(*COMPRESS, "--out", str(out))
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(out / "model" / "model.safetensors"))


def assert_same_model(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    gap = max(float((wa[k] - wb[k]).abs().max()) for k in wb)
    assert all(torch.equal(wa[k], wb[k]) for k in wb), f"max |Δ| {gap}"


def _as_killed(whole: Path, target: Path, keep: list[str]) -> Path:
    """A copy of ``whole`` holding only ``keep`` (the files a kill at that moment leaves)."""
    for name in ["args.json", *keep]:
        source, dest = whole / name, target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, dest)
    return target


def test_phase_seeds_are_recorded(whole: Path) -> None:
    seeds = json.loads((whole / "results.json").read_text())["seeds"]
    phases = ["train", "compress", "fine-tune", "post-finalize"]
    assert seeds == {phase: derive_seed(2, phase) for phase in phases}


@pytest.mark.parametrize(
    "keep",
    [["base"], ["base", "checkpoints/last.pt"]],
    ids=["after-base-training", "after-fine-tune"],
)
def test_resume_between_phases_is_the_same_run(whole: Path, tmp_path: Path, keep) -> None:
    """Killed once base training was saved (compress and fine-tune redo), or once the
    fine-tune's last epoch was checkpointed (post-finalize redoes)."""
    out = _as_killed(whole, tmp_path / "run", keep)
    torch.rand(1000)  # what the process drew before must not matter
    _invoke(*COMPRESS, "--out", str(out), "--resume")
    assert_same_model(out, whole)
    resumed = json.loads((out / "results.json").read_text())
    original = json.loads((whole / "results.json").read_text())
    assert resumed["compressed"]["accuracy"] == original["compressed"]["accuracy"]
    assert resumed["seeds"] == original["seeds"]


def test_train_then_compress_weights_equals_compress_alone(whole: Path, tmp_path: Path) -> None:
    """`train` seeds its training as `compress` seeds its base phase: the two-command route
    reaches the very model of the one-command route."""
    base = tmp_path / "base"
    _invoke("train", *DATA, "--epochs", "1", "--out", str(base))
    assert json.loads((base / "results.json").read_text())["seeds"] == {
        "train": derive_seed(2, "train")
    }
    base_weights = safetensors.torch.load_file(str(base / "model" / "model.safetensors"))
    trained = safetensors.torch.load_file(str(whole / "base" / "model" / "model.safetensors"))
    assert all(torch.equal(base_weights[k], trained[k]) for k in trained)
    out = tmp_path / "run"
    _invoke(*COMPRESS, "--weights", str(base), "--out", str(out))
    assert_same_model(out, whole)
    assert "train" not in json.loads((out / "results.json").read_text())["seeds"]
