"""``tensorslim multistage`` through typer's test runner: a tiny real run and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tensorslim as ts
from tensorslim.cli import app
from tensorslim.models import create_model

runner = CliRunner()

TINY = [
    "--model", "lenet5", "--data", "synthetic", "--limit-train", "128", "--limit-test", "64",
    "--batch-size", "64", "--train-epochs", "1", "--epochs-per-stage", "1", "--no-progress",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_multistage_run_writes_stages_and_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "multistage",
            *TINY,
            "--method",
            "tucker",
            "--stages",
            "2",
            "--budget",
            "flops=0.5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("args.json", "plan.json", "results.json", "report.md", "model"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [r["stage"] for r in runs] == [1, 2]
    assert runs[-1]["flops_fraction"] <= 0.5 * 1.03
    stages = json.loads((out / "model" / "plan.json").read_text())["stages"]
    assert len(stages) == 2
    model = ts.load(out / "model", base_model=create_model("lenet5", in_channels=1, num_classes=10))
    assert sum(p.numel() for p in model.parameters()) == runs[-1]["compressed"]["params"]


def test_bad_method_setting_fails_cleanly(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["multistage", *TINY, "--set", "rank_rule=magic", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code != 0
    assert "rank_rule" in result.output
