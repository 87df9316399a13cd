"""Latency-first planning: measured speedups of compressed models (issue 17).

For a ResNet-18-style model at 224×224 (batch 1 and 8) and resnet20/resnet56 at 28×28 (batch
64), BatchNorm folded into the convs in the dense baseline and before decomposing: every method
plans at ``latency=0.5``, ``latency=0.7`` and ``flops=0.5`` for a deployment setting (1 thread;
NCHW and channels_last in eager PyTorch; ONNX Runtime), and the compressed model is timed
against the dense one, interleaved, in the same setting. Reported: measured speedup, the plan's
predicted latency against the measured one, FLOPs and parameter fractions, planning time and
peak memory (RSS growth during planning). Each 1-thread plan's model is also timed at 2 threads
against dense at 2 threads. With ``--accuracy``, resnet20/56 are first trained briefly on
Fashion-MNIST and each compressed model gets the same short fine-tune.

The machine is shared and loaded: every comparison is interleaved, latencies are the best of
many short rounds (other processes only add time; medians are recorded beside them) and the load
average is recorded with every row.

    python bench/latency.py --quick      # resnet18 b1 and resnet20, svd + tucker, NCHW eager
    python bench/latency.py              # the full matrix (long)
    python bench/latency.py --models resnet18 --settings channels_last,ort --methods svd \
        --name latency_settings          # a slice of it
    python bench/latency.py --models resnet20 --settings compile --methods svd \
        --name latency_compile           # torch.compile (not in the default matrix: slow)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, facts, fashion_loaders, trained_model, write_results
from tensorslim.analysis.deployment import Deployment
from tensorslim.analysis.timing import LatencyCache, load_average
from tensorslim.data import make_loaders
from tensorslim.errors import TensorslimError
from tensorslim.fold import fold_batchnorm
from tensorslim.layout import applied_deployment, is_per_chain
from tensorslim.models import create_model
from tensorslim.plan import apply, plan
from tensorslim.planner.layout_chains import chain_layout
from tensorslim.planner.memory_format import time_in_deployments
from tensorslim.train.loop import evaluate, fit

BUDGETS = ("latency=0.5", "latency=0.7", "flops=0.5")
# the fine-tune behind every accuracy (--accuracy), the folded dense baseline's too. The models
# are BatchNorm-folded (no normalisation left). On resnet20 (0.847 trained), 60 steps: SGD at
# lr 0.01 (Nesterov 0.9) went to NaN by step 5 on the folded dense model, at 3e-3 it dropped
# dense to 0.52, at 1e-3 kept it (0.84) but lifted an svd flops=0.5 plan (0.10 before) to 0.52
# only; AdamW 1e-3 dropped dense to 0.71. 150 steps: AdamW 3e-4 dense 0.844, svd 0.675; 1e-4
# dense 0.847, svd 0.547
FINETUNE: dict[str, Any] = {"steps": 150, "optimizer": "adam", "lr": 3e-4, "batch": 128}
OPTIMIZERS = {"adam": "AdamW", "sgd": "SGD (Nesterov momentum 0.9)"}  # tensorslim.train's names
METHODS = {"svd": {"scheme": "channel"}, "svd_best": {"scheme": "best"}, "tucker": {}, "cp": {}}
# bench names that run a registered method under other settings (svd_best: the allocator picks
# the channel or the spatial scheme per layer)
RUN_AS = {"svd_best": "svd"}
COLUMNS = [
    "model",
    "batch",
    "setting",
    "method",
    "budget",
    "speedup",
    "measured",
    "predicted",
    "pred_err",
    "sum_err",
    "flops",
    "params",
    "compressed",
    "plan_s",
    "plan_mb",
    "speedup_2t",
    "accuracy",
    "accuracy_0",
    "dense_accuracy",
    "load",
]


class PeakRss:
    """Peak resident-set growth (MB) of this process while the block runs (sampled 20×/s)."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.start


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def base_models(quick: bool, accuracy: bool, names: list[str]) -> list[dict[str, Any]]:
    """(name, dense folded model, batch-1 example, batches, loaders) of every benchmarked model
    in ``names`` (the others are not built nor trained)."""
    torch.manual_seed(0)
    r18 = create_model("resnet18", in_channels=3, num_classes=1000).eval()
    out = [
        {
            "name": "resnet18",
            "model": r18,
            "example": torch.randn(1, 3, 224, 224),
            "batches": [1] if quick else [1, 8],
        }
    ]
    loaders = fashion_loaders(limit_train=12000) if accuracy else None
    for name in ["resnet20"] if quick else ["resnet20", "resnet56"]:
        if name not in names:
            continue
        torch.manual_seed(0)
        model = create_model(name, in_channels=1, num_classes=10)
        if loaders is not None:
            model, _ = trained_model(name, loaders[1], loaders[2], epochs=2, tag="latency-12k")
        out.append(
            {
                "name": name,
                "model": model.eval(),
                "example": torch.randn(1, 1, 28, 28),
                "batches": [64],
                "loaders": loaders,
            }
        )
    return out


