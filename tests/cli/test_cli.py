"""The command-line tool through typer's test runner: inspect, compress → eval → export,
and the error paths (one line on stderr, exit code 2, no traceback unless --debug)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tensorslim.data.fashion_mnist as fashion_mnist
from tensorslim.cli import app
from tensorslim.errors import TensorslimError

runner = CliRunner()
# torch marks torch.jit.trace deprecated; `export --format torchscript` still uses it on purpose
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY = [
    "--model", "lenet5", "--data", "synthetic", "--limit-train", "128", "--limit-test", "64",
    "--batch-size", "64", "--train-epochs", "1", "--finetune-epochs", "1", "--no-progress",
]  # fmt: skip


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2, a single 'error: …' line on stderr, no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_inspect_prints_every_layer(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["inspect", "--model", "lenet5", "--data", "digits", "--no-latency",
         "--json", str(tmp_path / "facts.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for layer in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        assert layer in result.stdout
    assert "total: params" in result.stdout
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert [row["layer"] for row in facts["layers"]] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert facts["total"]["params"] == sum(row["params"] for row in facts["layers"])


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(
        app, ["compress", *TINY, "--method", "svd", "--budget", "flops=0.5", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


def test_compress_then_eval(compressed_run: Path) -> None:
    out = compressed_run
    for name in ("args.json", "plan.json", "results.json", "report.md", "pareto.png", "model"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    for entry in ("original", "compressed"):
        for key in ("accuracy", "params", "flops", "latency_ms"):
            assert isinstance(results[entry][key], int | float), (entry, key)
    assert results["flops_fraction"] <= 0.5
    assert json.loads((out / "plan.json").read_text())["stages"][0]["budget"] == {"flops": 0.5}

    evaluated = runner.invoke(app, ["eval", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads((out / "eval.json").read_text())
    # the model rebuilt from plan.json + safetensors is the model that was measured
    assert again["accuracy"] == results["compressed"]["accuracy"]
    assert again["flops"] == results["compressed"]["flops"]
    assert again["params"] == results["compressed"]["params"]

    # a second compress into the same directory must not clobber it
    refused = runner.invoke(app, ["compress", *TINY, "--budget", "flops=0.5", "--out", str(out)])
    assert_one_line_error(refused, "is not empty", "--resume", "--overwrite")


def test_export_torchscript(compressed_run: Path) -> None:
    script = runner.invoke(app, ["export", str(compressed_run), "--format", "torchscript"])
    assert script.exit_code == 0, script.output
    assert (compressed_run / "export" / "model.pt").stat().st_size > 0


def test_export_onnx(compressed_run: Path) -> None:
    pytest.importorskip("onnx", reason="ONNX export needs the onnx extra (pip install '.[onnx]')")
    pytest.importorskip("onnxruntime", reason="the ONNX export check needs onnxruntime")
    onnx = runner.invoke(app, ["export", str(compressed_run), "--format", "onnx"])
    assert onnx.exit_code == 0, onnx.output
    assert (compressed_run / "export" / "model.onnx").stat().st_size > 0
    assert "max |Δ| vs PyTorch" in onnx.stdout


@pytest.fixture
def no_fashion_mnist(monkeypatch, tmp_path: Path) -> Path:
    """Fashion-MNIST nowhere: an empty --data-dir, no TENSORSLIM_DATA, no system copy."""
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "no-system-copy")
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


@pytest.mark.parametrize("command", ["compress", "inspect", "train"])
def test_missing_dataset(no_fashion_mnist: Path, tmp_path: Path, command: str) -> None:
    args = [command, "--model", "lenet5", "--data", "fashion-mnist"]
    args += ["--data-dir", str(no_fashion_mnist)]
    if command != "inspect":
        args += ["--out", str(tmp_path / "out")]
    line = assert_one_line_error(runner.invoke(app, args), "Fashion-MNIST", "not found")
    assert str(no_fashion_mnist) in line and "--data-dir" in line


@pytest.mark.parametrize(
    ("budget", "fragment"),
    [("flops=2", "must be a fraction in (0, 1]"), ("flops=abc", "'abc' is not a number"),
     ("speed=0.5", "bad budget")],
)  # fmt: skip
def test_bad_budget(tmp_path: Path, budget: str, fragment: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", *TINY, "--budget", budget, "--out", str(out)])
    assert_one_line_error(result, fragment)
    assert not out.exists(), "nothing may be written before the arguments are checked"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [(["--budget", "flops=0.5", "--objective", "fast"], "objective='fast'"),
     (["--objective", "error"], "needs a --budget"),
     (["--budget", "latency=0.5", "--objective", "latency"], "least error")],
)  # fmt: skip
def test_bad_objective(tmp_path: Path, extra: list[str], fragment: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", *TINY, *extra, "--out", str(out)])
    assert_one_line_error(result, fragment)
    assert not out.exists(), "nothing may be written before the arguments are checked"


def test_the_objective_is_saved_in_the_plan(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["compress", *TINY, "--finetune-epochs", "0", "--method", "svd"]
    result = runner.invoke(app, [*args, "--budget", "flops=0.5", "--objective", "error",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (stage,) = json.loads((out / "plan.json").read_text())["stages"]
    assert stage["budget"] == {"flops": 0.5, "objective": "error"}


def test_unknown_model(tmp_path: Path) -> None:
    args = ["compress", *TINY, "--budget", "flops=0.5", "--out", str(tmp_path / "o")]
    args[args.index("lenet5")] = "lenet9"
    assert_one_line_error(runner.invoke(app, args), "lenet9")
    result = runner.invoke(app, ["inspect", "--model", "lenet9", "--data", "synthetic"])
    assert_one_line_error(result, "lenet9")


def test_unknown_method_and_bad_setting(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["compress", *TINY, "--method", "svdd", "--out", str(tmp_path / "a")]
    )
    assert_one_line_error(result, "unknown method 'svdd'", "did you mean 'svd'")
    result = runner.invoke(
        app, ["compress", *TINY, "--set", "scheme=diagonal", "--out", str(tmp_path / "b")]
    )
    assert_one_line_error(result, "scheme")
    result = runner.invoke(app, ["compress", *TINY, "--set", "oops", "--out", str(tmp_path / "c")])
    assert_one_line_error(result, "KEY=VALUE")


def test_eval_and_export_of_a_missing_run(tmp_path: Path) -> None:
    assert_one_line_error(runner.invoke(app, ["eval", str(tmp_path / "nope")]), "does not exist")
    result = runner.invoke(app, ["export", str(tmp_path), "--format", "zip"])
    assert_one_line_error(result, "unknown export format 'zip'")
    assert_one_line_error(runner.invoke(app, ["eval", str(tmp_path)]), "args.json")


def test_unexpected_errors_are_one_line_too(monkeypatch) -> None:
    import tensorslim.cli.cmd_inspect as cmd_inspect

    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line of detail")

    monkeypatch.setattr(cmd_inspect, "inspect_model", boom)
    result = runner.invoke(app, ["inspect", "--model", "lenet5", "--data", "synthetic"])
    assert_one_line_error(result, "RuntimeError: kernel exploded", "--debug")


def test_debug_lets_the_exception_through(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["--debug", "compress", *TINY, "--budget", "flops=2", "--out", str(tmp_path / "o")]
    )
    assert isinstance(result.exception, TensorslimError)
    assert "flops=2" in str(result.exception)
    # and without --debug the next run is quiet again (the flag does not stick)
    quiet = runner.invoke(app, ["compress", *TINY, "--budget", "flops=2", "--out", str(tmp_path)])
    assert_one_line_error(quiet, "flops=2")


def test_methods_and_models_lists() -> None:
    methods = runner.invoke(app, ["methods"])
    assert methods.exit_code == 0, methods.output
    assert any(line.startswith("svd ") for line in methods.stdout.splitlines())
    models = runner.invoke(app, ["models"])
    assert {"lenet5", "small_cnn", "resnet20", "resnet56"} <= set(models.stdout.split())


def test_train_interrupted_then_resumed(tmp_path: Path, monkeypatch) -> None:
    import tensorslim.train.loop as loop

    out = tmp_path / "train"
    args = ["train", "--model", "lenet5", "--data", "synthetic", "--limit-train", "64",
            "--limit-test", "32", "--batch-size", "32", "--epochs", "2", "--no-progress",
            "--out", str(out)]  # fmt: skip
    real_save = loop.save_checkpoint

    def save_then_ctrl_c(path, state):
        real_save(path, state)
        raise KeyboardInterrupt  # Ctrl-C right after the first epoch's checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", save_then_ctrl_c)
    stopped = runner.invoke(app, args)
    assert stopped.exit_code == 130, stopped.output
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.output
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert_one_line_error(runner.invoke(app, args), "not empty")
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.stderr and "after epoch 1" in resumed.stderr
    history = json.loads((out / "results.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_compress_svd_train_fine_tunes_after_truncation(tmp_path: Path) -> None:
    """--method svd_train runs its third stage by default: one epoch after finalize."""
    out = tmp_path / "run"
    args = ["compress", *TINY, "--method", "svd_train", "--budget", "flops=0.5", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]) == 2  # 1 regularized epoch + 1 after truncation
    assert results["accuracy_after_finalize"] is not None
    assert results["flops_fraction"] <= 0.5 + 1e-6


def test_compress_with_pruning_reports_nonzero_counts(tmp_path: Path) -> None:
    """A params budget prunes the weights; results say how many nonzeros are left."""
    out = tmp_path / "run"
    args = ["compress", *TINY, "--method", "gmp", "--budget", "params=0.2", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    comp = results["compressed"]
    assert comp["params_nonzero"] < 0.3 * comp["params"]
    assert (
        results["params_nonzero_fraction"] == comp["params_nonzero"] / results["original"]["params"]
    )
    assert comp["flops_nonzero"] < comp["flops"]
