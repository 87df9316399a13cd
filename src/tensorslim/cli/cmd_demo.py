"""``tensorslim demo``: the whole job on embedded data in a few minutes.

Trains a small CNN on scikit-learn's digits (8×8 upsampled to 28×28), compresses it with SVD
(channel-wise and spatial-wise) and every other method that offers ``demo_settings`` at several
budgets (FLOPs; parameters for the sparse methods), fine-tunes each briefly (SVD training also
after its truncation), and writes a table, results.json, report.md and plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer

from tensorslim.cli.cmd_train import train_base
from tensorslim.cli.common import handle_errors, prepare_run_dir, save_args, say, setup
from tensorslim.errors import TensorslimError
from tensorslim.methods import list_methods, method_class
from tensorslim.pipeline import compress_model, measure
from tensorslim.rank.budget import Budget
from tensorslim.report.run import (
    SUMMARY_COLUMNS,
    model_spectra,
    original_row,
    summary_row,
    write_report,
)
from tensorslim.report.tables import print_table


def demo_methods() -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, settings): SVD both ways, then each method's own demo settings."""
    runs: list[tuple[str, str, dict[str, Any]]] = [
        ("svd", "svd", {"scheme": "channel"}),
        ("svd-spatial", "svd", {"scheme": "spatial"}),
    ]
    for name in list_methods():
        settings = getattr(method_class(name), "demo_settings", None)
        if name != "svd" and settings is not None:
            runs.append((name, name, dict(settings)))
    return runs


def run_demo(out: Path, *, quick: bool, progress: bool, seed: int = 0) -> list[dict[str, Any]]:
    """Train, compress at several budgets with every demo method, and write the report."""
    torch.manual_seed(seed)
    s = setup(model_name="small_cnn", data="digits", data_dir=None, seed=seed, batch_size=64)
    base_epochs = 4 if quick else 10
    say(f"training small_cnn on digits for {base_epochs} epochs")
    base_history = train_base(
        s, epochs=base_epochs, lr=0.05, out=out / "base", resume=False, progress=progress
    )
    original = measure(s.model, s.example_batch, s.test_loader, min_run_time=0.1 if quick else 0.3)
    say(f"original accuracy {original['accuracy']:.4f}")
    budgets = [0.5] if quick else [0.75, 0.5, 0.25]
    methods = demo_methods()
    if quick:
        methods = methods[:1] + [m for m in methods[2:] if m[1] == "svd_train"][:1]
    results = []
    for label, method, settings in methods:
        method_type = method_class(method)
        for fraction in budgets:
            budget = Budget(**{method_type.budget_metric: fraction})
            say(f"{label}: budget {budget}")
            try:
                _, result = compress_model(
                    s.model,
                    method=method,
                    budget=budget,
                    settings=settings,
                    train_loader=s.train_loader,
                    test_loader=s.test_loader,
                    example_batch=s.example_batch,
                    finetune_epochs=1 if quick else 2,
                    post_finalize_epochs=method_type.post_finalize_epochs,
                    bn_recalibration_batches=10,
                    lr=0.01,
                    progress=progress,
                    measure_original=original,
                )
            except TensorslimError as exc:
                say(f"  skipped {label} at {budget}: {exc}")
                continue
            result["method"] = label
            results.append(result)
    write_report(
        out,
        results,
        title="tensorslim demo: small_cnn on digits",
        original=original,
        spectra=model_spectra(s.model),
        base_history=base_history,
        extra_json={"demo": {"quick": quick, "budgets": budgets}},
    )
    return [original_row(original)] + [summary_row(r) for r in results]


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @handle_errors
    def demo(
        quick: bool = typer.Option(False, help="One budget, fewer epochs: under a minute."),
        out: Path = typer.Option(Path("runs/demo"), help="Where to write the report."),
        overwrite: bool = typer.Option(True, help="Replace an existing demo directory."),
        progress: bool = typer.Option(True, help="Show progress bars."),
    ) -> None:
        """Train a small CNN on embedded digits, compress it every way, and report."""
        prepare_run_dir(out, resume=False, overwrite=overwrite)
        save_args(
            out,
            "demo",
            {"model": "small_cnn", "data": "digits", "quick": quick, "seed": 0, "batch_size": 64},
        )
        rows = run_demo(out, quick=quick, progress=progress)
        print_table(
            "tensorslim demo: small_cnn on digits (FLOPs per sample)", SUMMARY_COLUMNS, rows
        )
        typer.echo(f"wrote {out}/report.md, results.json, pareto.png, spectra.png")
