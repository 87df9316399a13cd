"""``tensorslim export RUN --format onnx|torchscript|safetensors``."""

from __future__ import annotations

from pathlib import Path

import typer

from tensorslim.cli.cmd_eval import load_run_model, run_options
from tensorslim.cli.common import handle_errors
from tensorslim.errors import TensorslimError
from tensorslim.export import FORMATS, export_onnx, export_torchscript, merge_slow_layers
from tensorslim.io import save
from tensorslim.report.tables import print_table


def register(app: typer.Typer) -> None:
    shared = run_options()

    @app.command("export")
    @handle_errors
    def export(
        run: Path = typer.Argument(..., help="A run directory (from compress or train)."),
        format: str = typer.Option(
            "onnx", "--format", help="onnx | torchscript | safetensors (weights + plan)"
        ),
        out: Path = typer.Option(None, help="Output file or directory (default RUN/export/)."),
        merge_slow: bool = typer.Option(
            True, help="Merge structured layers back to dense where dense measures faster."
        ),
        model: str = shared["model"],
        data: str = shared["data"],
        data_dir: Path = shared["data_dir"],
        trust_code: bool = shared["trust_code"],
    ) -> None:
        """Export a run's model (ONNX, TorchScript, safetensors).

        ONNX is checked in onnxruntime against PyTorch.
        """
        if format not in FORMATS:
            raise TensorslimError(f"unknown export format '{format}': use {', '.join(FORMATS)}")
        s, rebuilt = load_run_model(run, data_dir, model=model, data=data, trust_code=trust_code)
        example = s.example_batch[:4]
        if merge_slow:
            decisions = merge_slow_layers(rebuilt, s.example_batch)
            if decisions:
                print_table("structured vs dense latency (ms)", list(decisions[0]), decisions)
        if format == "safetensors":
            target = out or run / "export" / "safetensors"
            save(rebuilt, target)
            typer.echo(f"wrote {target} (weights + plan.json + manifest.json)")
            return
        suffix = ".onnx" if format == "onnx" else ".pt"
        target = out or run / "export" / f"model{suffix}"
        if format == "onnx":
            info = export_onnx(rebuilt, example, target)
        else:
            info = export_torchscript(rebuilt, example, target)
        typer.echo(
            f"wrote {target} ({int(info['bytes'])} bytes, max |Δ| vs PyTorch "
            f"{info['max_abs_diff']:.2e})"
        )