def dense_baseline(entry: dict[str, Any]) -> dict[str, float]:
    """The folded dense model's test accuracy before and after :data:`FINETUNE` (the fine-tune
    every compressed model gets), once per model (kept in ``entry``)."""
    if "dense_accuracy" not in entry:
        dense = fold_batchnorm(entry["model"])[0]
        entry["dense_accuracy_0"], entry["dense_accuracy"] = _finetuned_accuracy(
            dense, entry["loaders"]
        )
    return {k: entry[k] for k in ("dense_accuracy_0", "dense_accuracy")}


SETTINGS = {
    "nchw": Deployment(threads=1, memory_format="nchw"),
    "channels_last": Deployment(threads=1, memory_format="channels_last"),
    "auto": Deployment(threads=1),  # the default: both layouts, the faster kept (dense: its own)
    "ort": Deployment(threads=1, backend="onnxruntime"),
    # torch.compile (inductor): layers timed eagerly, whole models compiled (each compile takes
    # seconds to a minute of wall time): only with --settings compile, not in the default matrix
    "compile": Deployment(threads=1, backend="compile"),
}
DEFAULT_SETTINGS = ("nchw", "channels_last", "auto", "ort")


def one_plan(
    entry: dict[str, Any], where: Deployment, method: str, budget: str, cache: LatencyCache
) -> dict[str, Any]:
    """Plan, apply, time against dense (same setting, then 2 threads) and report one row."""
    model, example = entry["model"], entry["example"]
    started = time.perf_counter()
    with PeakRss() as memory:
        the_plan = plan(
            model,
            RUN_AS.get(method, method),
            budget,
            example,
            deployment=where,
            latency_cache=cache,
            fold_bn=True,
            **METHODS[method],
        )
        planned = time.perf_counter() - started
        small = apply(model, the_plan)
    cache.save()
    dense = fold_batchnorm(model)[0].eval()
    timed, layouts = _time_pair(dense, small, the_plan.latency, where, example, threads=1)
    timed2, _ = _time_pair(dense, small, the_plan.latency, where, example, threads=2)
    measured = timed["small"].ms / timed["dense"].ms
    predicted = the_plan.latency["predicted_fraction"] if the_plan.latency else None
    row = {
        "model": entry["name"],
        "batch": where.batch,
        "setting": layouts if where.backend == "eager" else SETTING_NAMES[where.backend],
        "method": method,
        "budget": budget,
        "speedup": 1 / measured,
        "measured": measured,
        "predicted": predicted,
        "pred_err": predicted / measured - 1 if predicted is not None else None,
        "sum_err": _layer_sum(the_plan.latency) / measured - 1 if the_plan.latency else None,
        "flops": the_plan.estimated_flops / the_plan.model_flops,
        "params": the_plan.estimated_params / the_plan.model_params,
        "compressed": len(the_plan.compressed_layers),
        "plan_s": planned,
        "plan_mb": memory.growth,
        "speedup_2t": timed2["dense"].ms / timed2["small"].ms,
        "dense_ms": timed["dense"].ms,
        "small_ms": timed["small"].ms,
        "dense_wall_ms": timed["dense"].wall_ms,
        "dense_wall_median_ms": timed["dense"].wall_median_ms,
        "small_wall_ms": timed["small"].wall_ms,
        "small_wall_median_ms": timed["small"].wall_median_ms,
        "notes": the_plan.notes,
        "slower_layers": _slower_layers(the_plan),
        "chains": ((the_plan.latency or {}).get("memory_format") or {}).get("chains"),
        "dense_chains": _dense_chains(dense, example, the_plan.latency, cache),
        "load": load_average(),
        "compile_s": (the_plan.latency or {}).get("compile_s"),
    }
    if entry.get("loaders") is not None:
        row["accuracy_0"], row["accuracy"] = _finetuned_accuracy(small, entry["loaders"])
        row.update(dense_baseline(entry))
    return row


SETTING_NAMES = {"onnxruntime": "ort", "compile": "compile"}


