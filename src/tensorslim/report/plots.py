"""Plots written as PNG files (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch


def pareto_plot(
    points: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    original: dict[str, Any] | None = None,
    title: str = "accuracy vs FLOPs",
) -> Path:
    """Accuracy (y) against FLOPs fraction of the original (x), one series per method.

    ``points``: dicts with ``method``, ``flops_fraction``, ``accuracy`` and optionally
    ``accuracy_before_finetune`` (drawn hollow).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    methods = sorted({p["method"] for p in points})
    for i, method in enumerate(methods):
        series = sorted(
            (p for p in points if p["method"] == method), key=lambda p: p["flops_fraction"]
        )
        color = f"C{i}"
        xs = [p["flops_fraction"] for p in series]
        ax.plot(xs, [100 * p["accuracy"] for p in series], "o-", color=color, label=f"{method}")
        before = [p.get("accuracy_before_finetune") for p in series]
        if any(b is not None for b in before):
            ax.plot(
                [x for x, b in zip(xs, before, strict=True) if b is not None],
                [100 * b for b in before if b is not None],
                "o--",
                color=color,
                mfc="none",
                alpha=0.6,
                label=f"{method} (before fine-tune)",
            )
    if original is not None:
        ax.axhline(100 * original["accuracy"], color="k", lw=1, ls=":", label="original")
    ax.set_xlabel("FLOPs (fraction of original)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def spectra_plot(spectra: Mapping[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """Normalised singular value spectra σᵢ/σ₁ per layer against i/R (log scale)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name, values in spectra.items():
        values = values.double()
        x = torch.arange(1, values.numel() + 1, dtype=torch.float64) / values.numel()
        ax.semilogy(
            x.numpy(), (values / values[0].clamp_min(1e-30)).clamp_min(1e-8).numpy(), label=name
        )
    ax.set_xlabel("index / full rank")
    ax.set_ylabel("σᵢ / σ₁")
    ax.set_title(title or "singular value spectra")
    ax.grid(alpha=0.3, which="both")
    if len(spectra) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def training_curves_plot(
    histories: Mapping[str, Sequence[dict[str, float]]], path: str | Path
) -> Path:
    """Test accuracy (or train loss when no test accuracy) per epoch for each run."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, history in histories.items():
        if not history:
            continue
        key = "test_accuracy" if "test_accuracy" in history[0] else "train_accuracy"
        ax.plot([h["epoch"] for h in history], [100 * h[key] for h in history], "o-", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def layer_bars_plot(
    rows: Sequence[dict[str, Any]], path: str | Path, key: str = "flops_kept"
) -> Path:
    """Bar per layer of the fraction of FLOPs (or another ``key``) kept."""
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(rows)), 4.0), dpi=120)
    ax.bar(range(len(rows)), [r.get(key, 1.0) for r in rows])
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=70, fontsize=7)
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
