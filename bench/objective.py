"""Least time vs least error under a FLOPs budget: the planner's objectives, measured (issue 17).

Under ``flops=0.5`` the planner meets the budget over measured options for an objective
(``Budget.objective``, ``plan(objective=...)``): ``latency`` (least predicted time),
``balanced`` (least error within a slack of the fastest) or ``error``. This measures, for svd and
tucker at ``flops=0.5``:

- resnet20 on Fashion-MNIST with bench/compare.py's setup (its cached base model, batch 64,
  1 thread, memory_format auto, one fine-tune epoch at lr 0.01): accuracy before
  and after the epoch, the plan's predicted fraction and Σ error², the measured speedup (dense
  and compressed timed interleaved, ``latency_check``); plus, planned only from the same timing
  cache, the balanced rule's slack swept (predicted ms and Σ error² per tolerance);
- a ResNet-18-style model at 224×224, batch 1, 1 thread, NCHW, BatchNorm folded (as
  ``bench/latency.py --quick``): the measured speedup of each objective's plan.

    python bench/objective.py [--name objective] [--steps 40] [--r18-methods svd] [--skip-resnet20]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import facts, fashion_loaders, trained_model, write_results
from compare import DEPLOYMENT, LATENCY_BATCH
from latency import _time_pair
from tensorslim.analysis.deployment import Deployment
from tensorslim.analysis.timing import LatencyCache, load_average
from tensorslim.fold import fold_batchnorm
from tensorslim.models import create_model
from tensorslim.pipeline import compress_model, measure
from tensorslim.plan import apply, plan
from tensorslim.planner import choose_measured
from tensorslim.rank.budget import Budget

OBJECTIVES = ("latency", "balanced", "error")
R20_METHODS = {"svd": {"scheme": "best"}, "tucker": {"rank_rule": "budget"}}  # compare.py's
R18_METHODS = {"svd": {"scheme": "channel"}, "tucker": {}}  # bench/latency.py's
SWEEP = (0.0, 0.02, 0.05, 0.1, 0.2, math.inf)  # balanced slack, × the dense timed layers' ms
COLUMNS = [
    "model", "method", "objective", "accuracy_before_ft", "accuracy", "speedup", "predicted",
    "error_sq", "flops", "params", "compressed", "load",
]  # fmt: skip
SWEEP_COLUMNS = ["model", "method", "tolerance", "layer_sum_ms", "error_sq", "flops"]


def resnet20_rows(limit_train: int, steps: int | None, save) -> tuple[list[dict], list[dict]]:
    """compare.py's resnet20 at flops=0.5 per objective, fine-tuned (at most ``steps`` steps);
    and the slack sweep. ``save(rows, sweep)`` after every row."""
    torch.manual_seed(0)
    _, train, test = fashion_loaders(limit_train)
    model, _ = trained_model("resnet20", train, test, epochs=3, tag=f"fmnist-{limit_train}-e3")
    example = torch.stack([test.dataset[i][0] for i in range(LATENCY_BATCH)])
    original = measure(model, example, test, latency=False)
    rows, sweep = [], []
    for method, settings in R20_METHODS.items():
        cache = LatencyCache()  # one per method: every objective plans from the same timings
        for objective in OBJECTIVES:
            _, result = compress_model(
                model, method=method, budget=Budget(flops=0.5, objective=objective),
                settings=settings, train_loader=train, test_loader=test, example_batch=example,
                finetune_epochs=1, lr=0.01, progress=False, measure_original=original,
                latency_cache=cache, deployment=DEPLOYMENT, max_steps_per_epoch=steps,
            )  # fmt: skip
            check = result.get("latency_check") or {}
            rows.append(
                {
                    "model": "resnet20",
                    "method": method,
                    "objective": objective,
                    "accuracy_before_ft": result["accuracy_before_finetune"],
                    "accuracy": result["compressed"]["accuracy"],
                    "speedup": check.get("speedup"),
                    "predicted": check.get("predicted_fraction"),
                    "error_sq": _error_sq(result["layers"]),
                    "flops": result["plan_fractions"]["flops"],
                    "params": result["plan_fractions"]["params"],
                    "compressed": sum(1 for r in result["layers"] if r["method"] != "dense"),
                    "load": load_average(),
                }
            )
            print(rows[-1], flush=True)
            save(rows, sweep)
        sweep += slack_sweep("resnet20", model, method, settings, example[:1], cache)
        save(rows, sweep)
    return rows, sweep


def _error_sq(layers: list[dict[str, Any]]) -> float:
    return sum(float(r.get("error") or 0.0) ** 2 for r in layers if r["method"] != "dense")


def slack_sweep(
    name: str, model, method: str, settings: dict, example, cache: LatencyCache
) -> list[dict]:
    """Balanced plans at every slack of :data:`SWEEP`, from ``cache``'s timings (plans only).

    The slack is a module constant of the planner (its default), set here for the sweep and
    restored after."""
    saved = choose_measured.BALANCED_TOLERANCE
    rows = []
    try:
        for tolerance in SWEEP:
            choose_measured.BALANCED_TOLERANCE = tolerance
            p = plan(
                model, method, "flops=0.5,objective=balanced", example,
                deployment=DEPLOYMENT, latency_cache=cache, **settings,
            )  # fmt: skip
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "tolerance": tolerance,
                    "layer_sum_ms": p.latency["layer_sum_ms"],
                    "error_sq": p.latency["error_sq"],
                    "flops": p.fractions["flops"],
                }
            )
            print(rows[-1], flush=True)
    finally:
        choose_measured.BALANCED_TOLERANCE = saved
    return rows


def resnet18_rows(methods: list[str]) -> list[dict]:
    """ResNet-18 b1 NCHW 1 thread at flops=0.5 per objective: measured speedup (interleaved)."""
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=3, num_classes=1000).eval()
    example = torch.randn(1, 3, 224, 224)
    where = Deployment(batch=1, threads=1, memory_format="nchw")
    dense = fold_batchnorm(model)[0].eval()
    rows = []
    for method in methods:
        settings = R18_METHODS[method]
        cache = LatencyCache()
        for objective in OBJECTIVES:
            p = plan(
                model, method, Budget(flops=0.5, objective=objective), example,
                deployment=where, latency_cache=cache, fold_bn=True, **settings,
            )  # fmt: skip
            small = apply(model, p)
            timed, _ = _time_pair(dense, small, p.latency, where, example, threads=1)
            rows.append(
                {
                    "model": "resnet18",
                    "method": method,
                    "objective": objective,
                    "speedup": timed["dense"].ms / timed["small"].ms,
                    "predicted": p.latency["predicted_fraction"],
                    "error_sq": p.latency["error_sq"],
                    "flops": p.fractions["flops"],
                    "params": p.fractions["params"],
                    "compressed": len(p.compressed_layers),
                    "load": load_average(),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="objective")
    parser.add_argument("--limit-train", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=None, help="cap the fine-tune epoch")
    parser.add_argument("--r18-methods", default="svd,tucker", help="'' skips ResNet-18")
    parser.add_argument("--skip-resnet20", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    r18 = resnet18_rows([m for m in args.r18_methods.split(",") if m])

    def save(rows: list[dict], sweep: list[dict]) -> None:
        notes = [
            "flops=0.5 per objective. resnet20: bench/compare.py's base model, batch 64, 1 "
            "thread, memory_format auto, one fine-tune epoch at lr 0.01 on 20k Fashion-MNIST "
            f"images{f' capped at {args.steps} steps' if args.steps else ''}; speedup = dense / "
            "compressed timed interleaved (latency_check). resnet18: 224×224, batch 1, 1 "
            "thread, NCHW, BatchNorm folded, no accuracy (random weights). predicted = the "
            "plan's predicted latency fraction; error_sq = Σ over compressed layers of the "
            "weight error².",
            "Slack sweep: resnet20 balanced plans from the same timings with the slack set to "
            "tolerance × the dense timed layers' ms (0: least time; inf: least error).",
            f"Run: {(time.perf_counter() - started) / 60:.1f} min on the shared machine "
            "(see the load column).",
        ]
        all_rows = r18 + rows
        write_results(
            args.name,
            {"rows": all_rows, "sweep": sweep, "machine": facts(), "notes": notes},
            [("Objectives at flops=0.5", COLUMNS, all_rows), ("Balanced slack", SWEEP_COLUMNS,
                                                              sweep)],
            notes,
        )  # fmt: skip

    save([], [])
    if not args.skip_resnet20:
        resnet20_rows(args.limit_train, args.steps, save)


if __name__ == "__main__":
    main()
