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

from tensorslim.cli.common import (
    BASE_PHASE,
    RunArgs,
    Setup,
    measure_base,
    print_result_table,
    run_command,
    save_run_model,
    say,
)
from tensorslim.errors import TensorslimError
from tensorslim.pipeline import machine_facts, measure
from tensorslim.report.run import model_spectra, write_report
from tensorslim.report.tables import print_table
from tensorslim.train.seeding import derive_seed
from tensorslim.train.svd_pipeline import SVDTrainConfig, svd_train_pipeline

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
    run_command(
        app, "svd-train", out=Path("runs/svd-train"), base=True,
        model="resnet20", data="fashion-mnist",
    )(svd_train)  # fmt: skip


def svd_train(
    ctx: typer.Context,
    run: RunArgs,
    from_scratch: bool = typer.Option(
        False, help="Start SVD training from a fresh init (no dense training)."
    ),
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
    finetune_epochs: int = typer.Option(1, min=0, help="Low-rank fine-tuning epochs (stage 3)."),
    lr: float = typer.Option(0.05, help="Learning rate of stage 1."),
    finetune_lr: float = typer.Option(None, help="Learning rate of stage 3 (default: --lr)."),
    optimizer: str = typer.Option("sgd", help="sgd (momentum 0.9) | adam"),
    weight_decay: float = typer.Option(
        5e-4, min=0.0, help="Weight decay on every parameter (U, s, V too) in both stages."
    ),
) -> None:
    """Train in SVD form, prune singular values by energy, fine-tune.

    Writes the same run artefacts as compress, plus the per-layer ranks before and after
    pruning. With --resume every phase (base training, SVD training, pruning, fine-tune) starts
    from its own seed, so a resumed run is the uninterrupted one.
    """
    cfg = config_from_options(run.own)  # bad input fails here, before any directory exists
    if run.weights is not None and from_scratch:
        raise TensorslimError("give --weights or --from-scratch, not both")
    with run.open(ctx):
        report, results, original = _run(run, cfg)
    _print_summary(run.out, report, results, original)


# the command's options named otherwise in SVDTrainConfig
CONFIG_NAMES = {
    "epochs": "epochs_train",
    "finetune_epochs": "epochs_finetune",
    "recalibrate_bn": "bn_recalibration_batches",
}


def config_from_options(options: dict[str, Any]) -> SVDTrainConfig:
    """The pipeline's settings from the command's own options (checked)."""
    settings = {CONFIG_NAMES.get(k, k): v for k, v in options.items()}
    settings["exclude"] = list(settings["exclude"]) if settings.get("exclude") else None
    return SVDTrainConfig(**settings)


def _run(run: RunArgs, cfg: SVDTrainConfig) -> tuple[dict, dict, dict]:
    """Set up, base model, pipeline, save, report; (pipeline report, results, original)."""
    s = run.setup()
    _check_exclude(s, run.model, cfg.exclude)
    base_history, original = _base(run, s, cfg.from_scratch)
    small, report = svd_train_pipeline(
        copy.deepcopy(s.model), s.train_loader, s.test_loader, cfg,
        example_input=s.example_batch[:1], checkpoint_dir=run.out / "checkpoints",
        resume=run.resume, progress=run.progress, log=say, seed=run.seed,
    )  # fmt: skip
    compressed = measure(small, s.example_batch, s.test_loader)
    save_run_model(small, run.out)
    results = _results(run, cfg, report, original, compressed)
    write_report(
        run.out,
        [results],
        title=f"{run.model} on {run.data}: SVD training ({cfg.scheme}-wise, {cfg.reg})",
        original=original,
        spectra=model_spectra(s.model),
        base_history=base_history,
    )
    return report, results, original


def _check_exclude(s: Setup, model_name: str, exclude: list[str] | None) -> None:
    unknown = sorted(set(exclude or []) - {name for name, _ in s.model.named_modules()})
    if unknown:
        raise TensorslimError(f"--exclude {unknown[0]}: {model_name} has no layer of that name")


def _base(run: RunArgs, s: Setup, from_scratch: bool) -> tuple[list[dict], dict[str, Any]]:
    """The model SVD training starts from (trained, loaded, or as initialised) and its
    measurements; an untrained model is marked so."""
    if not from_scratch:
        return run.prepare_base(s)
    say(f"from scratch: {run.model} is trained in SVD form from its initialization")
    original = measure_base(s)
    original["untrained"] = True
    return [], original


def _results(
    run: RunArgs,
    cfg: SVDTrainConfig,
    report: dict[str, Any],
    original: dict[str, Any],
    compressed: dict[str, Any],
) -> dict[str, Any]:
    """results.json of an svd-train run: compress's keys plus the ranks and the stages."""
    stage1 = report["history"]["svd_train"]
    history = [{**h, "stage": "svd_train"} for h in stage1] + [
        {**h, "epoch": h["epoch"] + len(stage1), "stage": "finetune"}
        for h in report["history"]["finetune"]
    ]
    rows = layer_rows(report)
    seeds = dict(report["seeds"])
    if run.weights is None and not cfg.from_scratch:  # this run trained the base
        seeds = {BASE_PHASE: derive_seed(run.seed, BASE_PHASE), **seeds}
    return {
        "method": "svd_train",
        "settings": _settings(cfg),
        "budget": {"flops": cfg.target_flops} if cfg.target_flops is not None else None,
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
        "seeds": seeds,
        "seconds": report["seconds"],
        "machine": machine_facts(),
    }


def _settings(cfg: SVDTrainConfig) -> dict[str, Any]:
    """The settings results.json records (the CLI's names for the epochs and BatchNorm)."""
    return {
        "scheme": cfg.scheme,
        "reg": cfg.reg,
        "lambda_o": cfg.lambda_o,
        "lambda_s": cfg.lambda_s,
        "energy": cfg.energy,
        "target_flops": cfg.target_flops,
        "from_scratch": cfg.from_scratch,
        "epochs": cfg.epochs_train,
        "finetune_epochs": cfg.epochs_finetune,
        "exclude": list(cfg.exclude or []),
        "linear": cfg.linear,
        "budget_gate_energy": cfg.budget_gate_energy,
        "recalibrate_bn": cfg.bn_recalibration_batches,
        "finetune_orthogonality": cfg.finetune_orthogonality,
    }


def _print_summary(
    out: Path, report: dict[str, Any], results: dict[str, Any], original: dict[str, Any]
) -> None:
    """The ranks and the result tables, and one line with energy, FLOPs and accuracy."""
    print_table("ranks", RANK_COLUMNS, results["layers"])
    print_result_table(original, results)
    typer.echo(
        f"energy {report['energy']:.4g}: FLOPs ×{results['flops_fraction']:.3f} "
        f"(reduction {results['flops_reduction']:.2f}×), accuracy "
        f"{original['accuracy']:.4f} → {results['compressed']['accuracy']:.4f}; "
        f"wrote {out}/results.json, report.md, plan.json, model/"
    )
