"""``tensorslim inspect``: per-layer table of a model (params, FLOPs, ranks, latency)."""

from __future__ import annotations

from pathlib import Path

import typer

from tensorslim.analysis.inspect import inspect_model
from tensorslim.cli.common import DATA_NAMES, handle_errors, load_weights, option, setup
from tensorslim.report.run import write_json
from tensorslim.report.tables import print_table


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    @handle_errors
    def inspect(
        model: str = option("model"),
        data: str = option("data", help="Dataset that fixes the input shape: " + DATA_NAMES),
        data_dir: Path = option("data_dir"),
        weights: Path = option("weights"),
        latency: bool = typer.Option(True, help="Measure per-layer latency (takes a while)."),
        batch: int = typer.Option(32, min=1, help="Batch size of the latency measurement."),
        json_out: Path = typer.Option(None, "--json", help="Also write the table as JSON here."),
    ) -> None:
        """Per-layer shapes, params, FLOPs, ranks and latency."""
        s = setup(
            model_name=model,
            data=data,
            data_dir=data_dir,
            seed=0,
            batch_size=128,
            limit_train=1,
            limit_test=batch,
            latency_batch=batch,
        )
        if weights is not None:
            load_weights(s.model, weights)
        facts = inspect_model(s.model, s.example_batch, latency=latency)
        columns = list(facts["layers"][0]) if facts["layers"] else ["layer"]
        print_table(
            f"{model} on {data} (FLOPs per sample, 2 per multiply-add)", columns, facts["layers"]
        )
        total = facts["total"]
        line = f"total: params {total['params']}, FLOPs {total['flops']}"
        if latency:
            line += (
                f", latency {total['latency_ms']:.3f} ms (batch {total['latency_batch']}, "
                f"{total['threads']} threads)"
            )
        typer.echo(line)
        for fqn in facts["never_called"]:
            typer.echo(f"note: {fqn} never runs its own forward (left dense by every method)")
        if json_out is not None:
            write_json(json_out, facts)