def _time_pair(
    dense: nn.Module,
    small: nn.Module,
    record: dict[str, Any] | None,
    where: Deployment,
    example: torch.Tensor,
    threads: int,
) -> tuple[dict[str, Any], str]:
    """Dense and compressed timed interleaved, each in the layout the plan chose for it
    (memory_format="auto": dense in its faster layout, compressed in its own)."""
    small_where = applied_deployment(record) if record else where  # per chain: as applied
    layouts = (record or {}).get("memory_format", {})
    planned = Deployment(**record["deployment"]) if record else where
    dense_where = planned.in_format(layouts.get("dense", planned.memory_format))
    label = "per_chain" if is_per_chain(record) else planned.memory_format
    if where.memory_format == "auto":
        label = f"auto: {dense_where.memory_format}→{label}"
    models = {
        "dense": (dense, Deployment(**{**dense_where.to_dict(), "threads": threads})),
        "small": (small, Deployment(**{**small_where.to_dict(), "threads": threads})),
    }
    return time_in_deployments(models, example), label


def _dense_chains(
    dense: nn.Module, example: torch.Tensor, record: dict[str, Any] | None, cache: LatencyCache
) -> dict[str, Any] | None:
    """When the plan kept a per-chain layout, the same search on the dense model: is the
    baseline (dense in its faster uniform layout) itself beaten by a mix? (``None`` otherwise.)"""
    if not is_per_chain(record):
        return None
    entry = chain_layout(dense, example, Deployment(**record["deployment"]), cache)  # type: ignore[index]
    return {k: entry.get(k) for k in ("assignment", "chain_sum_ms", "model_ms", "kept", "reason")}


def _layer_sum(record: dict[str, Any]) -> float:
    """The plan's layer-sum prediction (dense model − Σ layer savings) against the dense model
    the measurement uses (with "auto", the faster dense layout)."""
    layouts = record.get("memory_format")
    if not layouts:
        return float(record["layer_sum_fraction"])
    dense = {f: v["dense_ms"] for f, v in layouts["formats"].items()}
    return float(record["layer_sum_fraction"]) * dense[layouts["chosen"]] / dense[layouts["dense"]]


def _slower_layers(the_plan: Any) -> int:
    """Compressed layers whose measured time is not below their dense time (should be 0)."""
    return sum(
        1
        for lp in the_plan.compressed_layers
        if lp.extra.get("latency_ms", 0.0) >= lp.extra.get("dense_latency_ms", float("inf"))
    )


def _finetuned_accuracy(model: nn.Module, loaders: Any) -> tuple[float, float]:
    """(test accuracy before, after) :data:`FINETUNE`'s steps of ``model`` (in place; the same
    steps, seed and batches for every method and the dense baseline)."""
    bundle, _, test = loaders
    before = float(evaluate(model.eval(), test)["accuracy"])
    torch.manual_seed(0)
    train = make_loaders(bundle, FINETUNE["batch"], seed=0)[0]  # a new one: the same batches
    fit(
        model,
        train,
        epochs=1,
        lr=FINETUNE["lr"],
        optimizer=FINETUNE["optimizer"],
        progress=False,
        max_steps_per_epoch=FINETUNE["steps"],
    )
    return before, float(evaluate(model.eval(), test)["accuracy"])


def run(args: argparse.Namespace, save: Any) -> list[dict[str, Any]]:
    """Every selected (model, batch, setting); ``save(rows)`` after each setting's rows."""
    rows: list[dict[str, Any]] = []
    for entry in base_models(args.quick, args.accuracy, args.models):
        if entry["name"] not in args.models:
            continue
        for batch in [b for b in entry["batches"] if args.batches is None or b in args.batches]:
            for name in args.settings:
                where = Deployment(**{**SETTINGS[name].to_dict(), "batch": batch})
                rows += _setting_rows(entry, where, args.methods, args.budgets)
                save(rows)  # a long run keeps what it measured
    return rows


