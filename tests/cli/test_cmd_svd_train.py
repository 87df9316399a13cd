"""``tensorslim svd-train`` through typer's test runner: a real run and the error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tensorslim.cli import app

runner = CliRunner()

TINY = [
    "--model", "lenet5", "--data", "synthetic", "--limit-train", "128", "--limit-test", "64",
    "--batch-size", "64", "--train-epochs", "1", "--epochs", "1", "--finetune-epochs", "1",
    "--no-progress",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_run_writes_the_compress_artefacts_and_ranks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "svd-train",
            *TINY,
            "--target-flops",
            "0.5",
            "--linear",
            "--exclude",
            "fc3",
            "--budget-gate-energy",
            "0.01",
            "--no-finetune-orthogonality",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("args.json", "plan.json", "results.json", "report.md", "model"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    for entry in ("original", "compressed"):
        for key in ("accuracy", "params", "flops", "latency_ms"):
            assert isinstance(results[entry][key], int | float), (entry, key)
    assert results["compressed"]["flops"] <= 0.5 * results["original"]["flops"]
    assert results["flops_fraction"] <= 0.5
    ranks = {row["layer"]: row for row in results["ranks"]}
    assert set(ranks) == {"conv1", "conv2", "fc1", "fc2"}  # fc3 excluded: stays dense
    assert all(1 <= r["rank_after"] <= r["rank_before"] == r["full_rank"] for r in ranks.values())
    assert [h["stage"] for h in results["history"]] == ["svd_train", "finetune"]
    assert results["settings"]["budget_gate_energy"] == 0.01
    assert results["settings"]["finetune_orthogonality"] is False
    assert 0.0 <= results["history"][0]["sparsity_on_share"] <= 1.0
    assert "rank_after" in result.output and "reduction" in result.output
    # the saved model is rebuilt from its plan by `tensorslim eval`
    evaluated = runner.invoke(app, ["eval", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((out / "eval.json").read_text())["flops"] == results["compressed"]["flops"]


def test_paper_preset_with_its_first_stage(tmp_path: Path) -> None:
    """--preset paper trains as the official code (Adam, no weight decay, step schedule, no
    BatchNorm re-estimation); an explicit --lr wins over the preset's."""
    out = tmp_path / "run"
    args = ["--preset", "paper", "--orthogonal-epochs", "1", "--energy", "0.1", "--lr", "0.002"]
    result = runner.invoke(app, ["svd-train", *TINY, *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["preset"] == "paper" and settings["recalibrate_bn"] == 0
    assert settings["training"] == {
        "optimizer": "adam",
        "lr": 0.002,
        "finetune_lr": 1e-3,
        "weight_decay": 0.0,
        "schedule": "step",
    }
    history = json.loads((out / "results.json").read_text())["history"]
    assert [h["stage"] for h in history] == ["orthogonal", "svd_train", "finetune"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--energy", "1.5"], "outside [0, 1)"),
        (["--energy", "0.1", "--lambda-s", "-1"], "lambda_s must be ≥ 0"),
        (["--energy", "0.1", "--lambda-o", "-2"], "lambda_o must be ≥ 0"),
        (["--energy", "0.1", "--target-flops", "0.5"], "exactly one"),
        ([], "exactly one"),
        (["--energy", "0.1", "--reg", "l3"], "unknown sparsity regularizer"),
        (["--energy", "0.1", "--scheme", "diag"], "unknown SVD scheme"),
        (["--energy", "0.1", "--from-scratch", "--weights", "w.safetensors"], "not both"),
        (["--energy", "0.1", "--model", "resnet7"], "unknown model"),
        (["--energy", "0.1", "--exclude", "fc9"], "no layer of that name"),
        (["--energy", "0.1", "--budget-gate-energy", "0.01"], "needs target_flops"),
        (["--energy", "0.1", "--preset", "official"], "unknown preset 'official'"),
        (["--energy", "0.1", "--schedule", "linear"], "unknown schedule 'linear'"),
    ],
)
def test_bad_input_is_one_line_before_any_work(tmp_path: Path, extra: list[str], message) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["svd-train", *TINY, *extra, "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    if message not in ("unknown model", "no layer of that name"):  # checked once the model exists
        assert not out.exists()
