"""``tensorslim eval RUN``: rebuild a run's model from its plan and weights, and measure it."""

from __future__ import annotations

from pathlib import Path

import typer

from tensorslim.cli.common import (
    ARGS_FILE,
    Setup,
    handle_errors,
    option,
    read_args,
    require_trust,
    setup,
)
from tensorslim.errors import TensorslimError
from tensorslim.io import is_saved, load
from tensorslim.pipeline import machine_facts, measure
from tensorslim.report.run import write_json


def load_run_model(
    run: Path,
    data_dir: Path | None = None,
    *,
    model: str | None = None,
    data: str | None = None,
    trust_code: bool = False,
):  # type: ignore[no-untyped-def]
    """(Setup, model) of a run directory written by train/compress/demo-like commands.

    A run directory is data: when its args.json names Python code (``module:function``) as the
    model or the dataset, that code is imported only with ``trust_code`` or when the caller
    names the builder again (``model`` / ``data``).
    """
    if not run.is_dir():
        raise TensorslimError(f"run directory {run} does not exist")
    args = read_args(run)
    for key in ("model", "data"):
        if key not in args:
            raise TensorslimError(f"{run / ARGS_FILE} has no '{key}': it is not a run's arguments")
    where = str(run / ARGS_FILE)
    if model is None:
        require_trust(args["model"], where=where, key="model", trusted=trust_code)
    if data is None:
        require_trust(args["data"], where=where, key="data", trusted=trust_code)
    if not is_saved(run / "model"):
        raise TensorslimError(f"{run} has no saved model/: did the run finish?")
    s: Setup = setup(
        model_name=model or args["model"],
        data=data or args["data"],
        data_dir=data_dir or (Path(args["data_dir"]) if args.get("data_dir") else None),
        seed=args.get("seed", 0),
        batch_size=args.get("batch_size", 128),
        limit_train=args.get("limit_train"),
        limit_test=args.get("limit_test"),
    )
    return s, load(run / "model", s.model)


def run_options():  # type: ignore[no-untyped-def]
    """The options ``eval`` and ``export`` share for rebuilding a run's model."""
    return {
        "model": typer.Option(
            None, help="Build the model with this instead of the run's own (e.g. your code)."
        ),
        "data": typer.Option(None, help="Use this dataset instead of the run's own."),
        "data_dir": typer.Option(None, help="Override where the dataset files are."),
        "trust_code": option("trust_code"),
    }


def register(app: typer.Typer) -> None:
    shared = run_options()

    @app.command("eval")
    @handle_errors
    def eval_(
        run: Path = typer.Argument(..., help="A run directory (from compress or train)."),
        model: str = shared["model"],
        data: str = shared["data"],
        data_dir: Path = shared["data_dir"],
        trust_code: bool = shared["trust_code"],
    ) -> None:
        """Measure a run's saved model (rebuilt from its plan).

        Accuracy, params, FLOPs and latency; also written to RUN/eval.json.
        """
        s, rebuilt = load_run_model(run, data_dir, model=model, data=data, trust_code=trust_code)
        row = measure(rebuilt, s.example_batch, s.test_loader)
        write_json(run / "eval.json", {**row, "machine": machine_facts()})
        typer.echo(
            f"{run}: accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}  params {row['params']}"
            f"  FLOPs {row['flops']}  latency {row['latency_ms']:.3f} ms "
            f"(batch {row['latency_batch']}, {row['latency_threads']} threads)"
        )
