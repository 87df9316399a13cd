"""Running recipes end to end: artefacts, resume after a kill, bad input before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
from typer.testing import CliRunner

from tensorslim.cli import app
from tensorslim.errors import TensorslimError
from tensorslim.recipes.runner import run_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny.yaml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_tiny_recipe_writes_every_artefact(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run_recipe(TINY, out, progress=False, log=lambda m: None)
    for name in ("recipe.yaml", "results.json", "report.md", "report.html", "pareto.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    for key in ("original", "compressed"):
        for field in ("accuracy", "params", "flops", "latency_ms"):
            assert results[key][field] is not None
    assert results["compressed"]["flops"] < results["original"]["flops"]
    assert [s["stage"] for s in results["stages"]] == ["train", "compress", "finetune", "evaluate"]
    assert summary["flops_fraction"] == pytest.approx(
        results["compressed"]["flops"] / results["original"]["flops"]
    )
    # every stage saved its model and a done marker; nothing half-written is left
    stages = sorted((out / "stages").iterdir())
    assert len(stages) == 4 and all((s / "done.json").is_file() for s in stages)
    assert not list(out.rglob("*.tmp"))


def test_second_run_into_nonempty_dir_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(TensorslimError, match="not empty"):
        run_recipe(TINY, out, progress=False)


def test_missing_dataset_fails_before_work(tmp_path: Path) -> None:
    recipe = _write(tmp_path, TINY.read_text().replace("name: synthetic", "name: nosuchdata"))
    out = tmp_path / "run"
    with pytest.raises(TensorslimError, match="unknown dataset"):
        run_recipe(recipe, out, progress=False)
    assert not out.exists(), "a run that failed before any work must leave no directory"


def test_an_unknown_method_fails_before_training(tmp_path: Path) -> None:
    recipe = _write(tmp_path, TINY.read_text().replace("method: svd", "method: svdd"))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown method 'svdd'" in lines[0], result.stderr
    assert "stages[1].method" in lines[0]
    assert not out.exists(), "nothing may run (or be written) before the recipe is valid"


def test_unwritable_output_dir(tmp_path: Path) -> None:
    # /proc refuses new directories even for root, unlike a chmod-ed folder
    with pytest.raises(TensorslimError, match="cannot"):
        run_recipe(TINY, Path("/proc/tensorslim-test/run"), progress=False)


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(TensorslimError, match="is a file"):
        run_recipe(TINY, target, progress=False)


def test_cli_run_error_is_one_line(tmp_path: Path) -> None:
    recipe = _write(tmp_path, TINY.read_text().replace("epochs: 1, lr: 0.05", "epochs: x"))
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "epochs" in result.output


LONG = """\
name: long
model: {name: lenet5}
data: {name: synthetic, batch_size: 16}
stages:
  - {stage: train, epochs: 6, lr: 0.05}
  - {stage: compress, method: svd, budget: flops=0.5, allow_slower: true}
  - {stage: evaluate, latency: false}
"""


def test_sigkill_mid_run_then_resume_loses_at_most_one_epoch(tmp_path: Path) -> None:
    recipe = _write(tmp_path, LONG)
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "tensorslim",
        "run",
        str(recipe),
        "--out",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "stages" / "00-train" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import torch

    saved_epoch = torch.load(checkpoint, weights_only=True)["epoch"]
    assert saved_epoch >= 1
    assert not list(out.rglob("*.tmp")), "a half-written file was left behind"
    result = subprocess.run(
        [*command, "--resume"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {checkpoint} after epoch {saved_epoch}" in result.stderr
    done = json.loads((out / "stages" / "00-train" / "done.json").read_text())
    assert [h["epoch"] for h in done["history"]] == list(range(1, 7))
    assert (out / "results.json").is_file()
    # resuming a finished run skips every stage
    again = subprocess.run(
        [*command, "--resume"], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and again.stderr.count("already done") == 3


def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo): ranks end identical and match a 1-process run."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "tensorslim",
            "run",
            str(TINY),
            "--out",
            str(ddp_out),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorslim",
            "run",
            str(TINY),
            "--out",
            str(single_out),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    rank0 = json.loads((ddp_out / "ranks" / "rank0.json").read_text())
    rank1 = json.loads((ddp_out / "ranks" / "rank1.json").read_text())
    assert rank0 == rank1, "ranks hold different weights"
    final = "stages/03-evaluate/model/model.safetensors"
    a = safetensors.torch.load_file(str(ddp_out / final))
    b = safetensors.torch.load_file(str(single_out / final))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-4, key


BN_RECIPE = """\
name: bn
model: {name: small_cnn, kwargs: {width: 0.25}}
data: {name: digits, batch_size: 32, limit_train: 256, limit_test: 64}
stages:
  - {stage: train, epochs: 1, lr: 0.05}
  - {stage: compress, method: svd, budget: flops=0.5, recalibrate_bn: 4, allow_slower: true}
  - {stage: finetune, epochs: 1, lr: 0.01}
  - {stage: evaluate, latency: false}
"""


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "tensorslim", *args]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_end_with_the_same_batchnorm_statistics(tmp_path: Path) -> None:
    """BatchNorm statistics (recalibrated on each rank's shard, updated by each rank's last
    training step) are the same on both ranks at the end, as the saved model's are."""
    out = tmp_path / "ddp"
    result = _torchrun("run", str(_write(tmp_path, BN_RECIPE)), "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = json.loads((out / "ranks" / "rank0.json").read_text())
    rank1 = json.loads((out / "ranks" / "rank1.json").read_text())
    statistics = [name for name in rank0 if name.endswith(("running_mean", "running_var"))]
    assert len(statistics) >= 10, sorted(rank0)
    assert rank0 == rank1, [name for name in rank0 if rank0[name] != rank1.get(name)]


def test_an_error_on_rank_0_ends_the_other_rank_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")  # rank 0 refuses the non-empty directory
    result = _torchrun("run", str(TINY), "--out", str(out), "--no-progress")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr
    assert any("is not empty" in line and not line.startswith("error: rank") for line in errors)
    assert any(line.startswith("error: rank 1 stops: rank 0 failed") for line in errors), errors
    for noise in ("Connection closed by peer", "Connection reset by peer", "pair.cc"):
        assert noise not in result.stderr, noise
