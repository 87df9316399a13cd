"""The run scaffold every command shares: bad input fails before work and leaves no directory,
a failure after work keeps the run and names the command that continues it, a resume with
other arguments is refused, a hostile checkpoint is one line, and nothing is silent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tensorslim.cli.cmd_compress as cmd_compress
from tensorslim.cli import app
from tensorslim.errors import TensorslimError

runner = CliRunner()
DATA = ["--data", "synthetic", "--limit-train", "64", "--limit-test", "32", "--batch-size", "32"]
TRAIN = ["train", "--model", "lenet5", *DATA, "--epochs", "1", "--no-progress"]


def one_line_error(result, *, after_work: bool = False) -> str:
    """The error line; alone on stderr unless the command logged progress before failing."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert after_work or len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return errors[0]


def test_a_command_that_fails_before_work_leaves_no_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    wrong = [*TRAIN, "--out", str(out)]
    wrong[wrong.index("lenet5")] = "lenet9"
    assert "lenet9" in one_line_error(runner.invoke(app, wrong))
    assert not out.exists(), "a failed command left its run directory behind"
    fixed = runner.invoke(app, [*TRAIN, "--out", str(out)])  # not refused as "not empty"
    assert fixed.exit_code == 0, fixed.output


@pytest.mark.parametrize(
    "command",
    [["train", "--model", "lenet5"], ["compress", "--model", "lenet5"],
     ["multistage", "--model", "lenet5"], ["inspect", "--model", "lenet5"]],
)  # fmt: skip
def test_a_data_dir_that_does_not_exist_is_an_error(tmp_path: Path, command) -> None:
    out = tmp_path / "run"
    args = [*command, "--data", "fashion-mnist", "--data-dir", str(tmp_path / "nonexistent")]
    if command[0] != "inspect":
        args += ["--out", str(out)]
    line = one_line_error(runner.invoke(app, args))
    assert str(tmp_path / "nonexistent") in line and "does not exist" in line
    assert not out.exists()


def test_a_failure_after_work_keeps_the_run_and_says_how_to_continue(
    tmp_path: Path, monkeypatch
) -> None:
    def broken(*args, **kwargs):
        raise TensorslimError("the planner broke")

    monkeypatch.setattr(cmd_compress, "compress_model", broken)
    out = tmp_path / "run"
    args = ["compress", "--model", "lenet5", *DATA, "--train-epochs", "1", "--no-progress",
            "--set", "scheme=channel", "--set", "rank=4", "--out", str(out)]  # fmt: skip
    line = one_line_error(runner.invoke(app, args), after_work=True)
    # the user's options, in the command's own order, plus --resume
    expected = (
        "tensorslim compress --model lenet5 --data synthetic --train-epochs 1 --set scheme=channel "
        f"--set rank=4 --batch-size 32 --limit-train 64 --limit-test 32 --out {out} "
        "--no-progress --resume"
    )
    assert line.startswith("error: the planner broke; continue with: "), line
    assert line.endswith(expected), (line, expected)
    assert (out / "base" / "model" / "model.safetensors").is_file(), "the base training is kept"


def test_resuming_with_other_arguments_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert runner.invoke(app, [*TRAIN, "--out", str(out)]).exit_code == 0
    other = [*TRAIN, "--out", str(out), "--resume"]
    other[other.index("--epochs") + 1] = "3"
    line = one_line_error(runner.invoke(app, other))
    assert "epochs=1 (now 3)" in line and "--overwrite" in line
    again = runner.invoke(app, ["compress", "--model", "lenet5", "--out", str(out), "--resume"])
    assert "is a 'train' run" in one_line_error(again)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    out, marker = tmp_path / "run", tmp_path / "MARKER"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 1, "payload": _Evil(marker)}, out / "checkpoints" / "last.pt")
    line = one_line_error(runner.invoke(app, [*TRAIN, "--out", str(out), "--resume"]))
    assert "last.pt was refused" in line and "GLOBAL" in line
    assert not marker.exists(), "the pickled payload ran"