def _setting_rows(
    entry: dict[str, Any], where: Deployment, methods: list[str], budgets: list[str]
) -> list[dict]:
    """Every method at every budget for one model in one setting (one timing cache)."""
    cache = LatencyCache(RESULTS / "latency_cache" / f"{entry['name']}-{where.key}.json")
    rows = []
    for method in methods:
        for budget in budgets:
            try:
                row = one_plan(entry, where, method, budget, cache)
            except (TensorslimError, RuntimeError) as exc:
                traceback.print_exc()
                row = {"model": entry["name"], "batch": where.batch, "method": method}
                row.update({"budget": budget, "setting": where.key, "error": str(exc)[:300]})
            rows.append(row)
            print({k: row.get(k) for k in COLUMNS}, flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Predicted against measured latency fraction, one marker per method."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for method in sorted({r["method"] for r in rows if "measured" in r}):
        pts = [(r["predicted"], r["measured"]) for r in rows if r.get("method") == method
               and r.get("predicted") is not None and "measured" in r]  # fmt: skip
        if pts:
            ax.scatter(*zip(*pts, strict=True), label=method, alpha=0.7)
    ax.plot([0, 1.3], [0, 1.3], "k--", lw=0.8, label="predicted = measured")
    ax.set_xlabel("predicted latency / dense")
    ax.set_ylabel("measured latency / dense")
    ax.set_title("Plans at latency=0.5, 0.7 and flops=0.5")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- latency:start -->", "<!-- latency:end -->"
README_COLUMNS = ["model", "batch", "setting", "method", "budget", "speedup", "predicted",
                  "measured", "flops", "params", "plan_s", "load"]  # fmt: skip


def update_readme() -> None:
    """The README's measured-latency table from every bench/results/latency*.json."""
    from tensorslim.report.tables import markdown_table

    rows, sources = [], []
    for path in sorted(RESULTS.glob("latency*.json")):
        data = json.loads(path.read_text())
        rows += [r for r in data["rows"] if "measured" in r]
        sources.append(f"`{path.name}` (load {data['machine']['loadavg'][0]:.0f})")
    text = (
        f"Generated by `python bench/latency.py --update-readme` from {', '.join(sources)}; "
        "1 thread, BatchNorm folded in dense and compressed, latency = best CPU-time round.\n\n"
        + markdown_table(README_COLUMNS, rows)
    )
    readme = README.read_text()
    head, rest = readme.split(START, 1)
    README.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 b1 + resnet20, NCHW only")
    parser.add_argument("--accuracy", action="store_true", help="train/fine-tune on F-MNIST")
    parser.add_argument("--methods", default=None, help="comma list (default svd,tucker[,cp])")
    parser.add_argument("--models", default="resnet18,resnet20,resnet56")
    parser.add_argument(
        "--settings",
        default=None,
        help="of nchw,channels_last,auto,ort,compile (default: all but compile)",
    )
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument("--batches", default=None, help="comma list (default: each model's)")
    parser.add_argument("--name", default=None, help="results name (default latency[_quick])")
    parser.add_argument("--update-readme", action="store_true", help="only rewrite the table")
    args = parser.parse_args()
    if args.update_readme:
        update_readme()
        return
    torch.set_num_threads(1)
    default_methods = "svd,tucker" if args.quick else "svd,tucker,cp"
    args.methods = (args.methods or default_methods).split(",")
    args.models, args.budgets = args.models.split(","), args.budgets.split(",")
    args.batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    default_settings = "nchw" if args.quick else ",".join(DEFAULT_SETTINGS)
    args.settings = (args.settings or default_settings).split(",")
    machine = facts()
    started = time.perf_counter()
    name = args.name or ("latency_quick" if args.quick else "latency")
    rows = run(args, lambda rows: save(name, machine, started, rows))
    machine["loadavg_end"] = facts()["loadavg"]
    save(name, machine, started, rows)
    print(f"wrote bench/results/{name}.json, .md, .png in {time.perf_counter() - started:.0f} s")


def save(name: str, machine: dict[str, Any], started: float, rows: list[dict[str, Any]]) -> None:
    payload = {
        "machine": machine,
        "seconds": time.perf_counter() - started,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    notes = [
        "Dense vs compressed, BatchNorm folded in both, timed interleaved in the same setting "
        "(best CPU-time round of many short rounds; the machine is shared — see the load "
        "column). `measured` and `predicted` are latency / dense latency; `pred_err` = "
        "predicted / measured − 1; `speedup_2t` re-times the same models at 2 threads; "
        "`plan_mb` is RSS growth while planning.",
    ]
    if any("accuracy" in r for r in rows):
        notes.append(
            f"`accuracy`: Fashion-MNIST test accuracy of the compressed model after "
            f"{FINETUNE['steps']} fine-tuning steps ({OPTIMIZERS[FINETUNE['optimizer']]}, lr "
            f"{FINETUNE['lr']:g} cosine to 0, weight decay 5e-4, batch {FINETUNE['batch']}, the "
            "same batches for every row; models trained 2 epochs on 12k images first); "
            "`accuracy_0` before those steps; `dense_accuracy` the BatchNorm-folded dense "
            "model after the same steps (its accuracy before them in the JSON, "
            "`dense_accuracy_0`)."
        )
    write_results(name, payload, [("plans", COLUMNS, [r for r in rows if "measured" in r])], notes)
    plot(rows, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
