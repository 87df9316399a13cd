"""``tensorslim methods`` and ``tensorslim models``: what is available."""

from __future__ import annotations

import typer

from tensorslim.methods import list_methods, method_class
from tensorslim.methods.presets import preset_names


def register(app: typer.Typer) -> None:
    @app.command("methods")
    def methods() -> None:
        """List the registered compression methods."""
        for name in list_methods():
            cls = method_class(name)
            presets = preset_names(cls)
            extra = f" (presets: {', '.join(presets)})" if len(presets) > 1 else ""
            typer.echo(f"{name:12s} [{cls.kind}] {cls.description}{extra}")

    @app.command("models")
    def models() -> None:
        """List the models in the zoo."""
        from tensorslim.models import list_models

        for name in list_models():
            typer.echo(name)
