"""``tensorslim compress``: plan → apply → fine-tune/train → report, for any registered method."""

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
    print_result_table,
    save_run_model,
    say,
    setup,
)
from tensorslim.methods import get_method
from tensorslim.pipeline import compress_model
from tensorslim.rank.budget import Budget
from tensorslim.report.run import LAYER_COLUMNS, chosen_ranks, model_spectra, write_report
from tensorslim.report.tables import print_table


def register(app: typer.Typer) -> None:
    @app.command("compress")
    @handle_errors
    def compress(
        ctx: typer.Context,
        model: str = option("model"),
        data: str = option("data"),
        data_dir: Path = option("data_dir"),
        method: str = typer.Option("svd", help="A registered method (see `tensorslim methods`)."),
        budget: str = typer.Option(
            None,
            help="flops=FRACTION or params=FRACTION of the model (default: the method's own "
            "per-layer rule).",
        ),
        setting: list[str] = typer.Option(
            None, "--set", help="Method setting KEY=VALUE (repeat), e.g. --set scheme=spatial."
        ),
        weights: Path = option("weights"),
        train_epochs: int = option("train_epochs"),
        train_lr: float = option("train_lr"),
        finetune_epochs: int = typer.Option(
            1,
            min=0,
            help="Epochs of training after the layers are replaced (with the method's own "
            "regularizers or pruning schedule, if it has any).",
        ),
        post_finalize_epochs: int = typer.Option(
            None,
            min=0,
            help="Fine-tune epochs after the method finalizes (default: the method's own; "
            "1 for svd_train, whose truncation needs a low-rank fine-tune, else 0).",
        ),
        recalibrate_bn: int = typer.Option(
            10,
            min=0,
            help="Re-estimate BatchNorm statistics on this many training batches after the "
            "layers are replaced (before fine-tuning).",
        ),
        lr: float = typer.Option(0.01, min=0.0, help="Fine-tune learning rate."),
        distill: bool = typer.Option(
            False, help="Distil from the uncompressed model while fine-tuning."
        ),
        batch_size: int = option("batch_size"),
        seed: int = option("seed"),
        limit_train: int = option("limit_train"),
        limit_test: int = option("limit_test"),
        out: Path = option("out", Path("runs/compress")),
        resume: bool = option("resume"),
        overwrite: bool = option("overwrite"),
        progress: bool = option("progress"),
    ) -> None:
        """Compress a model with one method at one budget.

        Plans, replaces the layers, fine-tunes, measures and writes the report and the model.
        """
        parsed_budget = Budget.parse(budget) if budget else None
        settings = parse_settings(setting)
        method_obj = get_method(method, **settings)  # fail on bad input before any work
        if post_finalize_epochs is None:
            post_finalize_epochs = method_obj.post_finalize_epochs
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
            base_history = prepare_base(
                s,
                weights=weights,
                out=out,
                resume=resume,
                epochs=train_epochs,
                lr=train_lr,
                progress=progress,
                what=f"{model} on {data}",
            )
            original = measure_base(s)
            small, results = compress_model(
                s.model,
                method=method,
                budget=parsed_budget,
                settings=settings,
                train_loader=s.train_loader,
                test_loader=s.test_loader,
                example_batch=s.example_batch,
                finetune_epochs=finetune_epochs,
                post_finalize_epochs=post_finalize_epochs,
                bn_recalibration_batches=recalibrate_bn,
                lr=lr,
                distill=distill,
                checkpoint_dir=out / "checkpoints",
                resume=resume,
                progress=progress,
                log=say,
                measure_original=original,
            )
            results["chosen_ranks"] = chosen_ranks(small)
            save_run_model(small, out)
            write_report(
                out,
                [results],
                title=f"{model} on {data}: {method}",
                original=original,
                spectra=model_spectra(s.model),
                base_history=base_history,
            )
        print_table("layers", LAYER_COLUMNS, results["layers"])
        print_result_table(original, results)
        typer.echo(f"wrote {out}/results.json, report.md, plan.json, model/")
