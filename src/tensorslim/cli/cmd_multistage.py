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

from tensorslim.cli.common import (
    handle_errors,
    measure_base,
    open_run,
    option,
    parse_settings,
    prepare_base,
    save_run_model,
    say,
    setup,
)
from tensorslim.methods import get_method
from tensorslim.rank.budget import Budget
from tensorslim.report.run import model_spectra, summary_row, write_report
from tensorslim.report.tables import print_table


def register(app: typer.Typer) -> None:
    @app.command("multistage")
    @handle_errors
    def multistage_command(
        ctx: typer.Context,
        model: str = option("model"),
        data: str = option("data"),
        data_dir: Path = option("data_dir"),
        method: str = typer.Option("tucker", help="A registered decomposition method."),
        stages: int = typer.Option(3, min=1, help="Number of stages (groups of layers)."),
        budget: str = typer.Option(
            None, help="Final flops=FRACTION or params=FRACTION of the original model."
        ),
        setting: list[str] = typer.Option(
            None, "--set", help="Method setting KEY=VALUE (repeat), e.g. --set weaken=0.6."
        ),
        weights: Path = option("weights"),
        train_epochs: int = option("train_epochs"),
        train_lr: float = option("train_lr"),
        epochs_per_stage: int = typer.Option(1, min=0, help="Fine-tune epochs after each stage."),
        lr: float = typer.Option(0.01, min=0.0, help="Fine-tune learning rate."),
        batch_size: int = option("batch_size"),
        seed: int = option("seed"),
        limit_train: int = option("limit_train"),
        limit_test: int = option("limit_test"),
        out: Path = option("out", Path("runs/multistage")),
        overwrite: bool = option("overwrite"),
        progress: bool = option("progress"),
    ) -> None:
        """Compress a few layers at a time, fine-tuning in between."""
        from tensorslim.train.multistage import multistage

        parsed_budget = Budget.parse(budget) if budget else None
        settings = parse_settings(setting)
        get_method(method, **settings)  # fail on a bad method or setting before any work
        with open_run(ctx, out, dict(locals()), resume=False, overwrite=overwrite, resumable=False):
            s = setup(
                model_name=model,
                data=data,
                data_dir=data_dir,
                seed=seed,
                batch_size=batch_size,
                limit_train=limit_train,
                limit_test=limit_test,
            )
            base_history = prepare_base(
                s,
                weights=weights,
                out=out,
                resume=False,
                epochs=train_epochs,
                lr=train_lr,
                progress=progress,
                what=f"{model} on {data}",
            )
            original = measure_base(s)
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
            save_run_model(small, out)
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
