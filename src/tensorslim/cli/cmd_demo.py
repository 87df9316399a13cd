"""``tensorslim demo``: the whole job on embedded data, every method, in a few minutes.

Trains a small CNN on scikit-learn's digits (8×8 upsampled to 28×28), then runs one
*configuration* after another — a method, its demo settings and a budget (FLOPs; parameters for
the sparse methods) — each compressing the trained model and fine-tuning it briefly. Every
registered method appears (SVD both channel- and spatial-wise). After each configuration the
report (results.json, report.md, plots) is rewritten, so an interrupted demo keeps what it
finished, and ``--resume`` continues after the last finished configuration.

Each configuration seeds torch and the data order from the demo seed and its own name
(``derive_seed(seed, "demo", name)``, :func:`~tensorslim.train.seeding.seed_phase`), so its
result does not depend on which configurations ran before it in the process — a resumed demo
gives the same numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer

from tensorslim.cli.common import (
    Setup,
    continue_command,
    handle_errors,
    open_run,
    option,
    say,
    setup,
    train_base,
)
from tensorslim.errors import TensorslimError
from tensorslim.methods import list_methods, method_class
from tensorslim.pipeline import compress_model, measure
from tensorslim.rank.budget import Budget
from tensorslim.report.run import (
    SUMMARY_COLUMNS,
    chosen_ranks,
    model_spectra,
    original_row,
    summary_row,
    write_json,
    write_report,
)
from tensorslim.report.tables import print_table
from tensorslim.train.seeding import seed_phase

CONFIG_DIR = "configs"
TITLE = "tensorslim demo: small_cnn on digits"
# tensor train replaces Linear layers only, and small_cnn's FLOPs sit in its convolutions: a
# FLOPs budget cannot be met by tt there, so the demo gives it a parameter budget
BUDGET_METRIC = {"tt": "params"}


@dataclass(frozen=True)
class Mode:
    """How much the demo does: base epochs, budgets per method, fine-tune epochs."""

    name: str
    base_epochs: int
    budgets: tuple[float, ...]
    finetune_epochs: int
    min_run_time: float
    labels: tuple[str, ...] | None = None  # None: every method
    extra: tuple[tuple[str, float], ...] = ()  # (label, budget) run after the others


MODES = {
    "quick": Mode("quick", 4, (0.5,), 1, 0.1, labels=("svd", "svd_train")),
    # every method once at half the cost, and SVD also at a quarter: a curve, in minutes
    "default": Mode("default", 6, (0.5,), 1, 0.1, extra=(("svd", 0.25),)),
    "full": Mode("full", 10, (0.75, 0.5, 0.25), 2, 0.3),
}


@dataclass(frozen=True)
class DemoConfig:
    """One compress + fine-tune of the trained base model."""

    label: str
    method: str
    settings: dict[str, Any]
    budget: Budget

    @property
    def name(self) -> str:
        return f"{self.label} {self.budget}"

    def slug(self, index: int) -> str:
        return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", self.name)


def demo_methods() -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, settings): SVD both ways, then every other method (its demo settings)."""
    runs: list[tuple[str, str, dict[str, Any]]] = [
        ("svd", "svd", {"scheme": "channel"}),
        ("svd-spatial", "svd", {"scheme": "spatial"}),
    ]
    for name in list_methods():
        if name != "svd":
            settings = method_class(name).demo_settings or {}
            runs.append((name, name, dict(settings)))
    return runs


def demo_configs(mode: Mode) -> list[DemoConfig]:
    """The configurations of ``mode``, budget by budget so every method shows up early."""
    every = demo_methods()
    methods = [m for m in every if mode.labels is None or m[0] in mode.labels]
    runs = [(m, f) for f in mode.budgets for m in methods]
    runs += [(m, f) for label, f in mode.extra for m in every if m[0] == label]
    configs = []
    for (label, method, settings), fraction in runs:
        metric = BUDGET_METRIC.get(method, method_class(method).budget_metric)
        configs.append(DemoConfig(label, method, settings, Budget(**{metric: fraction})))
    return configs


def seed_config(s: Setup, seed: int, config: DemoConfig) -> int:
    """Seed everything (torch, numpy, the data order) from the demo seed and the name alone.

    ``torch.manual_seed(derive_seed(seed, "demo", name))`` and the loaders from it
    (:func:`~tensorslim.train.seeding.seed_phase`); returns that seed.
    """
    return seed_phase(seed, "demo", config.name, loaders=(s.train_loader, s.test_loader))


def run_config(
    s: Setup, config: DemoConfig, mode: Mode, original: dict, progress: bool, seed: int
) -> dict:
    """Compress and fine-tune one configuration; the results dict (or the reason it was skipped).

    ``seed`` is the configuration's own (:func:`seed_config`): its phases are seeded from it.
    """
    method_type = method_class(config.method)
    try:
        small, result = compress_model(
            s.model,
            method=config.method,
            budget=config.budget,
            settings=config.settings,
            **s.data(),
            finetune_epochs=mode.finetune_epochs,
            post_finalize_epochs=method_type.post_finalize_epochs,
            bn_recalibration_batches=10,
            lr=0.01,
            progress=progress,
            measure_original=original,
            seed=seed,
        )
    except TensorslimError as exc:
        return {"config": config.name, "skipped": str(exc)}
    result["method"] = config.label
    result["config"] = config.name
    result["chosen_ranks"] = chosen_ranks(small)
    return result


