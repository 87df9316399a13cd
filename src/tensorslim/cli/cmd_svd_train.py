"""``tensorslim svd-train``: the three-stage SVD training pipeline (Yang et al. 2020) as a command.

Full-rank SVD training with orthogonality + sparsity regularizers → singular value energy pruning
(a fixed ``--energy`` or a ``--target-flops`` budget) → low-rank fine-tuning. Writes the same run
artefacts as ``compress`` (args.json, plan.json, model/, results.json, report.md, report.html,
plots) plus the per-layer ranks before and after pruning.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import typer

from tensorslim.cli.cmd_train import train_base
from tensorslim.cli.common import (
    handle_errors,
    load_weights,
    prepare_run_dir,
    save_args,
    say,
    setup,
)
from tensorslim.errors import TensorslimError
from tensorslim.io import save
from tensorslim.pipeline import machine_facts, measure
from tensorslim.report.run import model_spectra, summary_row, write_report
from tensorslim.report.tables import print_table
from tensorslim.train.svd_pipeline import check_pipeline_settings, svd_train_pipeline

RANK_COLUMNS = [
    "layer",
    "type",
    "full_rank",
    "rank_before",
    "rank_after",
    "form",
    "energy_removed",
    "flops",
    "flops_after",
    "flops_kept",
]


def layer_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer rows for the report tables: ranks before/after, form, FLOPs before/after.

    ``error`` is √(energy removed): the relative Frobenius error of the pruning step itself
    (exact when U and V are orthonormal, which the orthogonality loss keeps them close to).
    """
    rows = []
    for row in report["layers"]:
        lowrank = row["form"] == "lowrank"
        rows.append(
            {
                "layer": row["layer"],
                "type": "Linear" if row["type"] == "SVDLinear" else "Conv2d",
                "method": "svd_train" if lowrank else "dense",
                "choice": (
                    f"rank {row['rank_after']}/{row['full_rank']}"
                    + (" spatial" if row["scheme"] == "spatial" else "")
                ),
                "full_rank": row["full_rank"],
                "rank_before": row["rank_before"],
                "rank_after": row["rank_after"],
                "form": row["form"],
                "energy_removed": row["energy_removed"],
                "flops": row["flops_dense"],
                "flops_after": row["flops_after"],
                "flops_kept": row["flops_after"] / row["flops_dense"],
                "error": math.sqrt(max(0.0, row["energy_removed"])),
                "reason": (
                    "low rank pays"
                    if lowrank
                    else "merged back to dense: the rank left does not pay"
                ),
            }
        )
    return rows


