"""GMP vs RigL vs RPG over several seeds at high sparsity (issue: RPG).

bench/pruning.py runs each (method, sparsity) once, with seed 0; at 95 % sparsity its GMP, RigL
and RPG accuracies lie within 0.1 point of each other, less than the spread one seed to the next.
This script repeats the same runs (same base model, schedule, steps and settings as
bench/pruning.py's defaults) for several seeds — each seed fixes the initial RNG and the batch
order, shared by the three methods — and reports mean ± standard deviation of accuracy and of
the average δ-rank, plus how often RPG wins within a seed. "RPG one-shot" prunes to the
target at step 0 as RigL does (then regrows with the rank loss until RPG's schedule end), to
tell the rank loss's effect from the gradual schedule's; "RigL, regrowth ends at 25 %" stops
RigL's mask changes where GMP's and RPG's pruning ends (their default). "RPG, paper preset" is
``preset="paper"`` (the official code's exponential density, ΔT = 100 steps, pruning until 90 %,
one global ranking over every conv and linear layer); "GMP, paper schedule" is the official code
with α = λ = 0 (its GMP baseline: the same schedule without regrowth or rank loss). Writes
bench/results/pruning_seeds.{json,md}.

    python bench/pruning_seeds.py [--seeds 0,1,2,3] [--sparsities 0.95,0.98] [--workers 2]
        [--variants gmp,rigl,rpg,rpg-paper,gmp-paper]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, facts, fashion_loaders, trained_model, write_results
from pruning import METHODS, NAMES, prune_run
from tensorslim.methods.pruning import RPG_PAPER

# label → (method, settings). "RPG one-shot" is RPG with RigL's constant schedule (prune to the
# target at once, then prune-and-regrow at constant sparsity until RPG's ``end``): it separates
# what the rank loss does from what the gradual schedule does.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{m: (m, {}) for m in METHODS},
    "rpg-oneshot": ("rpg", {"schedule": "constant"}),
    # RigL with its drop/regrow ending where GMP's and RPG's pruning ends, so that all three
    # stop changing the mask at the same step
    "rigl-end": ("rigl", {"end": 0.25}),
    # the authors' settings (huawei-noah/Efficient-Computing, Pruning/RPG)
    "rpg-paper": ("rpg", {"preset": "paper"}),
    "gmp-paper": ("gmp", {**RPG_PAPER.settings, "drop_fraction": 0.0}),
}
LABELS = {
    **NAMES,
    "rpg-oneshot": "RPG one-shot",
    "rigl-end": "RigL, regrowth ends at 25 %",
    "rpg-paper": "RPG, paper preset",
    "gmp-paper": "GMP, paper schedule",
}
_STATE: dict[str, Any] = {}


def _setup(limit_train: int, base_epochs: int) -> None:
    """Per worker: one thread, the cached base model and the loaders."""
    torch.set_num_threads(1)
    _, train, test = fashion_loaders(limit_train)
    base, _ = trained_model(
        "small_cnn", train, test, epochs=base_epochs, tag=f"fmnist-{limit_train}-e{base_epochs}"
    )
    example = torch.stack([test.dataset[i][0] for i in range(64)])
    _STATE.update(base=base, train=train, test=test, example=example)


def _run(task: tuple[str, float, int, int, int, float]) -> dict[str, Any]:
    label, sparsity, seed, epochs, steps, lr = task
    method, settings = VARIANTS[label]
    _, row = prune_run(
        _STATE["base"],
        method,
        sparsity,
        _STATE["train"],
        _STATE["test"],
        _STATE["example"],
        epochs=epochs,
        steps=steps,
        lr=lr,
        settings=settings,
        seed=seed,
    )
    keep = ("accuracy", "sparsity", "avg_delta_rank", "rank_loss_share", "train_seconds")
    return {"method": label, "sparsity_target": sparsity, "seed": seed} | {k: row[k] for k in keep}


def summarize(runs: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Per (sparsity, method): mean ± sd; per sparsity: RPG's wins within a seed."""
    table, wins = [], []
    for sparsity in sorted({r["sparsity_target"] for r in runs}):
        at = [r for r in runs if r["sparsity_target"] == sparsity]
        for method in VARIANTS:
            mine = [r for r in at if r["method"] == method]
            if not mine:
                continue
            acc = [r["accuracy"] for r in mine]
            rank = [r["avg_delta_rank"] for r in mine]
            table.append(
                {
                    "sparsity": f"{sparsity:.0%}",
                    "method": LABELS[method],
                    "seeds": len(mine),
                    "accuracy_mean": statistics.fmean(acc),
                    "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "delta_rank_mean": statistics.fmean(rank),
                    "delta_rank_sd": statistics.stdev(rank) if len(rank) > 1 else 0.0,
                }
            )
        by_seed: dict[int, dict[str, float]] = {}
        for r in at:
            by_seed.setdefault(r["seed"], {})[r["method"]] = r["accuracy"]
        comparisons = (
            ("rpg", "gmp"),
            ("rpg", "rigl"),
            ("rpg", "rigl-end"),
            ("rpg-oneshot", "rigl"),
            ("rpg-paper", "gmp-paper"),
            ("rpg-paper", "gmp"),
            ("rpg-paper", "rigl"),
            ("rpg-paper", "rpg"),
        )
        for mine, other in comparisons:
            pairs = [a for a in by_seed.values() if mine in a and other in a]
            if not pairs:
                continue
            wins.append(
                {
                    "sparsity": f"{sparsity:.0%}",
                    "comparison": f"{LABELS[mine]} ≥ {LABELS[other]}",
                    "seeds_won": sum(a[mine] >= a[other] for a in pairs),
                    "seeds": len(pairs),
                    "mean_difference_points": 100
                    * statistics.fmean(a[mine] - a[other] for a in pairs),
                }
            )
    return table, wins