class DemoRun:
    """One demo's state: the finished configurations on disk, the report rewritten as they come."""

    def __init__(self, out: Path, mode: Mode) -> None:
        self.out, self.mode = out, mode
        self.configs = demo_configs(mode)
        self.finished: dict[str, dict[str, Any]] = {}
        for path in sorted((out / CONFIG_DIR).glob("*.json")):
            record = json.loads(path.read_text())
            self.finished[record["config"]] = record
        self.original: dict[str, Any] = {}
        self.spectra: dict[str, Any] = {}
        self.base_history: list[dict[str, Any]] = []

    def progress_line(self) -> str:
        return f"{len(self.finished)} of {len(self.configs)} configurations finished"

    def _in_order(self) -> list[dict[str, Any]]:
        return [self.finished[c.name] for c in self.configs if c.name in self.finished]

    def results(self) -> list[dict[str, Any]]:
        return [r for r in self._in_order() if "skipped" not in r]

    def record(self, index: int, config: DemoConfig, result: dict[str, Any]) -> None:
        """Keep a finished configuration (its own JSON file) and rewrite the report with it."""
        path = self.out / CONFIG_DIR / f"{config.slug(index)}.json"
        write_json(path, result)
        self.finished[config.name] = json.loads(path.read_text())
        self.write()

    def write(self) -> None:
        """results.json, report.md, report.html and plots of everything finished so far."""
        skipped = [
            f"{r['config']} skipped: {r['skipped']}" for r in self._in_order() if "skipped" in r
        ]
        write_report(
            self.out,
            self.results(),
            title=TITLE,
            original=self.original,
            spectra=self.spectra,
            base_history=self.base_history,
            extra_json={
                "demo": {
                    "mode": self.mode.name,
                    "budgets": list(self.mode.budgets),
                    "finished": len(self.finished),
                    "configurations": [c.name for c in self.configs],
                    "skipped": skipped,
                    "base_history": self.base_history,
                }
            },
            notes=skipped,
            multi=True,
        )


def run_demo(
    out: Path,
    *,
    mode: Mode,
    progress: bool,
    seed: int = 0,
    resume: bool = False,
    on_start: Callable[[DemoRun], None] | None = None,
) -> list[dict[str, Any]]:
    """Train (or reload) the base, run every configuration not finished yet, report each."""
    torch.manual_seed(seed)
    s = setup(model_name="small_cnn", data="digits", data_dir=None, seed=seed, batch_size=64)
    demo = DemoRun(out, mode)
    if on_start is not None:
        on_start(demo)
    say(f"training small_cnn on digits for {mode.base_epochs} epochs")
    demo.base_history = train_base(
        s,
        epochs=mode.base_epochs,
        lr=0.05,
        out=out / "base",
        resume=resume,
        progress=progress,
        seed=seed,
    )
    demo.original = measure(s.model, s.example_batch, s.test_loader, min_run_time=mode.min_run_time)
    say(f"original accuracy {demo.original['accuracy']:.4f}")
    demo.spectra = model_spectra(s.model)
    demo.write()
    for index, config in enumerate(demo.configs):
        where = f"[{index + 1}/{len(demo.configs)}] {config.name}"
        if config.name in demo.finished:
            say(f"{where}: already done")
            continue
        say(where)
        config_seed = seed_config(s, seed, config)
        result = run_config(s, config, mode, demo.original, progress, config_seed)
        if "skipped" in result:
            say(f"  skipped {config.name}: {result['skipped']}")
        demo.record(index, config, result)
    return [original_row(demo.original)] + [summary_row(r) for r in demo.results()]


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @handle_errors
    def demo(
        ctx: typer.Context,
        quick: bool = typer.Option(
            False, help="Two methods at one budget, fewer epochs: about a minute."
        ),
        full: bool = typer.Option(
            False, help="Every method at three budgets, longer fine-tuning (the full sweep)."
        ),
        out: Path = typer.Option(Path("runs/demo"), help="Where to write the report."),
        resume: bool = typer.Option(
            False, help="Continue an interrupted demo after its last finished configuration."
        ),
        overwrite: bool = typer.Option(
            True, help="Replace an existing demo directory (unless --resume)."
        ),
        seed: int = option("seed"),
        progress: bool = option("progress"),
    ) -> None:
        """Compress a small CNN on digits with every method.

        Trains it on scikit-learn's embedded digits first; writes the report as results come.
        """
        if quick and full:
            raise TensorslimError("give --quick or --full, not both")
        mode = MODES["quick" if quick else "full" if full else "default"]
        state: dict[str, DemoRun] = {}

        def hint() -> str:
            done = state["demo"].progress_line() if "demo" in state else "nothing finished"
            return f"{done} (in {out}/report.md); continue with: {continue_command(ctx)}"

        args = {"model": "small_cnn", "data": "digits", "mode": mode.name, "seed": seed}
        args["batch_size"] = 64
        with open_run(ctx, out, args, resume=resume, overwrite=overwrite, hint=hint):
            rows = run_demo(
                out,
                mode=mode,
                progress=progress,
                seed=seed,
                resume=resume,
                on_start=lambda d: state.update(demo=d),
            )
        print_table(f"{TITLE} (FLOPs per sample)", SUMMARY_COLUMNS, rows)
        typer.echo(f"wrote {out}/report.md, results.json, pareto.png, spectra.png")
