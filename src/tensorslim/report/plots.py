"""Plots written as PNG files (matplotlib, headless).

Each plot is drawn so that it does not mislead: the accuracy axis keeps the original model and a
span of at least :data:`CONTEXT_POINTS` percentage points in view (a 0.5 point loss does not
fill the plot), each method has its own hollow marker shape (coinciding points stay visible),
fine-tuning continues the base training's epoch axis, and the ranks a plan kept are marked on
the singular value spectra they were chosen from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.lines import Line2D

MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h", "<", ">", "p", "*")
CONTEXT_POINTS = 10.0  # the accuracy axis spans at least this many percentage points


def accuracy_limits(values: Sequence[float], original: float | None) -> tuple[float, float]:
    """y-limits (percent) that show every value, the original, and ≥ CONTEXT_POINTS of range."""
    shown = [*values, *([original] if original is not None else [])]
    top = min(100.0, max(shown) + 1.5)
    bottom = max(0.0, min(min(shown) - 1.5, top - CONTEXT_POINTS))
    return bottom, max(top, bottom + CONTEXT_POINTS)


def _save(fig: Any, path: str | Path) -> Path:
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def pareto_plot(
    points: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    original: dict[str, Any] | None = None,
    title: str = "accuracy vs FLOPs",
) -> Path:
    """:func:`pareto_figure` as a PNG."""
    return _save(pareto_figure(points, original=original, title=title), path)


def pareto_figure(
    points: Sequence[dict[str, Any]],
    *,
    original: dict[str, Any] | None = None,
    title: str = "accuracy vs FLOPs",
) -> Any:
    """Accuracy (y, %) against FLOPs fraction of the original (x), one series per method.

    ``points``: dicts with ``method``, ``flops_fraction``, ``accuracy`` and optionally
    ``accuracy_before_finetune`` (small dots of the same colour). The right-hand axis reads
    the change against the original in percentage points.
    """
    fig, ax = plt.subplots(figsize=(7.6, 4.6), dpi=120)
    methods = list(dict.fromkeys(p["method"] for p in points))
    shown: list[float] = []
    for i, method in enumerate(methods):
        series = sorted(
            (p for p in points if p["method"] == method), key=lambda p: p["flops_fraction"]
        )
        color, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
        xs = [p["flops_fraction"] for p in series]
        ys = [100 * p["accuracy"] for p in series]
        shown += ys
        ax.plot(xs, ys, "-", color=color, lw=1, alpha=0.7)
        ax.plot(xs, ys, marker, color=color, mfc="none", mew=1.6, ms=8, ls="none", label=method)
        before = [(x, 100 * b) for x, p in zip(xs, series, strict=True)
                  if (b := p.get("accuracy_before_finetune")) is not None]  # fmt: skip
        if before:
            shown += [b for _, b in before]
            ax.plot(*zip(*before, strict=True), ".", color=color, ms=5, alpha=0.6)
    base = 100 * original["accuracy"] if original and original.get("accuracy") is not None else None
    if base is not None:
        ax.axhline(base, color="k", lw=1, ls=":", label=f"original ({base:.1f}%)")
        ax.secondary_yaxis("right", functions=(lambda y: y - base, lambda d: d + base)).set_ylabel(
            "change vs original (points)"
        )
    if shown:
        ax.set_ylim(*accuracy_limits(shown, base))
    handles, labels = ax.get_legend_handles_labels()
    if any(p.get("accuracy_before_finetune") is not None for p in points):
        handles.append(Line2D([], [], marker=".", color="grey", ls="none", ms=5))
        labels.append("before fine-tuning")
    ax.set_xlabel("FLOPs (fraction of original; sparse methods: nonzero FLOPs)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.16, 1.0))
    return fig


def spectra_plot(
    spectra: Mapping[str, torch.Tensor],
    path: str | Path,
    title: str = "",
    *,
    ranks: Mapping[str, Mapping[str, int]] | None = None,
) -> Path:
    """:func:`spectra_figure` as a PNG."""
    return _save(spectra_figure(spectra, title, ranks=ranks), path)


def spectra_figure(
    spectra: Mapping[str, torch.Tensor],
    title: str = "",
    *,
    ranks: Mapping[str, Mapping[str, int]] | None = None,
) -> Any:
    """Normalised singular value spectra σᵢ/σ₁ per layer against i/R (log scale).

    ``ranks`` maps a run's label to the rank it kept per layer; each run gets a marker shape,
    drawn on the layer's curve at (r/R, σ_r/σ₁) — the last singular value kept.
    """
    fig, ax = plt.subplots(figsize=(7.6, 4.6), dpi=120)
    curves: dict[str, tuple[torch.Tensor, str]] = {}
    for i, (name, values) in enumerate(spectra.items()):
        values = values.double()
        normalised = (values / values[0].clamp_min(1e-30)).clamp_min(1e-8)
        x = torch.arange(1, values.numel() + 1, dtype=torch.float64) / values.numel()
        color = f"C{i % 10}"
        ax.semilogy(x.numpy(), normalised.numpy(), color=color, lw=1.2, label=name)
        curves[name] = (normalised, color)
    handles, labels = ax.get_legend_handles_labels()
    for j, (run, chosen) in enumerate((ranks or {}).items()):
        marker = MARKERS[(j + 1) % len(MARKERS)]
        for layer, rank in chosen.items():
            if layer in curves and 1 <= rank <= curves[layer][0].numel():
                values, color = curves[layer]
                ax.plot(rank / values.numel(), float(values[rank - 1]), marker, color=color,
                        mfc="none", mew=1.5, ms=8)  # fmt: skip
        handles.append(Line2D([], [], marker=marker, color="k", mfc="none", ls="none"))
        labels.append(f"rank kept: {run}")
    ax.set_xlabel("index / full rank")
    ax.set_ylabel("σᵢ / σ₁")
    ax.set_title(title or "singular value spectra")
    ax.grid(alpha=0.3, which="both")
    if len(handles) <= 24:
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def training_curves_plot(
    histories: Mapping[str, Sequence[dict[str, float]]],
    path: str | Path,
    *,
    compressed_at: float | None = None,
) -> Path:
    """:func:`training_curves_figure` as a PNG."""
    return _save(training_curves_figure(histories, compressed_at=compressed_at), path)


def training_curves_figure(
    histories: Mapping[str, Sequence[dict[str, float]]],
    *,
    compressed_at: float | None = None,
) -> Any:
    """Test accuracy (or train accuracy when no test accuracy) per epoch for each run.

    All runs share one epoch axis: a fine-tune's epochs continue after the base training's
    (``compressed_at`` marks where the base training ended and the compression happened).
    """
    fig, ax = plt.subplots(figsize=(7.6, 4.0), dpi=120)
    shown: list[float] = []
    for i, (name, history) in enumerate(histories.items()):
        if not history:
            continue
        key = "test_accuracy" if "test_accuracy" in history[0] else "train_accuracy"
        if key not in history[0]:  # unlabeled training (distillation): no accuracy to draw
            continue
        ys = [100 * h[key] for h in history]
        shown += ys
        ax.plot([h["epoch"] for h in history], ys, "-", marker=MARKERS[i % len(MARKERS)],
                mfc="none", ms=6, label=name)  # fmt: skip
    if compressed_at is not None:
        ax.axvline(compressed_at, color="k", lw=1, ls=":")
        ax.annotate("compressed", (compressed_at, 0.02), xycoords=("data", "axes fraction"),
                    rotation=90, fontsize=7, ha="right", va="bottom")  # fmt: skip
    if shown:
        ax.set_ylim(*accuracy_limits(shown, None))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def layer_bars_plot(
    rows: Sequence[dict[str, Any]], path: str | Path, key: str = "flops_kept"
) -> Path:
    """Bar per layer of the fraction of FLOPs (or another ``key``) kept."""
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(rows)), 4.0), dpi=120)
    ax.bar(range(len(rows)), [r.get(key, 1.0) for r in rows])
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=70, fontsize=7)
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