def _end(method: str) -> float:
    """The default schedule end of ``method`` (fraction of the steps)."""
    from tensorslim.methods.registry import get_method

    return float(get_method(method).end)


def claims(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed claims, under this library's defaults and under the authors' settings.

    Per sparsity: RPG's mean accuracy at or above GMP's and RigL's, and its mean δ-rank above
    GMP's — with the defaults (rpg vs gmp, rigl) and with the paper preset (rpg-paper vs the
    official code's own GMP baseline, gmp-paper, and vs RigL's default).
    """
    rows = []
    arms = (
        ("defaults", "rpg", (("GMP", "gmp"), ("RigL", "rigl"))),
        ("paper preset", "rpg-paper", (("GMP, paper schedule", "gmp-paper"), ("RigL", "rigl"))),
    )
    for sparsity in sorted({r["sparsity_target"] for r in runs}):
        at = [r for r in runs if r["sparsity_target"] == sparsity]
        mean = {
            (m, k): statistics.fmean(r[k] for r in at if r["method"] == m)
            for m in {r["method"] for r in at}
            for k in ("accuracy", "avg_delta_rank")
        }
        seeds = {r["seed"] for r in at}
        for settings, rpg, others in arms:
            if (rpg, "accuracy") not in mean:
                continue
            for name, other in others:
                if (other, "accuracy") not in mean:
                    continue
                won = sum(
                    _value(at, rpg, s, "accuracy") >= _value(at, other, s, "accuracy")
                    for s in seeds
                )
                diff = 100 * (mean[(rpg, "accuracy")] - mean[(other, "accuracy")])
                rows.append(
                    {
                        "sparsity": f"{sparsity:.0%}",
                        "settings": settings,
                        "claim": f"RPG accuracy ≥ {name}",
                        "holds": "yes" if diff >= 0 else "no",
                        "evidence": f"{diff:+.2f} points (mean), {won} of {len(seeds)} seeds",
                    }
                )
            gmp = others[0][1]
            if (gmp, "avg_delta_rank") in mean:
                a, b = mean[(rpg, "avg_delta_rank")], mean[(gmp, "avg_delta_rank")]
                rows.append(
                    {
                        "sparsity": f"{sparsity:.0%}",
                        "settings": settings,
                        "claim": f"RPG δ-rank > {others[0][0]}",
                        "holds": "yes" if a > b else "no",
                        "evidence": f"{a:.1f} vs {b:.1f} (mean)",
                    }
                )
    return rows


def _value(runs: list[dict], method: str, seed: int, key: str) -> float:
    return next(r[key] for r in runs if r["method"] == method and r["seed"] == seed)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--sparsities", default="0.95,0.98")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit-train", type=int, default=20000)
    parser.add_argument("--base-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="Rewrite the report from bench/results/pruning_seeds.json (same arguments).",
    )
    args = parser.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant {unknown[0]} (known: {', '.join(VARIANTS)})")
    return args


def main() -> None:
    args = parse_args()
    if args.summarize_only:
        payload = json.loads((RESULTS / "pruning_seeds.json").read_text())
        report(payload["runs"], args, payload["machine"], payload["seconds"])
        return
    started = time.perf_counter()
    machine = facts()
    _setup(args.limit_train, args.base_epochs)  # trains and caches the base once, if needed
    tasks = [
        (method, float(sparsity), int(seed), args.epochs, args.steps_per_epoch, args.lr)
        for sparsity in args.sparsities.split(",")
        for seed in args.seeds.split(",")
        for method in args.variants.split(",")
    ]
    runs = []
    with ProcessPoolExecutor(
        args.workers, initializer=_setup, initargs=(args.limit_train, args.base_epochs)
    ) as pool:
        for run in pool.map(_run, tasks):
            print(run, flush=True)
            runs.append(run)
    machine["loadavg_end"] = facts()["loadavg"]
    report(runs, args, machine, time.perf_counter() - started)


def report(runs: list[dict], args: argparse.Namespace, machine: dict, seconds: float) -> None:
    """bench/results/pruning_seeds.{json,md}: the table, the seed-by-seed wins, the claims."""
    table, wins = summarize(runs)
    claim_rows = claims(runs)
    notes = [
        "small_cnn on Fashion-MNIST, the settings of bench/pruning.py (base 3 epochs on 20000 "
        f"images; {args.epochs} × {args.steps_per_epoch} pruning steps, SGD lr {args.lr}; GMP "
        f"and RPG prune until {_end('gmp'):.0%} / {_end('rpg'):.0%} of the steps, RigL "
        f"drops/regrows until {_end('rigl'):.0%}; the paper preset prunes until "
        f"{RPG_PAPER.settings['end']:.0%}, updating every {RPG_PAPER.settings['interval']} "
        "steps, with one global ranking that includes the first conv); on mask-update steps "
        "RigL and RPG do not step the optimizer (official); "
        f"seeds {args.seeds} (each fixes the initial RNG and the batch order, shared by the "
        "methods); full 10 000-image test set, whose standard error at 90 % accuracy is "
        "about 0.3 points.",
        f"{len(runs)} runs in {seconds / 60:.1f} min ({args.workers} processes, 1 thread each; "
        f"load average {machine.get('loadavg')} at the start, {machine.get('loadavg_end')} at "
        "the end, on a machine shared with other jobs).",
    ]
    if any(r["method"] == "rpg-paper" for r in runs):
        steps = args.epochs * args.steps_per_epoch
        notes.append(
            f"Reading the paper preset: its ΔT = {RPG_PAPER.settings['interval']} steps is fixed "
            f"in steps, so a {steps}-step run makes only a handful of mask updates and the "
            "exponential density falls in a few large jumps (the last near the end of pruning, "
            "with little training left to recover), over a ranking that may also empty the small "
            "first conv. The authors' runs had thousands of updates (100 ImageNet epochs); these "
            "numbers show the preset outside that regime, not the method at its best. Under the "
            "same schedule the rank loss and regrowth still beat plain GMP (the official code "
            "with α = λ = 0)."
        )
    for w in wins:
        notes.append(
            f"{w['sparsity']}: {w['comparison']} in {w['seeds_won']} of {w['seeds']} seeds, "
            f"mean difference {w['mean_difference_points']:+.2f} points."
        )
    payload = {
        "runs": runs,
        "table": table,
        "wins": wins,
        "claims": claim_rows,
        "machine": machine,
        "seconds": seconds,
        "args": vars(args),
    }
    write_results(
        "pruning_seeds",
        payload,
        [
            ("Claims: defaults and the authors' settings", list(CLAIM_COLUMNS), claim_rows),
            (
                "Mean ± standard deviation over seeds",
                [
                    "sparsity",
                    "method",
                    "seeds",
                    "accuracy_mean",
                    "accuracy_sd",
                    "delta_rank_mean",
                    "delta_rank_sd",
                ],
                table,
            ),
            (
                "RPG against each baseline, seed by seed",
                ["sparsity", "comparison", "seeds_won", "seeds", "mean_difference_points"],
                wins,
            ),
            (
                "Runs",
                ["sparsity_target", "method", "seed", "accuracy", "sparsity", "avg_delta_rank"],
                runs,
            ),
        ],
        notes,
    )
    print("\n".join(notes))


CLAIM_COLUMNS = ("sparsity", "settings", "claim", "holds", "evidence")


if __name__ == "__main__":
    main()
