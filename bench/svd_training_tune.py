"""Tune SVD training's 0.5-FLOPs pipeline on a validation split, never on the test set.

bench/svd_training.py and bench/svd_training_seeds.py chose λs and λo by pilot runs scored on the
test set. This script scores candidate settings on 5 000 held-out *training* images instead
(disjoint from the 20 000 the models train on; the test set is not loaded), for seeds other than
the ones the headline reports. Each variant changes a few settings against the base setting.
Every gap is to the better of two dense arms trained for the same epochs with the same split: one
at the base learning rates, one at the variant's (a rate that suits the pipeline but hurts the
dense model must not lower the bar). After the shared pretraining every arm of a seed sees the
same batches in the same order, so two variants differ by their settings, not by batch order.

    python bench/svd_training_tune.py [--seeds 10,11] [--workers 2] [--variants A,B] [--merge]

``--merge`` keeps the runs of variants (and seeds) this run does not repeat. ``--name`` picks
the result files (another training-set size is another experiment, not a merge).

Writes bench/results/NAME.{json,md} (default svd_training_tune).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import facts, map_seeds, paired_loader, pretrained_resnet20, write_results
from tensorslim.analysis.flops import count_flops
from tensorslim.data import DataBundle, load_dataset
from tensorslim.train.loop import evaluate, fit
from tensorslim.train.svd_pipeline import svd_train_pipeline

TARGET = 0.5
EXCLUDE = ["fc"]
VALIDATION_SIZE = 5000
RESULTS = Path(__file__).resolve().parent / "results"

# One change each against "base"; keys of BASE they override.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "λs 1": {"lambda_s": 1.0},
    "λo 0": {"lambda_o": 0.0},
    "no λo in fine-tune": {"ft_orthogonality": False},
    "fine-tune lr 0.03": {"lr_ft": 0.03},
    "split 1 + 2": {"svd_epochs": 1, "ft_epochs": 2},
    "split 2 + 2": {"ft_epochs": 2},
    "split 2 + 2 + λs 0.1": {"ft_epochs": 2, "lambda_s": 0.1},
    "split 2 + 2 + gate 0.01": {"ft_epochs": 2, "gate": 0.01},
    "no λo in fine-tune + λs 0.1": {"ft_orthogonality": False, "lambda_s": 0.1},
    "no λo in fine-tune + λs 0.03": {"ft_orthogonality": False, "lambda_s": 0.03},
    "λo 0 + λs 0.1": {"lambda_o": 0.0, "lambda_s": 0.1},
    "no λo in fine-tune + λs 0.1 + gate 0.01": {
        "ft_orthogonality": False,
        "lambda_s": 0.1,
        "gate": 0.01,
    },
    "no λo in fine-tune + fine-tune lr 0.02": {"ft_orthogonality": False, "lr_ft": 0.02},
    "no λo in fine-tune + λs 0.5": {"ft_orthogonality": False, "lambda_s": 0.5},
    "no λo in fine-tune + stage-1 lr 0.02": {"ft_orthogonality": False, "lr": 0.02},
    "no λo in fine-tune + split 2 + 2": {"ft_orthogonality": False, "ft_epochs": 2},
    "no λo in fine-tune + split 3 + 1": {"ft_orthogonality": False, "svd_epochs": 3},
    "no λo in fine-tune + λs 1 + gate 0.01": {
        "ft_orthogonality": False,
        "lambda_s": 1.0,
        "gate": 0.01,
    },
}
BASE: dict[str, Any] = {
    "svd_epochs": 2,
    "ft_epochs": 1,
    "lr": 0.05,
    "lr_ft": 0.01,
    "lambda_s": 0.3,
    "lambda_o": 0.1,
    "ft_orthogonality": True,
    "recal_batches": 5,
    "gate": None,
}


def split_train_validation(train_size: int, seed: int = 0) -> DataBundle:
    """Fashion-MNIST's training set cut into the usual training subset and a validation set.

    The training subset is the one ``load_dataset(limit_train=train_size, seed=0)`` returns (the
    first ``train_size`` of a seeded permutation); validation is the next 5 000 of it.
    """
    full = load_dataset("fashion-mnist", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(full.train), generator=gen)
    train_idx = perm[:train_size].sort().values.tolist()
    val_idx = perm[train_size : train_size + VALIDATION_SIZE].sort().values.tolist()
    return DataBundle(
        train=Subset(full.train, train_idx),
        test=Subset(full.train, val_idx),
        num_classes=full.num_classes,
        input_shape=full.input_shape,
        name=full.name,
    )


def settings(variant: str) -> dict[str, Any]:
    return {**BASE, **VARIANTS[variant]}


def run_seed(task: tuple[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Pretrain once for the seed, then every dense arm and every pipeline variant."""
    seed, cfg = task
    torch.set_num_threads(cfg["threads"])
    bundle = split_train_validation(cfg["train_size"])
    pre, val = pretrained_resnet20(bundle, seed, cfg["pre_epochs"], BASE["lr"])
    x = bundle.train[0][0].unsqueeze(0)
    reference = count_flops(pre, x)

    rows: list[dict[str, Any]] = []
    dense_done: dict[tuple, float] = {}
    for variant in cfg["variants"]:
        s = settings(variant)
        # dense with the variant's split at the base rates and at the variant's rates: the gap
        # is to the better of the two, so a rate that suits the pipeline cannot lower the bar
        schedules = {
            (s["svd_epochs"], s["ft_epochs"], BASE["lr"], BASE["lr_ft"]),
            (s["svd_epochs"], s["ft_epochs"], s["lr"], s["lr_ft"]),
        }
        for key in sorted(schedules - set(dense_done)):
            dense, train = copy.deepcopy(pre), paired_loader(bundle, seed)
            fit(dense, train, epochs=key[0], lr=key[2], progress=False)
            fit(dense, train, epochs=key[1], lr=key[3], progress=False)
            dense_done[key] = evaluate(dense, val)["accuracy"]
            rows.append(
                {"seed": seed, "variant": "dense", "schedule": key, "val_accuracy": dense_done[key]}
            )
        best_dense = max(dense_done[key] for key in schedules)
        started = time.perf_counter()
        model, report = svd_train_pipeline(
            copy.deepcopy(pre),
            paired_loader(bundle, seed),
            None,
            scheme="spatial",
            reg="hoyer",
            lambda_o=s["lambda_o"],
            lambda_s=s["lambda_s"],
            target_flops=TARGET,
            epochs_train=s["svd_epochs"],
            epochs_finetune=s["ft_epochs"],
            lr=s["lr"],
            finetune_lr=s["lr_ft"],
            finetune_orthogonality=s["ft_orthogonality"],
            example_input=x,
            progress=False,
            bn_recalibration_batches=s["recal_batches"],
            budget_gate_energy=s["gate"],
            exclude=EXCLUDE,
        )
        accuracy = evaluate(model, val)["accuracy"]
        rows.append(
            {
                "seed": seed,
                "variant": variant,
                "val_accuracy": accuracy,
                "dense_val_accuracy": best_dense,
                "gap_points": 100 * (accuracy - best_dense),
                "flops_fraction": count_flops(model, x) / reference,
                "energy": report["energy"],
                "seconds": time.perf_counter() - started,
            }
        )
        print(f"seed {seed} {variant}: {accuracy:.4f} (dense {best_dense:.4f})", flush=True)
    return rows


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Per variant: mean gap to its equal-epoch dense arm, and the change against base per seed."""
    base = {r["seed"]: r["gap_points"] for r in runs if r["variant"] == "base"}
    table = []
    for variant in variants:
        if variant == "dense":
            continue
        mine = [r for r in runs if r["variant"] == variant]
        gaps = [r["gap_points"] for r in mine]
        versus = [r["gap_points"] - base[r["seed"]] for r in mine if r["seed"] in base]
        table.append(
            {
                "variant": variant,
                "seeds": len(mine),
                "val_accuracy_mean": statistics.fmean(r["val_accuracy"] for r in mine),
                "mean_gap_points": statistics.fmean(gaps),
                "worst_gap_points": min(gaps),
                "vs_base_points": statistics.fmean(versus) if versus else float("nan"),
                "seeds_better_than_base": sum(v > 0 for v in versus),
                "flops_fraction_mean": statistics.fmean(r["flops_fraction"] for r in mine),
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="10,11")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--pre-epochs", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--merge", action="store_true", help="keep earlier runs not repeated")
    parser.add_argument("--name", default="svd_training_tune", help="result file stem")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    cfg = {"train_size": args.train_size, "pre_epochs": args.pre_epochs, "variants": variants}
    cfg["threads"] = max(1, torch.get_num_threads() // max(1, args.workers))
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke:
        cfg.update(train_size=512, pre_epochs=1, variants=variants[:2])
        seeds = seeds[:1]
    machine = facts()
    started = time.perf_counter()
    runs = map_seeds(run_seed, seeds, cfg, args.workers)
    result = RESULTS / f"{args.name}.json"
    if args.merge and result.is_file():

        def ident(r: dict[str, Any]) -> tuple:
            return r["seed"], r["variant"], tuple(r.get("schedule", ()))

        done = {ident(r) for r in runs}
        earlier = json.loads(result.read_text())["runs"]
        runs = [r for r in earlier if ident(r) not in done] + runs
        cfg["variants"] = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
        seeds = sorted({r["seed"] for r in runs})
    table = summarize(runs, cfg["variants"])
    minutes = (time.perf_counter() - started) / 60
    best = max(table, key=lambda r: r["mean_gap_points"])
    notes = [
        "Paired design: after the seed's pretraining, every arm sees the same batches in the "
        "same order (three earlier rounds, in git history, let the arms continue one shuffling "
        "stream, so their differences mixed settings with batch order).",
        f"resnet20 (1 input channel) on Fashion-MNIST: trained on {cfg['train_size']} training "
        f"images, scored on {VALIDATION_SIZE} other training images (the test set is not used); "
        f"spatial-wise Hoyer pipeline at target {TARGET} FLOPs after {cfg['pre_epochs']} dense "
        f"epochs. Base setting: {BASE}. Seeds {','.join(map(str, seeds))}; "
        f"last run {minutes:.1f} min.",
        f"Best mean gap to the equal-epoch dense arm: {best['variant']} "
        f"({best['mean_gap_points']:+.2f} points; {table[0]['variant']} "
        f"{table[0]['mean_gap_points']:+.2f}).",
    ]
    if args.smoke:
        print("\n".join(notes))
        return
    write_results(
        args.name,
        {
            "runs": runs,
            "table": table,
            "base": BASE,
            "variants": VARIANTS,
            "config": cfg,
            "machine": machine,
        },
        [
            (
                "Variants (validation accuracy; gap to the equal-epoch dense arm, points)",
                list(table[0]),
                table,
            ),
            (
                "Runs",
                [
                    "seed",
                    "variant",
                    "val_accuracy",
                    "dense_val_accuracy",
                    "gap_points",
                    "energy",
                    "schedule",
                ],
                runs,
            ),
        ],
        notes,
    )
    print("\n".join(notes))


if __name__ == "__main__":
    main()
