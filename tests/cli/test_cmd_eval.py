"""A run directory is data: ``eval`` / ``export`` / ``run`` never import Python code a file names
unless the user trusts it (``--trust-code``) or names the code again on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tensorslim.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]

EVIL = """\
from pathlib import Path

from torch import nn

MARKER = Path({marker!r})
MARKER.write_text("imported")  # what a hostile module would do on import


def build(in_channels=1, num_classes=10):
    MARKER.write_text("built")
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_channels * 28 * 28, 32), nn.ReLU(), nn.Linear(32, num_classes)
    )
"""


@pytest.fixture(scope="module")
def user_code_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(run directory, the module it names, the marker the module writes)."""
    root = tmp_path_factory.mktemp("trust")
    marker = root / "MARKER"
    module = root / "evil.py"
    module.write_text(EVIL.format(marker=str(marker)))
    run = root / "run"
    result = runner.invoke(
        app,
        ["compress", "--model", f"{module}:build", "--data", "synthetic", "--limit-train", "64",
         "--limit-test", "32", "--batch-size", "32", "--train-epochs", "1",
         "--finetune-epochs", "0", "--method", "svd", "--budget", "params=0.5",
         "--no-progress", "--out", str(run)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    marker.unlink()
    return run, module, marker


def _tensorslim(*args: str) -> subprocess.CompletedProcess:
    """A fresh process, as a user runs it (nothing imported before)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "tensorslim", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [["eval"], ["export", "--format", "safetensors"]])
def test_a_run_naming_python_code_is_refused(user_code_run, command: list[str]) -> None:
    run, module, marker = user_code_run
    result = _tensorslim(command[0], str(run), *command[1:])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "--trust-code" in lines[0] and f"{module}:build" in lines[0]
    assert not marker.exists(), "the module named by args.json was executed"


def test_trust_code_or_naming_the_builder_again_runs_it(user_code_run) -> None:
    run, module, marker = user_code_run
    trusted = runner.invoke(app, ["eval", str(run), "--trust-code"])
    assert trusted.exit_code == 0, trusted.output
    assert marker.read_text() == "built" and "accuracy" in trusted.stdout
    marker.unlink()
    named = runner.invoke(app, ["eval", str(run), "--model", f"{module}:build"])
    assert named.exit_code == 0, named.output
    assert marker.exists()


def test_a_recipe_naming_python_code_needs_trust(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    module = tmp_path / "evil_recipe_model.py"
    module.write_text(EVIL.format(marker=str(marker)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""\
            name: untrusted
            model: {{name: "{module}:build"}}
            data: {{name: synthetic, batch_size: 32, limit_train: 64, limit_test: 32}}
            stages:
              - {{stage: train, epochs: 1}}
            """
        )
    )
    out = tmp_path / "out"
    refused = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--no-progress"])
    assert refused.exit_code == 2 and "--trust-code" in refused.stderr, refused.output
    assert not marker.exists() and not out.exists()
    trusted = runner.invoke(
        app, ["run", str(recipe), "--out", str(out), "--no-progress", "--trust-code"]
    )
    assert trusted.exit_code == 0, trusted.output
    assert marker.read_text() == "built"


def test_loading_weights_without_a_manifest_warns(tmp_path: Path) -> None:
    run = tmp_path / "run"
    made = runner.invoke(
        app,
        ["train", "--model", "lenet5", "--data", "synthetic", "--limit-train", "64",
         "--limit-test", "32", "--batch-size", "32", "--epochs", "1", "--no-progress",
         "--out", str(run)],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    quiet = runner.invoke(app, ["eval", str(run)])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr, quiet.output
    (run / "model" / "manifest.json").unlink()
    warned = runner.invoke(app, ["eval", str(run)])
    assert warned.exit_code == 0, warned.output
    lines = [line for line in warned.stderr.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 1 and "manifest.json" in lines[0] and "checksum" in lines[0]
