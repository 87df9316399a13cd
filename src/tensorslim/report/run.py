"""Write a run directory's report: results.json, report.md and PNG plots."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.report.html import embedded_image, html_table, write_html
from tensorslim.report.plots import layer_bars_plot, pareto_plot, spectra_plot, training_curves_plot
from tensorslim.report.tables import markdown_table
from tensorslim.train.checkpoint import atomic_write_text

PLOTS = (
    ("pareto", "Accuracy vs FLOPs"),
    ("spectra", "Singular value spectra"),
    ("layers", "FLOPs kept per layer (last run)"),
    ("curves", "Training curves"),
)
SUMMARY_COLUMNS = [
    "method",
    "budget",
    "accuracy_before_ft",
    "accuracy",
    "params",
    "params_fraction",
    "flops",
    "flops_fraction",
    "latency_ms",
    "speedup",
]
LAYER_COLUMNS = [
    "layer",
    "type",
    "method",
    "choice",
    "params",
    "params_after",
    "flops",
    "flops_after",
    "flops_kept",
    "error",
    "reason",
]


def _clean(value: Any) -> Any:
    """JSON-safe copy: tensors → lists, NaN/Inf → None, tuples → lists."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Atomic, pretty JSON."""
    atomic_write_text(path, json.dumps(_clean(data), indent=2))


