"""``tensorslim compress``: plan → apply → fine-tune/train → report, for any registered method."""

from __future__ import annotations

from pathlib import Path

import typer

from tensorslim.cli.cmd_train import BASE_PHASE, train_base
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
from tensorslim.pipeline import compress_model, measure
from tensorslim.rank.budget import Budget
from tensorslim.report.run import LAYER_COLUMNS, model_spectra, summary_row, write_report
from tensorslim.report.tables import print_table
from tensorslim.train.seeding import derive_seed


def register(app: typer.Typer) -> None:
    @app.command("compress")
    @handle_errors
    def compress(
        model: str = typer.Option(
            "small_cnn", help="Zoo model name, torchvision:NAME or module:function."
        ),
        data: str = typer.Option(
            "digits", help="digits | fashion-mnist | synthetic | module:function"
        ),
        data_dir: Path = typer.Option(None, help="Where the dataset files are."),
        method: str = typer.Option("svd", help="A registered method (see `tensorslim methods`)."),
        budget: str = typer.Option(None, help="flops=FRACTION or params=FRACTION of the model."),
        setting: list[str] = typer.Option(None, "--set", help="Method setting KEY=VALUE (repeat)."),
        weights: Path = typer.Option(None, help="Trained base weights (.safetensors or run dir)."),
        train_epochs: int = typer.Option(
            3, help="Epochs to train the base when --weights is absent."
        ),
        finetune_epochs: int = typer.Option(1, min=0),
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
        lr: float = typer.Option(0.01, help="Fine-tune learning rate."),
        train_lr: float = typer.Option(0.05, help="Base training learning rate."),
        distill: bool = typer.Option(
            False, help="Distil from the uncompressed model while fine-tuning."
        ),
        batch_size: int = typer.Option(128, min=1),
        seed: int = typer.Option(0),
        limit_train: int = typer.Option(None, help="Use a seeded subset of the training set."),
        limit_test: int = typer.Option(None, help="Use a seeded subset of the test set."),
        out: Path = typer.Option(Path("runs/compress"), help="Run directory."),
        resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
        overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
        progress: bool = typer.Option(True, help="Show progress bars."),
    ) -> None:
        """Compress a trained model with one method and budget, fine-tune it, and report."""
        parsed_budget = Budget.parse(budget) if budget else None
        settings = parse_settings(setting)
        from tensorslim.methods import get_method

        method_obj = get_method(method, **settings)  # fail on bad input before any work
        if post_finalize_epochs is None:
            post_finalize_epochs = method_obj.post_finalize_epochs
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
        save_args(out, "compress", dict(locals()))
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
        elif (out / "base" / "model").is_dir() and resume:
            load_weights(s.model, out / "base" / "model")
        else:
            say(f"no --weights: training {model} on {data} for {train_epochs} epochs first")
            base_history = train_base(
                s,
                epochs=train_epochs,
                lr=train_lr,
                out=out / "base",
                resume=resume,
                progress=progress,
                seed=seed,
            )
        original = measure(s.model, s.example_batch, s.test_loader)
        say(f"original: accuracy {original['accuracy']:.4f}, FLOPs {original['flops']}")
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
            seed=seed,
        )
        if weights is None:  # the base was trained by this run (now or before a resume)
            results["seeds"] = {BASE_PHASE: derive_seed(seed, BASE_PHASE), **results["seeds"]}
        save(small, out / "model")
        (out / "plan.json").write_text((out / "model" / "plan.json").read_text())
        write_report(
            out,
            [results],
            title=f"{model} on {data}: {method}",
            original=original,
            spectra=model_spectra(s.model),
            base_history=base_history,
        )
        print_table("layers", LAYER_COLUMNS, results["layers"])
        row = summary_row(results)
        print_table(
            "result",
            list(row),
            [
                {
                    "method": "original",
                    "accuracy": original["accuracy"],
                    "params": original["params"],
                    "flops": original["flops"],
                    "flops_fraction": 1.0,
                    "latency_ms": original["latency_ms"],
                },
                row,
            ],
        )
        typer.echo(f"wrote {out}/results.json, report.md, plan.json, model/")
