"""``tensorslim train``: train a zoo model (the dense base for compression)."""

from __future__ import annotations

from pathlib import Path

import typer

from tensorslim.cli.common import handle_errors, open_run, option, setup, train_base
from tensorslim.pipeline import machine_facts, measure
from tensorslim.report.run import write_json

__all__ = ["register", "train_base"]  # train_base stays importable from here


def register(app: typer.Typer) -> None:
    @app.command("train")
    @handle_errors
    def train(
        ctx: typer.Context,
        model: str = option("model"),
        data: str = option("data"),
        data_dir: Path = option("data_dir"),
        epochs: int = typer.Option(5, min=1, help="Training epochs."),
        lr: float = typer.Option(
            0.05, min=0.0, help="Peak learning rate (cosine decay to 0 over the epochs)."
        ),
        optimizer: str = typer.Option("sgd", help="sgd (momentum 0.9) | adam"),
        batch_size: int = option("batch_size"),
        seed: int = option("seed"),
        limit_train: int = option("limit_train"),
        limit_test: int = option("limit_test"),
        out: Path = option("out", Path("runs/train")),
        resume: bool = option("resume"),
        overwrite: bool = option("overwrite"),
        progress: bool = option("progress"),
    ) -> None:
        """Train a model from scratch and save it.

        Weights in safetensors (RUN/model), the history and measurements in results.json.
        """
        with open_run(ctx, out, dict(locals()), resume=resume, overwrite=overwrite):
            s = setup(
                model_name=model,
                data=data,
                data_dir=data_dir,
                seed=seed,
                batch_size=batch_size,
                limit_train=limit_train,
                limit_test=limit_test,
            )
            history = train_base(
                s,
                epochs=epochs,
                lr=lr,
                out=out,
                resume=resume,
                progress=progress,
                optimizer=optimizer,
            )
            row = measure(s.model, s.example_batch, s.test_loader)
            write_json(
                out / "results.json",
                {
                    "original": row,
                    "compressed": row,
                    "history": history,
                    "machine": machine_facts(),
                },
            )
        typer.echo(
            f"trained {model} on {data}: accuracy {row['accuracy']:.4f}, "
            f"params {row['params']}, FLOPs {row['flops']}, "
            f"latency {row['latency_ms']:.3f} ms → {out / 'model'}"
        )
