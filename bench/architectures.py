"""Full-size architectures with random weights: svd plan + apply time, peak memory, and the
fraction of parameters it reaches.

Each (model, method) runs in a fresh process (``--one``), so its peak resident memory
(``ru_maxrss``) is its own: the process imports torch and transformers, records its resident
size, builds the model (seeded random weights, nothing downloaded), plans at ``params=0.5`` of the
whole model and applies the plan. The memory figure is the peak above that baseline, against the
model's own size (parameters and buffers in bytes). "compressible" counts the layers the plan
covers one by one (Linear-like, convs, recurrent and attention layers: entries with a recorded
input); embeddings and norms are not. Targets (issue 15): GPT-2 124M plan + apply < 30 s and
peak < 3× the model's size on 2 cores; every architecture ≤ 0.6 of its compressible parameters.

    python bench/architectures.py [--models gpt2,bert,resnet50,mobilenet_v2,vit] [--methods svd]

Writes bench/results/architectures.json and architectures.md. The machine is shared: the load
average before and after each run is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import facts, write_results

TARGETS = {"gpt2": {"seconds": 30.0, "memory_ratio": 3.0}}
COMPRESSIBLE_TARGET = 0.6
MODELS = ("gpt2", "resnet50", "mobilenet_v2", "bert", "vit")


def build(name: str) -> tuple[Any, Any]:
    """(model, example input) of the full-size configuration ``name``, random weights."""
    import torch

    torch.manual_seed(0)
    if name in ("resnet50", "mobilenet_v2"):
        from tensorslim.models import create_model

        model = create_model(name, in_channels=3, num_classes=1000)
        return model, torch.randn(1, 3, 224, 224)
    import transformers

    if name == "gpt2":  # 124M: the GPT2Config defaults
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        return model, {"input_ids": torch.randint(0, 50257, (1, 128))}
    if name == "bert":  # BERT-base: the BertConfig defaults
        model = transformers.BertModel(transformers.BertConfig())
        return model, {"input_ids": torch.randint(0, 30522, (1, 128))}
    if name == "vit":  # ViT-B/16 at 224: the ViTConfig defaults, 1000 classes
        config = transformers.ViTConfig(num_labels=1000)
        return transformers.ViTForImageClassification(config), {
            "pixel_values": torch.randn(1, 3, 224, 224)
        }
    raise SystemExit(f"unknown model {name!r}: use {', '.join(MODELS)}")


def _rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(name: str, method: str) -> dict[str, Any]:
    """Build, plan and apply in this process; the measurements as a dict."""
    import torch

    import tensorslim as ts
    from tensorslim.analysis.profile import count_params

    torch.set_num_threads(2)
    baseline = _rss_mb()
    model, example = build(name)
    model.eval()
    size_mb = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    # "svd+untimed": the same plan with allow_slower=True, i.e. without the planner's default
    # never-slower check (which times every compressed layer against its dense form)
    base, _, variant = method.partition("+")
    extra = {"allow_slower": True} if variant == "untimed" else {}
    started, cpu_started = time.perf_counter(), _cpu_s()
    plan = ts.plan(model, base, "params=0.5", example, **extra)
    planned = time.perf_counter()
    small = ts.apply(model, plan, inplace=True)
    applied, cpu_applied = time.perf_counter(), _cpu_s()
    covered = [lp for lp in plan.layers if lp.input_shape]
    before = sum(lp.params_before for lp in covered)
    after = sum(lp.params_after for lp in covered)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model": name,
        "method": method,
        "model_params": plan.model_params,
        "model_mb": size_mb / 2**20,
        "params_after": count_params(small),
        "params_fraction": count_params(small) / plan.model_params,
        "flops_fraction": plan.fractions["flops"],
        "compressible_params": before,
        "compressible_fraction": after / max(1, before),
        "layers_compressed": len(plan.compressed_layers),
        "layers_covered": len(covered),
        "plan_s": planned - started,
        "apply_s": applied - planned,
        "plan_apply_s": applied - started,
        # CPU seconds of this process: on a loaded machine the wall time waits for other jobs;
        # on an idle one with 2 threads the wall time is between cpu/2 and cpu
        "plan_apply_cpu_s": cpu_applied - cpu_started,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "peak_over_baseline_mb": peak - baseline,
        "memory_ratio": (peak - baseline) / (size_mb / 2**20),
    }


def run_in_subprocess(name: str, method: str) -> dict[str, Any]:
    load_before = os.getloadavg()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, __file__, "--one", name, method],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        return {"model": name, "method": method, "error": done.stderr.strip().splitlines()[-1]}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["load_before"], row["load_after"] = load_before[0], os.getloadavg()[0]
    return row


def verdicts(row: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for this row (None where no target applies)."""
    if "error" in row:
        return {}
    target = TARGETS.get(row["model"], {})
    out = {"compressible_ok": row["compressible_fraction"] <= COMPRESSIBLE_TARGET}
    if target:
        out["time_ok"] = row["plan_apply_s"] < target["seconds"]
        out["cpu_time_ok"] = row["plan_apply_cpu_s"] < target["seconds"]
        out["memory_ok"] = row["memory_ratio"] < target["memory_ratio"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default="svd,svd+untimed")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"))
    parser.add_argument("--merge", action="store_true", help="keep earlier rows of other pairs")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    machine = facts()
    rows: list[dict[str, Any]] = []
    path = Path(__file__).resolve().parent / "results" / "architectures.json"
    if args.merge and path.exists():  # rows of (model, method) pairs this run does not redo
        wanted = {(n, m) for n in args.models.split(",") for m in args.methods.split(",")}
        old = json.loads(path.read_text())["rows"]
        rows = [r for r in old if (r["model"], r["method"]) not in wanted]
    for name in args.models.split(","):
        for method in args.methods.split(","):
            row = run_in_subprocess(name, method)
            row.update(verdicts(row))
            rows.append(row)
            print(json.dumps(row), flush=True)
            report(machine, rows)  # after every row: a long run keeps what it measured


def report(machine: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write bench/results/architectures.{json,md} for the rows so far."""
    machine = {**machine, "loadavg_after": os.getloadavg()}
    columns = [
        "model",
        "method",
        "model_params",
        "model_mb",
        "params_fraction",
        "flops_fraction",
        "compressible_fraction",
        "plan_s",
        "apply_s",
        "plan_apply_s",
        "plan_apply_cpu_s",
        "peak_over_baseline_mb",
        "memory_ratio",
        "load_before",
        "compressible_ok",
        "time_ok",
        "cpu_time_ok",
        "memory_ok",
    ]
    notes = [
        "Full-size configurations with random weights (nothing downloaded), svd at params=0.5 "
        "of the whole model — `svd` as plan() runs by default (every compressed layer timed "
        "against its dense form: never slower), `svd+untimed` with allow_slower=True (no "
        "timing) — one fresh process per row (peak RSS above the process's resident "
        "size after importing torch/transformers, against the model's bytes).",
        "Targets: GPT-2 124M plan + apply < 30 s and peak < 3× the model's size on 2 cores; "
        f"every architecture ≤ {COMPRESSIBLE_TARGET} of its compressible layers' parameters.",
        "The machine is shared with other jobs (load average per row, ~7 helpers on 2 cores): "
        "wall times are upper bounds; plan_apply_cpu_s is the process's own CPU time.",
    ]
    write_results(
        "architectures",
        {"machine": machine, "rows": rows},
        [("plan + apply, full-size architectures", columns, rows)],
        notes,
    )


if __name__ == "__main__":
    main()
