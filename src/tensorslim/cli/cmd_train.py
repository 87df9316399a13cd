"""``tensorslim train``: train a zoo model (the dense base for compression)."""

from __future__ import annotations

from pathlib import Path

import typer

from tensorslim.cli.common import BASE_PHASE, RunArgs, run_command, train_base
from tensorslim.pipeline import machine_facts, measure
from tensorslim.report.run import write_json
from tensorslim.train.seeding import derive_seed

__all__ = ["BASE_PHASE", "register", "train_base"]  # both stay importable from here


def register(app: typer.Typer) -> None:
    @run_command(app, "train", out=Path("runs/train"))
    def train(
        ctx: typer.Context,
        run: RunArgs,
        epochs: int = typer.Option(5, min=1, help="Training epochs."),
        lr: float = typer.Option(
            0.05, min=0.0, help="Peak learning rate (cosine decay to 0 over the epochs)."
        ),
        optimizer: str = typer.Option("sgd", help="sgd (momentum 0.9) | adam"),
    ) -> None:
        """Train a model from scratch and save it.

        Weights in safetensors (RUN/model), the history and measurements in results.json.
        """
        with run.open(ctx):
            s = run.setup()
            history = train_base(
                s,
                epochs=epochs,
                lr=lr,
                out=run.out,
                resume=run.resume,
                progress=run.progress,
                optimizer=optimizer,
                seed=run.seed,
            )
            row = measure(s.model, s.example_batch, s.test_loader)
            write_json(
                run.out / "results.json",
                {
                    "original": row,
                    "compressed": row,
                    "history": history,
                    "machine": machine_facts(),
                    "seeds": {BASE_PHASE: derive_seed(run.seed, BASE_PHASE)},
                },
            )
        typer.echo(
            f"trained {run.model} on {run.data}: accuracy {row['accuracy']:.4f}, "
            f"params {row['params']}, FLOPs {row['flops']}, "
            f"latency {row['latency_ms']:.3f} ms → {run.out / 'model'}"
        )
