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
    RunArgs,
    option,
    parse_method,
    run_command,
    save_run_model,
    say,
)
from tensorslim.report.run import model_spectra, summary_row, write_report
from tensorslim.report.tables import print_table


def register(app: typer.Typer) -> None:
    @run_command(app, "multistage", out=Path("runs/multistage"), base=True, resumable=False)
    def multistage_command(
        ctx: typer.Context,
        run: RunArgs,
        method: str = option("method", "tucker", help="A registered decomposition method."),
        stages: int = typer.Option(3, min=1, help="Number of stages (groups of layers)."),
        budget: str = option(
            "budget", help="Final flops=FRACTION or params=FRACTION of the original model."
        ),
        setting: list[str] = option("setting"),
        preset: str = option("preset"),
        epochs_per_stage: int = typer.Option(1, min=0, help="Fine-tune epochs after each stage."),
        lr: float = typer.Option(0.01, min=0.0, help="Fine-tune learning rate."),
    ) -> None:
        """Compress a few layers at a time, fine-tuning in between."""
        from tensorslim.multistage import multistage

        chosen = parse_method(method, budget, setting, preset)  # bad input fails before any work
        with run.open(ctx, resumable=False):
            s = run.setup()
            base_history, original = run.prepare_base(s)
            small, results = multistage(
                s.model,
                method=method,
                **s.data(),
                stages=stages,
                budget=chosen.budget,
                settings=chosen.settings,
                epochs_per_stage=epochs_per_stage,
                lr=lr,
                progress=run.progress,
                log=say,
            )
            for r in results:
                r["method"] = f"{method} stage {r['stage']}"
            save_run_model(small, run.out)
            write_report(
                run.out,
                results,
                title=f"{run.model} on {run.data}: {method}, {len(results)} stages",
                original=original,
                spectra=model_spectra(s.model),
                base_history=base_history,
                extra_json={"multistage": {"stages": [r["layers_in_stage"] for r in results]}},
            )
        rows = [summary_row(r) for r in results]
        print_table("stages", list(rows[0]), rows)
        typer.echo(f"wrote {run.out}/results.json, report.md, plan.json, model/")
