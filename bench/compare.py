"""The cross-method comparison on Fashion-MNIST (issue: recipes/reports/distributed).

Every method on the same trained base models (small_cnn and resnet20, 1 input channel) at
matched budgets — 0.5 and 0.25 of the FLOPs for the structured methods, the parameter count the
SVD result reached for the sparse ones — with equal epochs after the base (one fine-tune epoch
for post-hoc methods; one training epoch with the method's regularizer or pruning schedule for
the training-time methods). Writes bench/results/compare.{json,md,png} and, with
--update-readme, regenerates the README's summary table from the JSON.

Speedups: the planner plans for batch 64 at 1 thread (memory_format auto), and every
compressed model is timed interleaved with the dense model in the same run there, each in NCHW
and in channels_last, and the faster layout of each is compared (:func:`interleaved_speedup`);
the original row's latency is the median of those dense timings. Rerunning some methods with
``--merge`` keeps the other rows, each with the ratio measured in its own run.

    python bench/compare.py [--limit-train 20000] [--epochs 3] [--update-readme]
    python bench/compare.py --methods SVD,TT --merge --update-readme   # rerun some methods
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, facts, fashion_loaders, trained_model, write_results
from tensorslim.analysis.deployment import FORMATS, Deployment
from tensorslim.errors import TensorslimError
from tensorslim.pipeline import compress_model, measure
from tensorslim.planner.memory_format import time_in_deployments
from tensorslim.rank.budget import Budget
from tensorslim.report.tables import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- compare:start -->", "<!-- compare:end -->"
LATENCY_BATCH = 64
# planned for and timed at 1 thread (as bench/latency.py): on the shared 2-core machine two
# OpenMP threads wait on each other whenever a neighbour takes a core
DEPLOYMENT = Deployment(batch=LATENCY_BATCH, threads=1)
# method label → (registered method, settings); all share the planner's FLOPs budget
STRUCTURED = {
    "SVD": ("svd", {"scheme": "best"}),
    "SVD training": ("svd_train", {"reg": "hoyer", "lambda_s": 0.01, "lambda_o": 1.0}),
    "CP": ("cp", {"rank_rule": "budget"}),
    "Tucker-2": ("tucker", {"rank_rule": "budget"}),
    "TT": ("tt", {}),
    "DeBut": ("debut", {"candidate_sweeps": 1, "als_sweeps": 4}),
}
SPARSE = {"RPG": ("rpg", {}), "GMP": ("gmp", {})}
# Linear-only methods cannot reach a FLOPs target on a conv net (the convs hold the FLOPs);
# they are budgeted on the parameters instead, which the classifier holds
PARAMS_BUDGET = {"TT"}
# SVD training's third stage: its epoch(s) train the full-rank factors with the regularizers, and
# energy truncation then needs a low-rank fine-tune to recover (Yang et al.'s pipeline)
POST_FINALIZE_EPOCHS = {"SVD training": 1}
COLUMNS = [
    "model",
    "method",
    "budget",
    "accuracy_before_ft",
    "accuracy_after_finalize",
    "accuracy",
    "flops_fraction",
    "params_fraction",
    "latency_ms",
    "dense_ms",
    "speedup",
    "layouts",
    "seconds",
    "note",
]


def interleaved_speedup(model, small, example) -> dict:
    """The dense and the compressed model timed interleaved in one run, each in NCHW and in
    channels_last (eager, :data:`DEPLOYMENT`'s batch and threads): the faster layout of each,
    its ms (best round's CPU time per pass, see analysis/timing.py) and dense/compressed."""
    where = DEPLOYMENT
    models = {
        f"{name}:{layout}": (m, where.in_format(layout))
        for name, m in (("dense", model), ("compressed", small))
        for layout in FORMATS
    }
    timed = time_in_deployments(models, example, rounds={"min_rounds": 24})
    best = {
        name: min((k for k in timed if k.startswith(name)), key=lambda k: timed[k].ms)
        for name in ("dense", "compressed")
    }
    dense, comp = timed[best["dense"]].ms, timed[best["compressed"]].ms
    return {
        "dense_ms": dense,
        "latency_ms": comp,
        "speedup": dense / comp,
        "layouts": f"{best['dense'].split(':')[1]}/{best['compressed'].split(':')[1]}",
    }


def run_one(model, label, method, settings, budget, loaders, example, original, epochs) -> dict:
    train, test = loaders
    started = time.perf_counter()
    try:
        small, result = compress_model(
            model,
            method=method,
            budget=budget,
            settings=settings,
            train_loader=train,
            test_loader=test,
            example_batch=example,
            finetune_epochs=epochs,
            lr=0.01,
            progress=False,
            measure_original=original,
            post_finalize_epochs=POST_FINALIZE_EPOCHS.get(label, 0),
            deployment=DEPLOYMENT,
        )
    except TensorslimError as exc:
        return {"method": label, "budget": str(budget), "note": f"not run: {exc}"}
    comp = result["compressed"]
    summary = result.get("method_summary") or {}
    # nonzero counts: for pruned models what a sparse format keeps; else equal to the dense counts
    flops = comp["flops_nonzero"]
    params = comp["params_nonzero"]
    seconds = time.perf_counter() - started
    check = result.get("latency_check") or {}
    return {
        "method": label,
        "budget": str(budget),
        "accuracy_before_ft": result["accuracy_before_finetune"],
        "accuracy_after_finalize": result["accuracy_after_finalize"],
        "accuracy": comp["accuracy"],
        "flops_fraction": flops / original["flops"],
        "params_fraction": params / original["params"],
        **interleaved_speedup(model, small, example),
        "plan_predicted_fraction": check.get("predicted_fraction"),
        "plan_measured_fraction": check.get("measured_fraction"),
        "seconds": seconds,
        "note": "; ".join(result.get("plan_notes", []))[:160],
        "summary": {k: v for k, v in summary.items() if not isinstance(v, dict | list)},
    }


def run_model(name, model, args, wanted, kept, loaders, example) -> list[dict]:
    """The original row and every wanted method's rows at every budget for one model; the
    original's latency is the median of the dense timings interleaved with the new rows."""
    original = measure(model, example, loaders[1], min_run_time=0.5)
    first = {
        "model": name,
        "method": "original",
        "budget": "–",
        "accuracy": original["accuracy"],
        "flops_fraction": 1.0,
        "params_fraction": 1.0,
        "latency_ms": original["latency_ms"],
        "speedup": 1.0,
    }
    rows = [first]
    for fraction in map(float, args.budgets.split(",")):
        svd_params = None
        for label, (method, settings) in {**STRUCTURED, **SPARSE}.items():
            if label not in wanted:
                continue
            if label in SPARSE:
                if svd_params is None:  # SVD not rerun: take its params from the kept rows
                    svd_params = kept_svd_params(kept, name, fraction)
                if svd_params is None:
                    continue
                budget = Budget(params=min(1.0, svd_params))
            elif label in PARAMS_BUDGET:
                budget = Budget(params=fraction)
            else:
                budget = Budget(flops=fraction)
            try:
                row = run_one(
                    model, label, method, settings, budget, loaders, example, original,
                    args.finetune_epochs,
                )  # fmt: skip
            except Exception as exc:
                traceback.print_exc()
                row = {
                    "method": label,
                    "budget": str(budget),
                    "note": f"failed: {type(exc).__name__}: {exc}"[:200],
                }
            row["model"] = name
            row["target_flops"] = fraction
            if label == "SVD" and "params_fraction" in row:
                svd_params = row["params_fraction"]
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    dense = [r["dense_ms"] for r in rows if "dense_ms" in r]
    if dense:
        first["latency_ms"] = statistics.median(dense)
        first["layouts"] = "median of the rows' interleaved dense timings"
    return rows


def _rerun(row: dict, methods: set, models: set, budgets: set) -> bool:
    """Whether ``row`` is one this run measures again (its method, model and FLOPs target)."""
    return (
        row.get("method") in methods
        and row.get("model") in models
        and row.get("target_flops") in budgets
    )


def kept_svd_params(kept: list[dict], name: str, fraction: float) -> float | None:
    """The params fraction a kept SVD row reached at this FLOPs target (sparse rows match it)."""
    return next(
        (
            r["params_fraction"]
            for r in kept
            if r.get("model") == name
            and r.get("method") == "SVD"
            and r.get("target_flops") == fraction
            and "params_fraction" in r
        ),
        None,
    )


def pareto_plot(rows: list[dict], models: list[str]) -> None:
    """Accuracy vs FLOPs fraction per model, one line per method, to compare.png.

    Rows whose budget was out of reach are left out: every layer then took its cheapest option,
    which says nothing about the method at that budget (the table keeps them, with the note).
    """
    fig, axes = plt.subplots(1, len(models), figsize=(12, 4.5), dpi=120)
    # one colour per method in every panel
    palette = plt.get_cmap("tab10").colors
    colour = {label: palette[i % len(palette)] for i, label in enumerate([*STRUCTURED, *SPARSE])}
    colour["original"] = "k"
    axes = [axes] if not hasattr(axes, "__len__") else axes
    for ax, name in zip(axes, models, strict=True):
        mine = [r for r in rows if r.get("model") == name and "accuracy" in r]
        mine = [r for r in mine if "not reachable" not in r.get("note", "")]
        for label in sorted({r["method"] for r in mine}):
            pts = sorted(
                (r for r in mine if r["method"] == label), key=lambda r: r["flops_fraction"]
            )
            ax.plot(
                [r["flops_fraction"] for r in pts],
                [100 * r["accuracy"] for r in pts],
                "o-" if label != "original" else "*",
                color=colour.get(label),
                label=label,
                markersize=9 if label == "original" else 5,
            )
        ax.set_title(f"{name} on Fashion-MNIST")
        ax.set_xlabel("FLOPs fraction (nonzero-only for sparse methods)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "compare.png")
    plt.close(fig)


def update_readme(rows: list[dict]) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README has no {START} … {END} block")
    shown = [
        {**r, "timed": "interleaved" if "dense_ms" in r else "dense once"}
        for r in rows
        if "accuracy" in r
    ]
    for r in shown:
        if r["method"] == "original":
            r["timed"] = "–"
    table = markdown_table(
        ["model", "method", "budget", "accuracy", "flops_fraction", "params_fraction", "speedup",
         "timed"],
        shown,
    )  # fmt: skip
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    note = (
        "Generated by `python bench/compare.py --update-readme` from "
        "`bench/results/compare.json`; do not edit by hand."
    )
    README.write_text(f"{head}{START}\n{note}\n\n{table}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit-train", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3, help="base training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--models", default="small_cnn,resnet20")
    parser.add_argument("--budgets", default="0.5,0.25")
    parser.add_argument("--methods", default=",".join([*STRUCTURED, *SPARSE]))
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument(
        "--readme-only", action="store_true", help="only redraw the plot and the README table"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other methods' rows of bench/results/compare.json (rerun some methods)",
    )
    args = parser.parse_args()
    if args.readme_only:
        rows = json.loads((RESULTS / "compare.json").read_text())["rows"]
        pareto_plot(rows, args.models.split(","))
        update_readme(rows)
        return
    torch.manual_seed(0)
    _, train, test = fashion_loaders(args.limit_train)
    example = torch.stack([test.dataset[i][0] for i in range(LATENCY_BATCH)])
    wanted = args.methods.split(",")
    rows: list[dict] = []
    kept: list[dict] = []
    previous: dict = {}
    if args.merge and (RESULTS / "compare.json").is_file():
        previous = json.loads((RESULTS / "compare.json").read_text())
        rerun = (set(wanted), set(args.models.split(",")), set(map(float, args.budgets.split(","))))
        kept = [r for r in previous["rows"] if not _rerun(r, *rerun)]
    started = time.perf_counter()
    for name in args.models.split(","):
        model, _ = trained_model(
            name, train, test, epochs=args.epochs, tag=f"fmnist-{args.limit_train}-e{args.epochs}"
        )
        # every speedup is a ratio to the dense model timed in the same run: a kept row keeps
        # its own run's ratio, the new rows are timed interleaved with this run's dense model
        kept = [r for r in kept if not (r.get("model") == name and r.get("method") == "original")]
        rows += run_model(name, model, args, wanted, kept, (train, test), example)
    seconds = time.perf_counter() - started
    if kept:
        labels = ["original", *STRUCTURED, *SPARSE]
        models = args.models.split(",")

        def place(row: dict) -> tuple:
            model = row.get("model")
            return (
                models.index(model) if model in models else len(models),
                -float(row.get("target_flops") or 2.0),  # the original first, then 0.5, 0.25
                labels.index(row["method"]) if row.get("method") in labels else len(labels),
            )

        rows = sorted(kept + rows, key=place)
    pareto_plot(rows, args.models.split(","))
    notes = [
        f"Fashion-MNIST, base models trained {args.epochs} epochs on a {args.limit_train}-image "
        f"training subset; every method then gets {args.finetune_epochs} epoch(s) (fine-tune, or "
        "training with its regularizer / pruning schedule); full 10k test set. Sparse methods are "
        "matched to the parameter fraction SVD reached at the same FLOPs target; their FLOPs are "
        "nonzero-only (dense kernels run them at full cost: see their latency). SVD training "
        f"alone gets {POST_FINALIZE_EPOCHS['SVD training']} more epoch(s): the low-rank fine-tune "
        "after its energy pruning (its third "
        "stage); accuracy_after_finalize is its accuracy before that epoch. TT factorizes Linear "
        "layers only, so it gets the fraction as a parameter budget (params=f); where even that "
        "is out of reach, the note says so and every Linear takes its cheapest TT. Planned for "
        f"batch {LATENCY_BATCH}, {DEPLOYMENT.threads} thread (memory_format auto, FLOPs/params "
        "budgets met with the planner's default objective); speedup = dense ms / compressed ms, "
        "both timed interleaved in one run, each in its faster layout (layouts: dense/compressed)"
        "; the original row's latency_ms is the median of its model's dense timings. The "
        "machine is shared: see the load average below.",
        (
            f"Whole run: {previous['seconds'] / 60:.1f} min; then {', '.join(wanted)} rerun "
            f"alone in {seconds / 60:.1f} min (--merge), the other rows kept."
            if kept and "seconds" in previous
            else f"Whole run: {seconds / 60:.1f} min."
        ),
    ]
    write_results(
        "compare",
        {
            "rows": rows,
            "machine": facts(),
            "notes": notes,
            "seconds": previous.get("seconds", seconds) if kept else seconds,
            "rerun": {"methods": wanted, "seconds": seconds} if kept else None,
        },
        [("All methods", COLUMNS, rows)],
        notes,
    )
    if args.update_readme:
        update_readme(rows)
    print("\n".join(notes))


if __name__ == "__main__":
    main()