def summary_row(result: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the summary table from a ``compress_model`` results dict."""
    budget = result.get("budget") or {}
    comp = result["compressed"]
    return {
        "method": result["method"],
        "budget": ", ".join(
            f"{k}={v:g}" if isinstance(v, int | float) else f"{k}={v}" for k, v in budget.items()
        )
        or "rule",
        "accuracy_before_ft": result.get("accuracy_before_finetune"),
        "accuracy": comp.get("accuracy"),
        # pruned weights are stored compactly (values + indices): count what is kept
        "params": comp.get("params_nonzero", comp["params"]),
        "params_fraction": result.get("params_nonzero_fraction", result.get("params_fraction")),
        "flops": comp["flops"],
        "flops_fraction": result.get("flops_fraction"),
        "latency_ms": comp.get("latency_ms"),
        "speedup": result.get("latency_speedup"),
        "disk_mb": comp.get("disk_mb"),
    }


def original_row(original: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "method": "original",
        "budget": "–",
        "accuracy": original.get("accuracy"),
        "params": original["params"],
        "params_fraction": 1.0,
        "flops": original["flops"],
        "flops_fraction": 1.0,
        "latency_ms": original.get("latency_ms"),
        "speedup": 1.0,
        "disk_mb": original.get("disk_mb"),
    }


def pareto_points(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per run: FLOPs fraction (nonzero FLOPs for sparse runs) and accuracies."""
    points = []
    for r in results:
        accuracy = r["compressed"].get("accuracy")
        if accuracy is None:
            continue
        flops = r["flops_fraction"]
        nonzero = r.get("flops_nonzero_fraction")
        sparse = nonzero is not None and nonzero < flops - 1e-9
        points.append(
            {
                # pruned weights are still computed densely: at x = 1 every sparse run would
                # sit on the original; their nonzero FLOPs (what a sparse kernel does) separate them
                "method": f"{r['method']} (nonzero)" if sparse else r["method"],
                "flops_fraction": nonzero if sparse else flops,
                "accuracy": accuracy,
                "accuracy_before_finetune": r.get("accuracy_before_finetune"),
            }
        )
    return points


def epoch_axis(
    results: Sequence[Mapping[str, Any]], base_history: Sequence[Mapping[str, Any]] | None
) -> dict[str, list[dict[str, Any]]]:
    """Every run's history on the base training's epoch axis (fine-tuning continues it).

    A run's records are numbered after the last base epoch in the order they happened (a
    method's second fine-tuning phase restarts its own count at 1; here it continues), after a
    first point half an epoch earlier: the accuracy right after compression, when known.
    """
    base = [dict(h) for h in base_history or []]
    start = int(base[-1]["epoch"]) if base else 0
    histories: dict[str, list[dict[str, Any]]] = {"base training": base} if base else {}
    for r in results:
        label = f"{r['method']} {summary_row(r)['budget']}"
        records = [{**h, "epoch": start + i + 1} for i, h in enumerate(r.get("history", []))]
        before = r.get("accuracy_before_finetune")
        if records and before is not None and "test_accuracy" in records[0]:
            # where the fine-tuning started from: the compressed model, at the compression
            records.insert(0, {"epoch": start + 0.5, "test_accuracy": before})
        histories[label] = records
    return histories


def _write_plots(
    out: Path,
    results: Sequence[Mapping[str, Any]],
    title: str,
    original: Mapping[str, Any],
    spectra: Mapping[str, torch.Tensor] | None,
    base_history: Sequence[Mapping[str, Any]] | None,
) -> dict[str, Path]:
    """pareto.png, spectra.png, layers.png and curves.png, where there is something to show."""
    files: dict[str, Path] = {}
    points = pareto_points(results)
    if points:
        files["pareto"] = pareto_plot(
            points, out / "pareto.png", original=dict(original), title=title
        )
    if spectra:
        ranks = {
            f"{r['method']} {summary_row(r)['budget']}": r["chosen_ranks"]
            for r in results
            if r.get("chosen_ranks")
        }
        # a few runs at most: more markers would hide the curves
        chosen = dict(list(ranks.items())[:4])
        files["spectra"] = spectra_plot(spectra, out / "spectra.png", ranks=chosen)
    if results:
        files["layers"] = layer_bars_plot(results[-1]["layers"], out / "layers.png")
    histories = epoch_axis(results, base_history)
    if any(histories.values()):
        boundary = histories["base training"][-1]["epoch"] + 0.5 if base_history else None
        files["curves"] = training_curves_plot(
            histories, out / "curves.png", compressed_at=boundary
        )
    return files


def write_report(
    out_dir: str | Path,
    results: Sequence[Mapping[str, Any]],
    *,
    title: str,
    original: Mapping[str, Any],
    spectra: Mapping[str, torch.Tensor] | None = None,
    base_history: Sequence[Mapping[str, float]] | None = None,
    extra_json: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    multi: bool = False,
) -> dict[str, Path]:
    """Write results.json, report.md, pareto.png (+ spectra.png, layers.png, curves.png).

    ``results`` are ``compress_model``-style dicts. With one result (and ``multi`` False)
    results.json holds it at the top level; otherwise under ``runs``. ``notes`` are lines for
    report.md (e.g. configurations that were skipped, and why).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _write_plots(out, results, title, original, spectra, base_history)
    payload: dict[str, Any] = {"original": dict(original)}
    if len(results) == 1 and not multi:
        payload.update(dict(results[0]))
        payload["original"] = dict(original)
    else:
        payload["runs"] = [dict(r) for r in results]
        best = min(results, key=lambda r: abs(r["flops_fraction"] - 0.5)) if results else None
        if best is not None:
            payload["compressed"] = dict(best["compressed"])
    if extra_json:
        payload.update(extra_json)
    write_json(out / "results.json", payload)
    files["results"] = out / "results.json"

    rows = [original_row(original)] + [summary_row(r) for r in results]
    conventions = (
        "Accuracy is top-1 on the test split; FLOPs are per sample (2 per multiply-add, counted by "
        "`torch.utils.flop_counter`); latency is the median forward time of one batch of "
        f"{original.get('latency_batch', '?')} measured with `torch.utils.benchmark` on "
        f"{original.get('latency_threads', '?')} thread(s)."
    )
    lines = [f"# {title}", "", "## Summary", "", markdown_table(SUMMARY_COLUMNS, rows), ""]
    lines += [conventions, ""]
    lines += [line for note in notes for line in (f"> note: {note}", "")]
    for name, label in PLOTS:
        if name in files:
            lines += [f"## {label}", "", f"![{label}]({files[name].name})", ""]
    for r in results:
        lines += [f"## Layers: {r['method']} {summary_row(r)['budget']}", ""]
        if r.get("plan_summary"):
            lines += [f"Plan: {r['plan_summary']}", ""]
        lines += [markdown_table(LAYER_COLUMNS, r["layers"]), ""]
        for note in r.get("plan_notes", []):
            lines += [f"> note: {note}", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    files["report"] = out / "report.md"

    note_html = "".join(f'<p class="note">note: {html.escape(n)}</p>' for n in notes)
    sections = [
        (
            "Summary",
            html_table(SUMMARY_COLUMNS, rows) + f'<p class="note">{conventions}</p>' + note_html,
        )
    ]
    for name, label in PLOTS:
        if name in files:
            sections.append((label, embedded_image(files[name], label)))
    for r in results:
        notes = "".join(f'<p class="note">note: {n}</p>' for n in r.get("plan_notes", []))
        sections.append(
            (
                f"Layers: {r['method']} {summary_row(r)['budget']}",
                html_table(LAYER_COLUMNS, r["layers"]) + notes,
            )
        )
    files["html"] = write_html(out / "report.html", title=title, sections=sections)
    return files


def model_spectra(model: nn.Module, limit: int = 12) -> dict[str, torch.Tensor]:
    """Singular values of each Linear / non-grouped Conv2d weight (channel-wise view)."""
    from tensorslim.decompose.svd import conv_weight_to_matrix, singular_values
    from tensorslim.layers.linear_like import is_linear_like, linear_weight

    spectra = {}
    for name, module in model.named_modules():
        if is_linear_like(module) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            w = (linear_weight(module) if is_linear_like(module) else module.weight).detach()
            matrix = w if w.dim() == 2 else conv_weight_to_matrix(w, "channel")
            if min(matrix.shape) > 1:
                spectra[name] = singular_values(matrix)
        if len(spectra) >= limit:
            break
    return spectra


def chosen_ranks(model: nn.Module) -> dict[str, int]:
    """Rank kept per layer where the last plan chose a channel-wise matrix rank (SVD forms).

    These are ranks of the same matrices :func:`model_spectra` shows (a conv kernel viewed
    C_out × C_in·kh·kw, a Linear weight as it is), so they can be marked on the spectra.
    """
    from tensorslim.plan import plans_of

    plans = plans_of(model)
    if not plans:
        return {}
    return {
        lp.fqn: int(lp.config["rank"])
        for lp in plans[-1].layers
        if lp.method is not None
        and isinstance(lp.config.get("rank"), int)
        and lp.config.get("scheme") == "channel"
    }
