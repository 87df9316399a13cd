"""``tensorslim run RECIPE``: a whole pipeline from one YAML file (also under torchrun)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from tensorslim.cli.common import (
    attach_hint,
    continue_command,
    handle_errors,
    option,
    require_trust,
    say,
)
from tensorslim.recipes.schema import load_recipe
from tensorslim.train.ddp import shutdown
from tensorslim.train.distributed import is_main_process


def _launcher() -> str:
    """What to put before the tensorslim command: torchrun's own options are not known here."""
    return "torchrun [your options] -m " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def register(app: typer.Typer) -> None:
    @app.command("run")
    @handle_errors
    def run(
        ctx: typer.Context,
        recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
        out: Path = typer.Option(None, help="Run directory (default runs/<recipe name>)."),
        resume: bool = typer.Option(False, help="Continue after the last finished stage."),
        overwrite: bool = typer.Option(False, help="Replace a non-empty run directory."),
        progress: bool = option("progress"),
        trust_code: bool = option("trust_code"),
    ) -> None:
        """Run a recipe: a whole pipeline from one YAML file.

        Stages: train, compress, svd_train, prune, finetune, evaluate, export.
        """
        from tensorslim.recipes.runner import run_recipe

        parsed = load_recipe(recipe)  # validate before anything else
        for key, name in (("model", parsed.model.name), ("data", parsed.data.name)):
            require_trust(
                name, where=str(recipe), key=f"{key}.name", trusted=trust_code, instead=""
            )
        target = out or Path("runs") / parsed.name
        try:
            summary = run_recipe(
                recipe, target, resume=resume, overwrite=overwrite, progress=progress, log=say
            )
        except BaseException as exc:
            if (target / "stages").is_dir():  # finished stages and epochs are kept
                attach_hint(exc, f"continue with: {_launcher()}{continue_command(ctx)}")
            raise
        finally:
            shutdown()
        if is_main_process() and summary:
            comp, orig = summary["compressed"], summary["original"]
            params = f"{comp['params']}"
            if comp.get("params_nonzero", comp["params"]) != comp["params"]:
                params = f"{comp['params_nonzero']} nonzero of {comp['params']}"
            typer.echo(
                f"{parsed.name}: accuracy {orig['accuracy']:.4f} → {comp['accuracy']:.4f}, "
                f"FLOPs ×{summary['flops_fraction']:.3f}, params {orig['params']} → {params}, "
                f"latency {orig['latency_ms']:.2f} → {comp['latency_ms']:.2f} ms"
            )
            typer.echo(f"wrote {target}/results.json, report.md, report.html")
