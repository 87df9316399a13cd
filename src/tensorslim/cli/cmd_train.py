"""``tensorslim train``: train a zoo model (the dense base for compression)."""

from __future__ import annotations

from pathlib import Path

import typer

from tensorslim.cli.common import handle_errors, prepare_run_dir, save_args, say, setup
from tensorslim.io import save
from tensorslim.pipeline import machine_facts, measure
from tensorslim.report.run import write_json
from tensorslim.train.loop import fit
from tensorslim.train.seeding import derive_seed, seed_phase

BASE_PHASE = "train"  # the phase name base training is seeded by (train and compress alike)


def train_base(
    s,
    *,
    epochs: int,
    lr: float,
    out: Path,
    resume: bool,
    progress: bool,
    optimizer: str = "sgd",
    seed: int | None = None,
) -> list[dict]:
    """Train ``s.model`` with checkpoints under ``out/checkpoints`` and save it to ``out/model``.

    With a ``seed`` the training starts from ``seed_phase(seed, "train")``, whatever ran before.
    """
    if seed is not None:
        seed_phase(seed, BASE_PHASE, loaders=(s.train_loader, s.test_loader))
    history = fit(
        s.model,
        s.train_loader,
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        test_loader=s.test_loader,
        checkpoint_dir=out / "checkpoints",
        resume=resume,
        progress=progress,
        log=say,
        description="train",
    ).epochs
    save(s.model, out / "model")
    return history


def register(app: typer.Typer) -> None:
    @app.command("train")
    @handle_errors
    def train(
        model: str = typer.Option(
            "small_cnn", help="Zoo model name, torchvision:NAME or module:function."
        ),
        data: str = typer.Option(
            "digits", help="digits | fashion-mnist | synthetic | module:function"
        ),
        data_dir: Path = typer.Option(None, help="Where the dataset files are."),
        epochs: int = typer.Option(5, min=1),
        lr: float = typer.Option(0.05),
        optimizer: str = typer.Option("sgd", help="sgd | adam"),
        batch_size: int = typer.Option(128, min=1),
        seed: int = typer.Option(0),
        limit_train: int = typer.Option(None, help="Use a seeded subset of the training set."),
        limit_test: int = typer.Option(None, help="Use a seeded subset of the test set."),
        out: Path = typer.Option(Path("runs/train"), help="Run directory."),
        resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
        overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
        progress: bool = typer.Option(True, help="Show progress bars."),
    ) -> None:
        """Train a model from scratch and save it (weights in safetensors)."""
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
        save_args(out, "train", dict(locals()))
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
            seed=seed,
        )
        row = measure(s.model, s.example_batch, s.test_loader)
        write_json(
            out / "results.json",
            {
                "original": row,
                "compressed": row,
                "history": history,
                "machine": machine_facts(),
                "seeds": {BASE_PHASE: derive_seed(seed, BASE_PHASE)},
            },
        )
        typer.echo(
            f"trained {model} on {data}: accuracy {row['accuracy']:.4f}, "
            f"params {row['params']}, FLOPs {row['flops']}, "
            f"latency {row['latency_ms']:.3f} ms → {out / 'model'}"
        )