def register(app: typer.Typer) -> None:
    @app.command("svd-train")
    @handle_errors
    def svd_train(
        model: str = typer.Option(
            "resnet20", help="Zoo model name, torchvision:NAME or module:function."
        ),
        data: str = typer.Option(
            "fashion-mnist", help="digits | fashion-mnist | synthetic | module:function"
        ),
        data_dir: Path = typer.Option(None, help="Where the dataset files are."),
        weights: Path = typer.Option(None, help="Trained dense weights (.safetensors or run dir)."),
        from_scratch: bool = typer.Option(
            False, help="Start SVD training from a fresh init (no dense training)."
        ),
        train_epochs: int = typer.Option(
            3, min=0, help="Dense epochs first when neither --weights nor --from-scratch."
        ),
        train_lr: float = typer.Option(0.05, help="Learning rate of that dense training."),
        scheme: str = typer.Option("channel", help="Conv decomposition: channel | spatial."),
        reg: str = typer.Option(
            "hoyer", help="Sparsity on singular values: l1 | hoyer | hoyer_square."
        ),
        lambda_o: float = typer.Option(1.0, help="Weight of the orthogonality loss (≥ 0)."),
        lambda_s: float = typer.Option(0.01, help="Weight of the sparsity loss (≥ 0)."),
        energy: float = typer.Option(None, help="Prune per layer this fraction of Σs², in [0, 1)."),
        target_flops: float = typer.Option(
            None, help="Instead of --energy: FLOPs fraction of the model to land on."
        ),
        budget_gate_energy: float = typer.Option(
            None,
            help="With --target-flops: drop the sparsity term while pruning this energy "
            "(e.g. 0.01) would already meet the target.",
        ),
        recalibrate_bn: int = typer.Option(
            10, min=0, help="Re-estimate BatchNorm statistics on N batches after pruning."
        ),
        finetune_orthogonality: bool = typer.Option(
            True, help="Keep the orthogonality loss (λo) while fine-tuning the low-rank model."
        ),
        linear: bool = typer.Option(
            False, help="Also train Linear layers in SVD form (the paper: convolutions only)."
        ),
        exclude: list[str] = typer.Option(
            None, "--exclude", help="Keep this layer dense (fqn, repeat), e.g. --exclude fc."
        ),
        epochs: int = typer.Option(3, min=0, help="Full-rank SVD training epochs (stage 1)."),
        finetune_epochs: int = typer.Option(
            1, min=0, help="Low-rank fine-tuning epochs (stage 3)."
        ),
        lr: float = typer.Option(0.05, help="Learning rate of stage 1."),
        finetune_lr: float = typer.Option(None, help="Learning rate of stage 3 (default: --lr)."),
        optimizer: str = typer.Option("sgd", help="sgd | adam"),
        weight_decay: float = typer.Option(5e-4, min=0.0),
        batch_size: int = typer.Option(128, min=1),
        seed: int = typer.Option(0),
        limit_train: int = typer.Option(None, help="Use a seeded subset of the training set."),
        limit_test: int = typer.Option(None, help="Use a seeded subset of the test set."),
        out: Path = typer.Option(Path("runs/svd-train"), help="Run directory."),
        resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
        overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
        progress: bool = typer.Option(True, help="Show progress bars."),
    ) -> None:
        """SVD training: orthogonality + sparsity at full rank, energy pruning, fine-tune."""
        check_pipeline_settings(
            scheme=scheme,
            reg=reg,
            lambda_o=lambda_o,
            lambda_s=lambda_s,
            energy=energy,
            target_flops=target_flops,
            epochs_train=epochs,
            epochs_finetune=finetune_epochs,
            budget_gate_energy=budget_gate_energy,
        )
        if weights is not None and from_scratch:
            raise TensorslimError("give --weights or --from-scratch, not both")
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
        save_args(out, "svd-train", dict(locals()))
        s = setup(
            model_name=model,
            data=data,
            data_dir=data_dir,
            seed=seed,
            batch_size=batch_size,
            limit_train=limit_train,
            limit_test=limit_test,
        )
        unknown = sorted(set(exclude or []) - {name for name, _ in s.model.named_modules()})
        if unknown:
            raise TensorslimError(f"--exclude {unknown[0]}: {model} has no layer of that name")
        base_history: list[dict] = []
        if weights is not None:
            load_weights(s.model, weights)
        elif from_scratch:
            say(f"from scratch: {model} is trained in SVD form from its initialization")
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
            )
        original = measure(s.model, s.example_batch, s.test_loader)
        if from_scratch:
            original["untrained"] = True
        say(f"original: accuracy {original['accuracy']:.4f}, FLOPs {original['flops']}")
        spectra = model_spectra(s.model)
        small, report = svd_train_pipeline(
            copy.deepcopy(s.model),
            s.train_loader,
            s.test_loader,
            scheme=scheme,
            reg=reg,
            lambda_o=lambda_o,
            lambda_s=lambda_s,
            energy=energy,
            target_flops=target_flops,
            epochs_train=epochs,
            epochs_finetune=finetune_epochs,
            from_scratch=from_scratch,
            checkpoint_dir=out / "checkpoints",
            resume=resume,
            lr=lr,
            finetune_lr=finetune_lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            example_input=s.example_batch[:1],
            exclude=exclude or None,
            linear=linear,
            budget_gate_energy=budget_gate_energy,
            bn_recalibration_batches=recalibrate_bn,
            finetune_orthogonality=finetune_orthogonality,
            progress=progress,
            log=say,
        )
        compressed = measure(small, s.example_batch, s.test_loader)
        save(small, out / "model")
        (out / "plan.json").write_text((out / "model" / "plan.json").read_text())
        stage1 = report["history"]["svd_train"]
        history = [{**h, "stage": "svd_train"} for h in stage1] + [
            {**h, "epoch": h["epoch"] + len(stage1), "stage": "finetune"}
            for h in report["history"]["finetune"]
        ]
        rows = layer_rows(report)
        results: dict[str, Any] = {
            "method": "svd_train",
            "settings": {
                "scheme": scheme,
                "reg": reg,
                "lambda_o": lambda_o,
                "lambda_s": lambda_s,
                "energy": energy,
                "target_flops": target_flops,
                "from_scratch": from_scratch,
                "epochs": epochs,
                "finetune_epochs": finetune_epochs,
                "exclude": list(exclude or []),
                "linear": linear,
                "budget_gate_energy": budget_gate_energy,
                "recalibrate_bn": recalibrate_bn,
                "finetune_orthogonality": finetune_orthogonality,
            },
            "budget": {"flops": target_flops} if target_flops is not None else None,
            "original": original,
            "compressed": compressed,
            "accuracy_before_finetune": report["pruned"].get("accuracy"),
            "accuracy_after_svd_training": report["svd_full_rank"].get("accuracy"),
            "energy": report["energy"],
            "flops_fraction": compressed["flops"] / original["flops"],
            "flops_reduction": original["flops"] / compressed["flops"],
            "params_fraction": compressed["params"] / original["params"],
            "latency_speedup": original["latency_ms"] / compressed["latency_ms"],
            "plan_notes": [],
            "layers": rows,
            "ranks": [
                {k: r[k] for k in ("layer", "full_rank", "rank_before", "rank_after", "form")}
                for r in rows
            ],
            "history": history,
            "stages": {k: report[k] for k in ("svd_full_rank", "pruned", "final")},
            "seconds": report["seconds"],
            "machine": machine_facts(),
        }
        write_report(
            out,
            [results],
            title=f"{model} on {data}: SVD training ({scheme}-wise, {reg})",
            original=original,
            spectra=spectra,
            base_history=base_history,
        )
        print_table("ranks", RANK_COLUMNS, rows)
        print_table(
            "result",
            list(summary_row(results)),
            [
                {
                    "method": "original",
                    "accuracy": original["accuracy"],
                    "params": original["params"],
                    "flops": original["flops"],
                    "flops_fraction": 1.0,
                    "latency_ms": original["latency_ms"],
                },
                summary_row(results),
            ],
        )
        typer.echo(
            f"energy {report['energy']:.4g}: FLOPs ×{results['flops_fraction']:.3f} "
            f"(reduction {results['flops_reduction']:.2f}×), accuracy "
            f"{original['accuracy']:.4f} → {compressed['accuracy']:.4f}; "
            f"wrote {out}/results.json, report.md, plan.json, model/"
        )
