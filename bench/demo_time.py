"""Wall time of the README's first command, ``tensorslim demo`` (and ``--quick``).

Runs the demo as a user does — a fresh process, ``python -m tensorslim demo [--quick]`` into a
temporary directory — and records its wall time, the CPU time of the process, the load average
before and after (other work on a shared machine stretches the wall time), and the time each
configuration took (from the run's own configs/*.json). Modes are interleaved when repeated.

    python bench/demo_time.py [--repeat 1] [--modes default,quick]

Writes bench/results/demo_time.json and demo_time.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import facts, write_results

REPO = Path(__file__).resolve().parents[1]
FLAGS = {"default": [], "quick": ["--quick"], "full": ["--full"]}
TARGET_SECONDS = {"default": 300.0}  # issue 19: under 5 minutes on an idle 2-core machine


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_demo_once(mode: str) -> dict[str, Any]:
    """One demo in a fresh process; its wall and CPU time, load and per-configuration times."""
    with tempfile.TemporaryDirectory(prefix="demo-time-") as tmp:
        out = Path(tmp) / "demo"
        command = [sys.executable, "-m", "tensorslim", "demo", *FLAGS[mode]]
        command += ["--out", str(out), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        load_before = os.getloadavg()
        cpu_before = _children_cpu()
        started = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"demo {mode} failed:\n{proc.stderr[-3000:]}")
        results = json.loads((out / "results.json").read_text())
        configs = [json.loads(p.read_text()) for p in sorted((out / "configs").glob("*.json"))]
    base = results.get("demo", {}).get("base_history", [])
    return {
        "mode": mode,
        "wall_seconds": wall,
        "cpu_seconds": _children_cpu() - cpu_before,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "base_training_seconds": sum(h.get("seconds", 0.0) for h in base),
        "configurations": [
            {
                "config": c["config"],
                "seconds": None if "skipped" in c else c["seconds"]["total"],
                "accuracy": None if "skipped" in c else c["compressed"]["accuracy"],
                "flops_fraction": None if "skipped" in c else c["flops_fraction"],
                "skipped": c.get("skipped"),
            }
            for c in configs
        ],
        "original_accuracy": results["original"]["accuracy"],
    }


def summarise(runs: list[dict[str, Any]], modes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        walls = [r["wall_seconds"] for r in mine]
        rows.append(
            {
                "mode": mode,
                "runs": len(mine),
                "wall_s_median": median(walls),
                "wall_s_max": max(walls),
                "cpu_s_median": median(r["cpu_seconds"] for r in mine),
                "configurations": len(mine[0]["configurations"]),
                "load_1min_before": mine[0]["loadavg_before"][0],
                "load_1min_after": mine[-1]["loadavg_after"][0],
                "target_s": TARGET_SECONDS.get(mode),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="Runs per mode (interleaved).")
    parser.add_argument(
        "--modes", default="default,quick", help="Comma-separated: default, quick, full."
    )
    parser.add_argument("--name", default="demo_time", help="Result file name under results/.")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(FLAGS))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}: use {', '.join(FLAGS)}")
    machine = facts()
    runs = []
    for _ in range(args.repeat):
        for mode in modes:
            print(f"demo {mode} ...", flush=True)
            runs.append(run_demo_once(mode))
            print(f"  {runs[-1]['wall_seconds']:.1f} s wall", flush=True)
    summary = summarise(runs, modes)
    per_config = [{"mode": r["mode"], **c} for r in runs[: len(modes)] for c in r["configurations"]]
    notes = [
        "Wall time of `tensorslim demo` (and `--quick`) run as a user runs it: a fresh "
        "process, `python -m tensorslim demo`, into an empty directory (base training "
        "included). cpu_s is the process's user+system CPU time; on a shared machine the wall "
        "time grows with the load average recorded before and after each run.",
        f"Load average (1, 5, 15 min) at the start: {machine['loadavg']}.",
    ]
    write_results(
        args.name,
        {"machine": machine, "summary": summary, "runs": runs},
        [
            ("Wall time per mode", list(summary[0]), summary),
            (
                "Configurations (first run of each mode)",
                ["mode", "config", "seconds", "accuracy", "flops_fraction", "skipped"],
                per_config,
            ),
        ],
        notes,
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
