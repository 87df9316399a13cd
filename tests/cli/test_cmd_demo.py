"""``tensorslim demo``: every method shown, the report written as results arrive, Ctrl-C says
how to continue, ``--resume`` continues after the last finished configuration, and each
configuration's randomness depends on its own name only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tensorslim.cli.cmd_demo as cmd_demo
from tensorslim.cli import app
from tensorslim.cli.common import setup
from tensorslim.methods import list_methods

runner = CliRunner()


def test_the_default_demo_shows_every_registered_method() -> None:
    configs = cmd_demo.demo_configs(cmd_demo.MODES["default"])
    assert {c.method for c in configs} == set(list_methods())
    assert {c.label for c in configs} >= {"svd", "svd-spatial"}
    assert len({c.name for c in configs}) == len(configs), "configuration names must be unique"
    full = cmd_demo.demo_configs(cmd_demo.MODES["full"])
    assert len(full) > len(configs) and {c.method for c in full} == set(list_methods())


def _draws(s) -> tuple[torch.Tensor, list[int]]:
    return torch.rand(3), next(iter(s.train_loader))[1][:8].tolist()


def test_a_configuration_is_seeded_by_its_name_not_by_what_ran_before() -> None:
    s = setup(model_name="lenet5", data="synthetic", data_dir=None, seed=0, batch_size=16)
    first, second = cmd_demo.demo_configs(cmd_demo.MODES["quick"])
    cmd_demo.seed_config(s, 0, second)
    alone = _draws(s)
    cmd_demo.seed_config(s, 0, first)
    _draws(s), _draws(s)  # the first configuration consumes random numbers and batches
    cmd_demo.seed_config(s, 0, second)
    after_first = _draws(s)
    assert torch.equal(alone[0], after_first[0]) and alone[1] == after_first[1]
    cmd_demo.seed_config(s, 1, second)
    assert not torch.equal(_draws(s)[0], alone[0]), "the demo seed must matter"


@pytest.fixture
def small_quick_mode(monkeypatch) -> None:
    """A quicker --quick (one base epoch, two short configurations) for the CLI tests."""
    mode = cmd_demo.Mode("quick", 2, (0.5,), 1, 0.05, labels=("svd", "tucker"))
    monkeypatch.setitem(cmd_demo.MODES, "quick", mode)


@pytest.mark.slow
def test_demo_interrupted_then_resumed(tmp_path: Path, monkeypatch, small_quick_mode) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--out", str(out), "--no-progress"]
    real_record = cmd_demo.DemoRun.record

    def record_then_ctrl_c(self, index, config, result):
        real_record(self, index, config, result)
        raise KeyboardInterrupt  # Ctrl-C right after the first configuration finished

    monkeypatch.setattr(cmd_demo.DemoRun, "record", record_then_ctrl_c)
    stopped = runner.invoke(app, args)
    assert stopped.exit_code == 130, stopped.output
    assert "1 of 2 configurations finished" in stopped.stderr
    command = f"tensorslim demo --quick --out {out} --no-progress --resume"
    assert f"continue with: {command}" in stopped.stderr, stopped.stderr
    assert "Traceback" not in stopped.output
    # the finished configuration is in the report already
    partial = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in partial["runs"]] == ["svd flops=0.5"]
    assert "| svd |" in (out / "report.md").read_text()
    first = partial["runs"][0]["compressed"]

    monkeypatch.setattr(cmd_demo.DemoRun, "record", real_record)
    resumed = runner.invoke(app, command.split()[1:])
    assert resumed.exit_code == 0, resumed.output
    assert "svd flops=0.5: already done" in resumed.stderr
    assert "resumed from" in resumed.stderr, "the base model must not be trained again"
    results = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in results["runs"]] == ["svd flops=0.5", "tucker flops=0.5"]
    assert results["runs"][0]["compressed"] == first
    assert results["original"]["accuracy"] > 0.5, "the base CNN must have learnt the digits"
    for run in results["runs"]:
        assert run["flops_fraction"] <= 0.5 + 1e-6
    for name in ("report.md", "pareto.png", "spectra.png", "curves.png", "args.json"):
        assert (out / name).is_file(), name
    assert "tensorslim demo" in resumed.stdout and "tucker" in resumed.stdout


def test_resuming_with_another_mode_is_refused(tmp_path: Path, small_quick_mode) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "args.json").write_text(
        json.dumps({"command": "demo", "model": "small_cnn", "data": "digits", "mode": "quick",
                    "seed": 0, "batch_size": 64})
    )  # fmt: skip
    result = runner.invoke(app, ["demo", "--full", "--resume", "--out", str(out)])
    assert result.exit_code == 2 and "started with mode='quick'" in result.stderr
    assert (out / "args.json").is_file(), "a refused resume must not touch the run"
    both = runner.invoke(app, ["demo", "--quick", "--full", "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and "not both" in both.stderr
    assert not (tmp_path / "x").exists()
