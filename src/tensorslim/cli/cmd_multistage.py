"""``tensorslim multistage``: compress a few layers, fine-tune, continue (MUSCO style).

Example::

    tensorslim multistage --model resnet20 --data fashion-mnist --method tucker \\
        --stages 3 --budget flops=0.4 --epochs-per-stage 1 --out runs/musco

Without ``--budget`` each stage uses the method's per-layer rule (for tucker: VBMF ranks,
``--set weaken=0.6`` to weaken them). Writes one results row per stage, the report, and the
final model with every stage's plan (``tensorslim.load`` rebuilds them in order).
"""

from __future__ import annotations

from pathlib import Path

import typer

from tensorslim.cli.cmd_train import train_base
from tensorslim.cli.common import (
    handle_errors,
    load_weights,
    parse_settings,
    prepare_run_dir,
    save_args,
    say,
    setup,
)
from tensorslim.io import save
from tensorslim.rank.budget import Budget
from tensorslim.report.run import model_spectra, summary_row, write_report
from tensorslim.report.tables import print_table


def register(app: typer.Typer) -> None:
    @app.command("multistage")
    @handle_errors
    def multistage_command(
        model: str = typer.Option(
            "small_cnn", help="Zoo model name, torchvision:NAME or module:function."
        ),
        data: str = typer.Option(
            "digits", help="digits | fashion-mnist | synthetic | module:function"
        ),
        data_dir: Path = typer.Option(None, help="Where the dataset files are."),
        method: str = typer.Option("tucker", help="A registered decomposition method."),
        stages: int = typer.Option(3, min=1, help="Number of stages (groups of layers)."),
        budget: str = typer.Option(
            None, help="Final flops=FRACTION or params=FRACTION of the original model."
        ),
        setting: list[str] = typer.Option(None, "--set", help="Method setting KEY=VALUE (repeat)."),
        weights: Path = typer.Option(None, help="Trained base weights (.safetensors or run dir)."),
        train_epochs: int = typer.Option(
            3, help="Epochs to train the base when --weights is absent."
        ),
        epochs_per_stage: int = typer.Option(1, min=0, help="Fine-tune epochs after each stage."),
        lr: float = typer.Option(0.01, help="Fine-tune learning rate."),
        train_lr: float = typer.Option(0.05, help="Base training learning rate."),
        batch_size: int = typer.Option(128, min=1),
        seed: int = typer.Option(0),
        limit_train: int = typer.Option(None, help="Use a seeded subset of the training set."),
        limit_test: int = typer.Option(None, help="Use a seeded subset of the test set."),
        out: Path = typer.Option(Path("runs/multistage"), help="Run directory."),
        overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
        progress: bool = typer.Option(True, help="Show progress bars."),
    ) -> None:
        """Compress in stages (a few layers at a time), fine-tuning after each stage."""
        from tensorslim.methods import get_method
        from tensorslim.multistage import multistage
        from tensorslim.pipeline import measure

        parsed_budget = Budget.parse(budget) if budget else None
        settings = parse_settings(setting)
        get_method(method, **settings)  # fail on a bad method or setting before any work
        prepare_run_dir(out, resume=False, overwrite=overwrite)
        save_args(out, "multistage", dict(locals()))
        s = setup(
            model_name=model,
            data=data,
            data_dir=data_dir,
            seed=seed,
            batch_size=batch_size,
            limit_train=limit_train,
            limit_test=limit_test,
        )
        base_history: list[dict] = []
        if weights is not None:
            load_weights(s.model, weights)
        else:
            say(f"no --weights: training {model} on {data} for {train_epochs} epochs first")
            base_history = train_base(
                s,
                epochs=train_epochs,
                lr=train_lr,
                out=out / "base",
                resume=False,
                progress=progress,
            )
        original = measure(s.model, s.example_batch, s.test_loader)
        say(f"original: accuracy {original['accuracy']:.4f}, FLOPs {original['flops']}")
        small, results = multistage(
            s.model,
            method=method,
            train_loader=s.train_loader,
            test_loader=s.test_loader,
            example_batch=s.example_batch,
            stages=stages,
            budget=parsed_budget,
            settings=settings,
            epochs_per_stage=epochs_per_stage,
            lr=lr,
            progress=progress,
            log=say,
        )
        for r in results:
            r["method"] = f"{method} stage {r['stage']}"
        save(small, out / "model")
        (out / "plan.json").write_text((out / "model" / "plan.json").read_text())
        write_report(
            out,
            results,
            title=f"{model} on {data}: {method}, {len(results)} stages",
            original=original,
            spectra=model_spectra(s.model),
            base_history=base_history,
            extra_json={"multistage": {"stages": [r["layers_in_stage"] for r in results]}},
        )
        rows = [summary_row(r) for r in results]
        print_table("stages", list(rows[0]), rows)
        typer.echo(f"wrote {out}/results.json, report.md, plan.json, model/")
