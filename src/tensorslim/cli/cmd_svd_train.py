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


def _opt(default: Any, help: str, *decls: str, **kw: Any) -> Any:
    return typer.Option(default, *decls, help=help, **kw)


# options left unset (None) take the preset's value, else the default their help names
PRESET_NOTE = "; --preset paper sets"
FROM_SCRATCH = _opt(False, "Start SVD training from a fresh init (no dense training).")
SCHEME = _opt("channel", "Conv decomposition: channel | spatial.")
REG = _opt(None, "Sparsity on singular values: l1 | hoyer | hoyer_square (default hoyer).")
LAMBDA_O = _opt(None, f"Weight of the orthogonality loss, ≥ 0 (default 1{PRESET_NOTE} 1).")
LAMBDA_S = _opt(None, "Weight of the sparsity loss, ≥ 0 (default 0.01).")
ENERGY = _opt(None, "Prune per layer this fraction of Σs², in [0, 1).")
TARGET_FLOPS = _opt(None, "Instead of --energy: FLOPs fraction of the model to land on.")
GATE = _opt(
    None,
    "With --target-flops: drop the sparsity term while pruning this energy (e.g. 0.01) would "
    "already meet the target.",
)
RECALIBRATE_BN = _opt(
    None, f"Re-estimate BatchNorm on N batches after pruning (default 10{PRESET_NOTE} 0).", min=0
)
FINETUNE_ORTHO = _opt(True, "Keep the orthogonality loss (λo) while fine-tuning.")
LINEAR = _opt(False, "Also train Linear layers in SVD form (the paper: convolutions only).")
EXCLUDE = _opt(None, "Keep this layer dense (fqn, repeat), e.g. --exclude fc.", "--exclude")
ORTHO_EPOCHS = _opt(
    0, "Epochs with the orthogonality loss only before --epochs (the official first run).", min=0
)
EPOCHS = _opt(3, "Full-rank SVD training epochs with both losses (stage 2).", min=0)
FINETUNE_EPOCHS = _opt(1, "Low-rank fine-tuning epochs (stage 4).", min=0)
LR = _opt(None, f"Learning rate of the training stages (default 0.05{PRESET_NOTE} 1e-3).")
FINETUNE_LR = _opt(None, f"Learning rate of the fine-tune (default --lr{PRESET_NOTE} 1e-3).")
OPTIMIZER = _opt(None, f"sgd (momentum 0.9) | adam (default sgd{PRESET_NOTE} adam).")
WEIGHT_DECAY = _opt(
    None, f"Weight decay on every parameter, U, s, V too (default 5e-4{PRESET_NOTE} 0).", min=0.0
)
SCHEDULE = _opt(
    None, f"Learning rate schedule: cosine | constant | step (default cosine{PRESET_NOTE} step)."
)
PRESET = _opt(
    None, "paper: the official code's training (Adam 1e-3, no weight decay, step schedule, λo 1)."
)


def svd_train(
    ctx: typer.Context,
    run: RunArgs,
    preset: str = PRESET,
    from_scratch: bool = FROM_SCRATCH,
    scheme: str = SCHEME,
    reg: str = REG,
    lambda_o: float = LAMBDA_O,
    lambda_s: float = LAMBDA_S,
    energy: float = ENERGY,
    target_flops: float = TARGET_FLOPS,
    budget_gate_energy: float = GATE,
    recalibrate_bn: int = RECALIBRATE_BN,
    finetune_orthogonality: bool = FINETUNE_ORTHO,
    linear: bool = LINEAR,
    exclude: list[str] = EXCLUDE,
    orthogonal_epochs: int = ORTHO_EPOCHS,
    epochs: int = EPOCHS,
    finetune_epochs: int = FINETUNE_EPOCHS,
    lr: float = LR,
    finetune_lr: float = FINETUNE_LR,
    optimizer: str = OPTIMIZER,
    weight_decay: float = WEIGHT_DECAY,
    schedule: str = SCHEDULE,
) -> None:
    """Train in SVD form, prune singular values by energy, fine-tune.

    Writes the same run artefacts as compress, plus the per-layer ranks before and after
    pruning. With --resume every phase (base training, SVD training, pruning, fine-tune) starts
    from its own seed, so a resumed run is the uninterrupted one. The official code's flow:
    --preset paper --from-scratch --orthogonal-epochs N --epochs N.
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
    "orthogonal_epochs": "epochs_orthogonal",
    "recalibrate_bn": "bn_recalibration_batches",
}
# the command's own default where it differs from the pipeline's (a preset's value wins)
CLI_DEFAULTS = {"bn_recalibration_batches": 10}


def config_from_options(options: dict[str, Any]) -> SVDTrainConfig:
    """The pipeline's settings from the command's own options (checked; unset ones from the
    preset, else the command's defaults, else the pipeline's)."""
    from tensorslim.methods.presets import get_preset
    from tensorslim.methods.svd_train import SVDTrainMethod

    settings = {CONFIG_NAMES.get(k, k): v for k, v in options.items()}
    settings["exclude"] = list(settings["exclude"]) if settings.get("exclude") else None
    preset = get_preset(SVDTrainMethod, settings.get("preset"))
    for key, value in CLI_DEFAULTS.items():
        if settings.get(key) is None and key not in {**preset.settings, **preset.training}:
            settings[key] = value
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
    history: list[dict[str, Any]] = []
    for stage, epochs in report["history"].items():  # in order: numbered on across the stages
        done = len(history)
        history += [{**h, "epoch": h["epoch"] + done, "stage": stage} for h in epochs]
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
        "orthogonal_epochs": cfg.epochs_orthogonal,
        "preset": cfg.preset,
        "training": cfg.summary()["training"],
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
