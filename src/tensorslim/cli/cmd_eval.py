"""``tensorslim eval RUN``: rebuild a run's model from its plan and weights, and measure it."""

from __future__ import annotations

from pathlib import Path

import typer

from tensorslim.cli.common import handle_errors, read_args, setup
from tensorslim.errors import TensorslimError
from tensorslim.io import load
from tensorslim.pipeline import machine_facts, measure
from tensorslim.report.run import write_json


def load_run_model(run: Path, data_dir: Path | None = None):  # type: ignore[no-untyped-def]
    """(Setup, model) of a run directory written by train/compress/demo-like commands."""
    args = read_args(run)
    if not (run / "model").is_dir():
        raise TensorslimError(f"{run} has no saved model/: did the run finish?")
    s = setup(
        model_name=args["model"],
        data=args["data"],
        data_dir=data_dir or (Path(args["data_dir"]) if args.get("data_dir") else None),
        seed=args.get("seed", 0),
        batch_size=args.get("batch_size", 128),
        limit_train=args.get("limit_train"),
        limit_test=args.get("limit_test"),
    )
    return s, load(run / "model", s.model)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @handle_errors
    def eval_(
        run: Path = typer.Argument(..., help="A run directory (from compress or train)."),
        data_dir: Path = typer.Option(None, help="Override where the dataset files are."),
    ) -> None:
        """Accuracy, params, FLOPs and latency of a run's saved model (rebuilt from its plan)."""
        if not run.is_dir():
            raise TensorslimError(f"run directory {run} does not exist")
        s, model = load_run_model(run, data_dir)
        row = measure(model, s.example_batch, s.test_loader)
        write_json(run / "eval.json", {**row, "machine": machine_facts()})
        typer.echo(
            f"{run}: accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}  params {row['params']}"
            f"  FLOPs {row['flops']}  latency {row['latency_ms']:.3f} ms "
            f"(batch {row['latency_batch']}, {row['latency_threads']} threads)"
        )
