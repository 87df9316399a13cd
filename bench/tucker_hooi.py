"""Tucker-2 from HOSVD alone vs HOSVD + HOOI (TensorLy's partial_tucker defaults: ≤ 100 sweeps,
tolerance 1e-4), at the same ranks, on a trained small_cnn (Fashion-MNIST).

Both arms plan once (the ranks come from the HOSVD error table, so they are identical) and differ
only in ``hooi_iters``/``hooi_tol``. Reported per (FLOPs budget, arm): the mean relative weight
error of the decomposed convolutions (measured on the returned model, i.e. after the short
fine-tune, which moves it by well under the HOSVD–HOOI gap), the decomposition time, accuracy
after BatchNorm recalibration (before fine-tuning) and after a short fine-tune, over several
fine-tune seeds,
interleaved (HOSVD, HOOI, HOSVD, ...). Decides the ``tucker`` default (``hooi_iters``); the
``paper`` preset uses HOOI whatever this says. Writes bench/results/tucker_hooi.{json,md}.

    python bench/tucker_hooi.py [--seeds 0,1,2] [--budgets 0.5,0.25] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, facts, fashion_loaders, trained_model, write_results
from tensorslim.layers.tucker import TuckerConv2d
from tensorslim.pipeline import compress_model
from tensorslim.rank.budget import Budget

ARMS: dict[str, dict[str, Any]] = {
    "HOSVD": {"hooi_iters": 0},
    "HOSVD + HOOI": {"hooi_iters": 100, "hooi_tol": 1e-4},
}


def weight_errors(original: nn.Module, small: nn.Module) -> list[float]:
    """‖W − Ŵ‖/‖W‖ of every Tucker layer of ``small`` against the same layer of ``original``."""
    dense = dict(original.named_modules())
    errors = []
    for name, module in small.named_modules():
        if isinstance(module, TuckerConv2d):
            w = dense[name].weight.detach().double()
            approx = module.to_dense().weight.detach().double()
            errors.append(float((w - approx).norm() / w.norm()))
    return errors


def one_run(base, train, test, example, budget: float, arm: str, seed: int, steps: int) -> dict:
    started = time.perf_counter()
    small, result = compress_model(
        base,
        method="tucker",
        budget=Budget(flops=budget),
        settings=dict(ARMS[arm]),
        train_loader=train,
        test_loader=test,
        example_batch=example,
        finetune_epochs=1,
        max_steps_per_epoch=steps,
        bn_recalibration_batches=10,
        latency=False,
        progress=False,
        seed=seed,
    )
    errors = weight_errors(base, small)
    return {
        "budget": budget,
        "arm": arm,
        "seed": seed,
        "mean_weight_error": statistics.fmean(errors),
        "max_weight_error": max(errors),
        "decompose_s": result["seconds"]["decompose"],
        "accuracy_before_finetune": result["accuracy_before_finetune"],
        "accuracy": result["compressed"]["accuracy"],
        "flops_fraction": result["flops_fraction"],
        "seconds": time.perf_counter() - started,
    }


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for budget in sorted({r["budget"] for r in runs}, reverse=True):
        for arm in ARMS:
            mine = [r for r in runs if r["budget"] == budget and r["arm"] == arm]
            acc = [r["accuracy"] for r in mine]
            rows.append(
                {
                    "budget": f"flops={budget:g}",
                    "arm": arm,
                    "seeds": len(mine),
                    "mean_weight_error": mine[0]["mean_weight_error"],
                    "decompose_s_median": statistics.median(r["decompose_s"] for r in mine),
                    "accuracy_before_finetune": statistics.fmean(
                        r["accuracy_before_finetune"] for r in mine
                    ),
                    "accuracy_mean": statistics.fmean(acc),
                    "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="0.5,0.25")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="Rewrite the report from bench/results/tucker_hooi.json (same arguments).",
    )
    args = parser.parse_args()
    if args.summarize_only:
        payload = json.loads((RESULTS / "tucker_hooi.json").read_text())
        report(payload["runs"], args, payload["machine"], payload["seconds"])
        return
    torch.set_num_threads(1)
    machine = facts()
    started = time.perf_counter()
    _, train, test = fashion_loaders(20000)
    base, _ = trained_model("small_cnn", train, test, epochs=3, tag="fmnist-20000-e3")
    example = torch.stack([test.dataset[i][0] for i in range(64)])
    runs = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm in ARMS:  # interleaved: the machine's load drifts alike for both arms
                run = one_run(base, train, test, example, budget, arm, seed, args.steps)
                print(run, flush=True)
                runs.append(run)
    machine["loadavg_end"] = facts()["loadavg"]
    report(runs, args, machine, time.perf_counter() - started)


def report(runs: list[dict], args: argparse.Namespace, machine: dict, seconds: float) -> None:
    """bench/results/tucker_hooi.{json,md}."""
    table = summarize(runs)
    notes = [
        "small_cnn on Fashion-MNIST (base: 3 epochs on 20 000 images, shared with "
        "bench/pruning.py); Tucker-2 at the same ranks in both arms (planned from HOSVD "
        f"errors); BatchNorm recalibrated on 10 batches; fine-tune 1 × {args.steps} steps, SGD "
        f"lr 0.01; seeds {args.seeds} (fine-tune order); full 10 000-image test set (standard "
        "error ≈ 0.3 points at 90 %).",
        f"{len(runs)} runs in {seconds / 60:.1f} min on one thread; load average "
        f"{machine.get('loadavg')} at the start, {machine.get('loadavg_end')} at the end (a "
        "machine shared with other jobs: times are indicative; decompose_s includes planning).",
    ]
    write_results(
        "tucker_hooi",
        {"runs": runs, "table": table, "machine": machine, "seconds": seconds},
        [
            (
                "HOSVD vs HOSVD + HOOI",
                list(table[0]),
                table,
            ),
            ("Runs", list(runs[0]), runs),
        ],
        notes,
    )
    print("\n".join(notes))


if __name__ == "__main__":
    main()
