"""DeBut benchmark (issue 6): fast multiply speed, and LeNet-5 on Fashion-MNIST.

Speed (fp32, 1024 input rows): the paper's VGG-16 chain for a 512×2304 weight and generated
chains with ≥ 8× and ≥ 16× fewer FLOPs than dense on 1024×1024 and 4096×4096 weights. For each:
dense ``F.linear``, DeBut (merged plan, eager), DeBut per factor (no merging), DeBut under
``torch.compile`` and a masked-dense chain (every factor a dense p×q matrix times its 0/1 mask);
forward (inference, no grad) and forward + backward (gradients for input and weights).
Configurations: thread counts, and OMP_WAIT_POLICY=PASSIVE (run in a child process).
Timings: ``torch.utils.benchmark.Timer.blocked_autorange`` medians; every case is measured in
``--rounds`` interleaved rounds and the smallest round median is reported (other work on the
machine only ever adds time), all rounds are kept in the JSON.

LeNet-5 (the paper's setting): train lenet5 on Fashion-MNIST (weights cached), replace conv2,
fc1 and fc2 by DeBut chains (generated at two compression levels) through ``ts.plan`` with an
explicit chain per layer, initialise them by ALS from the trained weights or randomly, fine-tune
the same number of epochs, and record accuracy, the layers' ALS errors, layer and model
compression. Each run is repeated per conv unfolding order (``--orders``: the official
position-major (kh, kw, C_in), the default, and the channel-major (C_in, kh, kw) tensorslim used
before); only conv2 differs between them, with the same seed, chains and fine-tuning.

    python bench/debut.py [--skip-speed] [--skip-lenet] [--rounds 2] [--configs 2 2:passive 1]
                          [--orders position channel]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tensorslim as ts
from common import (
    RESULTS,
    facts,
    fashion_loaders,
    paired_loader,
    trained_model,
    write_results,
)
from tensorslim.analysis.flops import count_flops
from tensorslim.layers.debut import DeButConv2d, DeButLinear
from tensorslim.layers.debut_chain import (
    DeButChain,
    dense_cost,
    estimated_cost,
    generate_chains,
    plan_segments,
)
from tensorslim.methods import method_class
from tensorslim.methods.presets import get_preset
from tensorslim.train.loop import NonFiniteLossError, evaluate, fit

VGG = (
    "2048 2304 8 9 1  2048 2048 2 2 8  2048 2048 2 2 16  2048 2048 2 2 32  "
    "1024 2048 2 4 64  512 1024 2 4 128  512 512 2 2 256"
)
ROWS = 1024
LENET_LAYERS = ("conv2", "fc1", "fc2")


# ------------------------------------------------------------------------------------ speed


def speed_cases() -> list[tuple[str, DeButChain]]:
    """The paper's VGG chain and, per width and FLOPs reduction, the generator's first choice
    with at least that reduction."""
    cases = [("VGG-16 chain 512×2304 (paper)", DeButChain.parse(VGG))]
    for width in (1024, 4096):
        for ratio in (8, 16):
            # within 2× of the ratio all chains rank as equally close, so the generator's
            # speed preference decides; keep the fastest that reaches the reduction without
            # overshooting it by more than half
            found = generate_chains(width, width, ratio=ratio, limit=60, cols=ROWS, tolerance=1.0)
            fits = [c for c in found if ratio <= c.compression < 1.5 * ratio]
            best = (fits or [c for c in found if c.compression >= ratio])[0]
            cases.append((f"generated {width}×{width}, ≥{ratio}× fewer FLOPs", best.chain))
    return cases


def timer_median(fn, min_run_time: float) -> float:
    # Timer runs single-threaded unless told otherwise: time at the current thread count
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


class MaskedDense(torch.nn.Module):
    """Every factor stored as a dense p×q parameter, multiplied by its 0/1 pattern each call."""

    def __init__(self, layer: DeButLinear) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterList(
            [
                torch.nn.Parameter(spec.dense(w.detach()))
                for spec, w in zip(layer.chain, layer.core.factors, strict=True)
            ]
        )
        for k, spec in enumerate(layer.chain):
            self.register_buffer(f"mask{k}", spec.pattern().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, w in enumerate(self.weights):
            x = F.linear(x, w * getattr(self, f"mask{k}"))
        return x


def measure_case(label: str, chain: DeButChain, rounds: int, masked_too: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    n_in, n_out = chain.in_features, chain.out_features
    layer = DeButLinear(n_in, n_out, chain, bias=False)
    dense_w = layer.core.dense_weight().clone().requires_grad_(True)
    big = n_in * n_out >= 4096 * 4096
    masked = MaskedDense(layer)
    x = torch.randn(ROWS, n_in)
    xg = x.clone().requires_grad_(True)
    grad_out = torch.randn(ROWS, n_out)

    def fwd_dense() -> torch.Tensor:
        return F.linear(x, dense_w)

    def fwd_debut() -> torch.Tensor:
        return layer(x)

    def fwd_masked() -> torch.Tensor:
        return masked(x)

    def train_step(fn):  # forward + backward, gradients for the input and all weights
        def step() -> None:
            xg.grad = None
            fn(xg).backward(grad_out)

        return step

    variants_fwd = {"dense": fwd_dense, "debut": fwd_debut}
    variants_train = {
        "dense": train_step(lambda inp: F.linear(inp, dense_w)),
        "debut": train_step(layer),
    }
    if masked_too:  # the slow competitor is timed in the first configuration only
        variants_fwd["masked_dense"] = fwd_masked
        if not big:  # a 4096² masked chain takes ~10 s per training step here: forward only
            variants_train["masked_dense"] = train_step(masked)
    result: dict[str, Any] = {
        "case": label,
        "chain": chain.text,
        "shape": [n_out, n_in],
        "factors": len(chain),
        "nnz": chain.nnz,
        "flops_reduction": chain.compression,
        "plan": [
            {"factors": [s.start, s.stop], "merged": s.spec.text, "kernel": s.kernel}
            for s in plan_segments(chain, ROWS)
        ],
        "model_us": {"debut": estimated_cost(chain, ROWS), "dense": dense_cost(n_out, n_in, ROWS)},
        "forward_ms": {},
        "train_ms": {},
        "rounds": [],
    }
    # torch.compile: compile once (timed), then it is one more forward variant
    compiled = DeButLinear(n_in, n_out, chain, bias=False)
    compiled.load_state_dict(layer.state_dict())
    compiled.core.use_compile = True
    started = time.perf_counter()
    with torch.no_grad():
        try:
            compiled(x)
            compile_ok = not compiled.core._compile_failed
        except Exception as exc:
            compile_ok = False
            result["compile_error"] = f"{type(exc).__name__}: {exc}"[:300]
    result["compile_seconds"] = time.perf_counter() - started
    result["compile_ok"] = compile_ok
    if compile_ok:
        variants_fwd["debut_compiled"] = lambda: compiled(x)
    unfused = DeButLinear(n_in, n_out, chain, bias=False)
    unfused.load_state_dict(layer.state_dict())
    unfused.core.fuse = False
    variants_fwd["debut_per_factor"] = lambda: unfused(x)

    with torch.no_grad():  # the outputs agree before anything is timed
        ref = fwd_dense()
        for name in ("debut", "masked_dense", "debut_per_factor", "debut_compiled"):
            if name in variants_fwd:
                got = variants_fwd[name]()
                err = float((got - ref).norm() / ref.norm())
                if err > 1e-4:
                    raise RuntimeError(f"{label}: {name} differs from dense by {err:.2e}")
    run_time = 0.6 if not big else 1.0
    for _ in range(rounds):
        row: dict[str, dict[str, float]] = {"forward": {}, "train": {}}
        with torch.no_grad():
            for name, fn in variants_fwd.items():
                row["forward"][name] = timer_median(fn, run_time) * 1e3
        for name, fn in variants_train.items():
            row["train"][name] = timer_median(fn, run_time) * 1e3
        result["rounds"].append(row)
    for kind in ("forward", "train"):
        names = result["rounds"][0][kind]
        result[f"{kind}_ms"] = {n: min(r[kind][n] for r in result["rounds"]) for n in names}
    fwd, train = result["forward_ms"], result["train_ms"]
    result["forward_speedup_vs_dense"] = fwd["dense"] / fwd["debut"]
    result["train_speedup_vs_dense"] = train["dense"] / train["debut"]
    return result


def speed_part(rounds: int, threads: int, masked_too: bool) -> list[dict[str, Any]]:
    out = []
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    policy = os.environ.get("OMP_WAIT_POLICY", "default").lower()
    try:
        for label, chain in speed_cases():
            print(f"speed ({threads} threads, wait {policy}): {label}: {chain.text}", flush=True)
            res = measure_case(label, chain, rounds, masked_too)
            res["threads"] = threads
            res["omp_wait_policy"] = policy
            res["config"] = f"{threads}t" + ("" if policy == "default" else f" {policy}")
            fwd = {k: round(v, 2) for k, v in res["forward_ms"].items()}
            train = {k: round(v, 2) for k, v in res["train_ms"].items()}
            print(f"  forward ms {fwd}\n  train ms   {train}", flush=True)
            out.append(res)
    finally:
        torch.set_num_threads(previous)
    return out


def speed_configs(configs: list[str], rounds: int) -> list[dict[str, Any]]:
    """Run every configuration "THREADS" or "THREADS:passive"; the OpenMP wait policy is read
    when OpenMP starts, so passive-wait configurations run in a child process."""
    out: list[dict[str, Any]] = []
    for n, config in enumerate(configs):
        threads_text, _, policy = config.partition(":")
        threads, masked_too = int(threads_text), n == 0
        if policy and policy.upper() != os.environ.get("OMP_WAIT_POLICY", "").upper():
            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / "speed.json"
                command = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--speed-child",
                    str(target),
                    "--rounds",
                    str(rounds),
                    "--configs",
                    threads_text,
                ]
                if masked_too:
                    command.append("--child-masked")
                env = dict(os.environ, OMP_WAIT_POLICY=policy.upper())
                subprocess.run(command, env=env, check=True)
                out.extend(json.loads(target.read_text()))
        else:
            out.extend(speed_part(rounds, threads, masked_too))
    return out


# ------------------------------------------------------------------------------------ LeNet


def lenet_arms(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Initialisations compared at every ratio: ALS and random per conv order (defaults
    otherwise), and the paper preset (the official initialisation, position-major)."""
    arms = [
        {"init": init, "order": order, "preset": None, "lr": args.ft_lr}
        for init in ("als", "random")
        for order in args.orders
    ]
    if args.paper:
        # the paper's initialisation fine-tuned like the others, and at the preset's own rate
        paper_lr = get_preset(method_class("debut"), "paper").training["lr"]
        for lr in dict.fromkeys((args.ft_lr, paper_lr)):
            arms.append({"init": "als", "order": "position", "preset": "paper", "lr": lr})
        # the one paper setting that decides whether fine-tuning is stable: ALS's raw scales
        arms.append(
            {"init": "als", "order": "position", "preset": "paper", "lr": args.ft_lr,
             "als_balance": True}
        )  # fmt: skip
    return arms


def lenet_run(
    model: torch.nn.Module,
    chains: dict[str, str],
    arm: dict[str, Any],
    args: argparse.Namespace,
    loaders: tuple[Any, Any],
    example: torch.Tensor,
) -> dict[str, Any]:
    """One arm: plan + apply with explicit chains, evaluate, fine-tune, evaluate."""
    train, test = loaders
    torch.manual_seed(0)
    started = time.perf_counter()
    settings: dict[str, Any] = {"init": arm["init"], "order": arm["order"]}
    if arm["preset"] is None:
        settings["als_sweeps"] = args.sweeps  # the paper preset keeps its own 10 sweeps
    else:
        settings["preset"] = arm["preset"]
    if "als_balance" in arm:
        settings["als_balance"] = arm["als_balance"]
    plan = ts.plan(
        model, "debut", None, example, layers=list(LENET_LAYERS), chain=chains, **settings
    )
    small = ts.apply(model, plan)
    init_s = time.perf_counter() - started
    before = evaluate(small, test)["accuracy"]
    started = time.perf_counter()
    diverged = None
    try:
        history = fit(small, train, epochs=args.ft_epochs, lr=arm["lr"], progress=False).epochs
        after: float | None = evaluate(small, test)["accuracy"]
    except NonFiniteLossError as exc:  # recorded, not hidden: the arm's fine-tuning diverged
        history, after, diverged = [], None, str(exc)
    layers = []
    for fqn in LENET_LAYERS:
        new = small.get_submodule(fqn)
        assert isinstance(new, DeButLinear | DeButConv2d)
        dense_params = model.get_submodule(fqn).weight.numel()
        layers.append(
            {
                "layer": fqn,
                "chain": new.chain.text,
                "dense_weights": dense_params,
                "debut_nnz": new.chain.nnz,
                "layer_compression": dense_params / new.chain.nnz,
                "init_error": new.init_info.get("error"),
            }
        )
    return {
        "init": arm["init"],
        "order": arm["order"],
        "preset": arm["preset"] or "default",
        "finetune_lr": arm["lr"],
        "als_balance_override": arm.get("als_balance"),
        "accuracy_after_init": before,
        "accuracy_after_finetune": after,
        "diverged": diverged,
        "params": sum(p.numel() for p in small.parameters()),
        # analytic (2·cols·Σ p s per DeBut layer, as planned); the counter's figure is what the
        # merged execution runs and what it can see (bmm, not the elementwise kernels)
        "flops": plan.estimated_flops,
        "flops_counter": count_flops(small, example[:1]),
        "init_seconds": init_s,
        "finetune_seconds": time.perf_counter() - started,
        "history": history,
        "layers": layers,
    }


def lenet_part(args: argparse.Namespace) -> dict[str, Any]:
    bundle, train, test = fashion_loaders(args.limit_train, batch_size=128)
    tag = f"fmnist-{args.limit_train or 'all'}-e{args.base_epochs}"
    model, meta = trained_model("lenet5", train, test, epochs=args.base_epochs, tag=tag)
    example = torch.stack([test.dataset[i][0] for i in range(8)])
    base_params = sum(p.numel() for p in model.parameters())
    runs = []
    for ratio in args.ratios:
        chains = {}
        for fqn in LENET_LAYERS:
            w = model.get_submodule(fqn).weight
            out_f, in_f = w.shape[0], w[0].numel()
            chains[fqn] = generate_chains(out_f, in_f, ratio=ratio, limit=1)[0].text
        for arm in lenet_arms(args):
            # a fresh loader per arm: every arm fine-tunes on the same batches in the same order
            loaders = (paired_loader(bundle, seed=0), test)
            run = lenet_run(model, chains, arm, args, loaders, example)
            run["target_ratio"] = ratio
            run["model_compression"] = base_params / run["params"]
            runs.append(run)
            after = run["accuracy_after_finetune"]
            print(
                f"lenet ratio {ratio} {arm}: acc after init {run['accuracy_after_init']:.4f}, "
                f"after {args.ft_epochs} epochs "
                f"{'diverged' if after is None else f'{after:.4f}'}",
                flush=True,
            )
    return {
        "base": {
            "accuracy": evaluate(model, test)["accuracy"],
            "params": base_params,
            "flops": count_flops(model, example[:1]),
            "train_epochs": meta["epochs"],
        },
        "runs": runs,
    }


# ------------------------------------------------------------------------------------ report


def plot(speed: list[dict[str, Any]], lenet: dict[str, Any] | None, path: Path) -> None:
    """Forward and forward+backward times per case and configuration (log scale), and the
    LeNet accuracies; one panel per row so the labels stay readable."""
    panels = (2 if speed else 0) + (1 if lenet else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(13, 4.2 * panels), squeeze=False)
    row = 0
    for kind in ("forward", "train") if speed else ():
        ax = axes[row][0]
        row += 1
        names = (
            ["dense", "debut", "debut_per_factor", "debut_compiled", "masked_dense"]
            if kind == "forward"
            else ["dense", "debut", "masked_dense"]
        )
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals = [r[f"{kind}_ms"].get(name, math.nan) for r in speed]
            ax.bar([j + i * width for j in range(len(speed))], vals, width, label=name)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(speed))])
        ax.set_xticklabels(
            [
                f"{r['shape'][0]}×{r['shape'][1]} {r['flops_reduction']:.0f}×\n{r['config']}"
                for r in speed
            ],
            fontsize=7,
            rotation=45,
            ha="right",
        )
        ax.set_ylabel("ms (log)")
        title = "forward (no grad)" if kind == "forward" else "forward + backward"
        ax.set_title(f"{title}, {ROWS} rows, fp32")
        ax.legend(fontsize=7, ncol=len(names))
    if lenet:
        ax = axes[row][0]
        runs = lenet["runs"]
        labels = [
            f"{r['init']} init{' (paper)' if r.get('preset') == 'paper' else ''}"
            f"{' + balance' if r.get('als_balance_override') else ''}, "
            f"lr {r.get('finetune_lr', 0.02):g}, "
            f"{r.get('order', 'channel')}-major conv, "
            f"{r['model_compression']:.2f}× smaller"
            for r in runs
        ]
        ax.bar(
            range(len(runs)),
            [r["accuracy_after_finetune"] or 0.0 for r in runs],
            color="tab:blue",
            label="after fine-tuning",
        )
        ax.bar(
            range(len(runs)),
            [r["accuracy_after_init"] for r in runs],
            color="tab:orange",
            width=0.4,
            label="right after initialisation",
        )
        ax.axhline(lenet["base"]["accuracy"], color="k", linestyle="--", label="dense LeNet-5")
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(labels, fontsize=7, rotation=20, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("test accuracy")
        ax.set_title("LeNet-5 on Fashion-MNIST: conv2, fc1, fc2 as DeBut chains")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-lenet", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[str(torch.get_num_threads()), f"{torch.get_num_threads()}:passive", "1"],
        help="speed configurations: THREADS or THREADS:passive (OMP_WAIT_POLICY=PASSIVE)",
    )
    parser.add_argument("--speed-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-masked", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--limit-train", type=int, default=20000)
    parser.add_argument("--base-epochs", type=int, default=5)
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument("--ft-lr", type=float, default=0.02)
    parser.add_argument("--sweeps", type=int, default=8)
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument(
        "--orders", nargs="+", default=["position", "channel"], choices=["position", "channel"]
    )
    parser.add_argument(
        "--no-paper", dest="paper", action="store_false", help="skip the preset='paper' arm"
    )
    args = parser.parse_args()
    if args.speed_child is not None:  # a passive-wait configuration, run by the parent
        threads = int(args.configs[0])
        result = speed_part(args.rounds, threads, args.child_masked)
        args.speed_child.write_text(json.dumps(result))
        return
    started = time.perf_counter()
    machine = facts()
    # a skipped part keeps the previous run's numbers, so one part can be re-measured alone
    previous_path = RESULTS / "debut.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    if args.skip_speed:
        speed = previous.get("speed", [])
        # where the kept numbers were measured (the first run that measured them)
        speed_machine = previous.get("speed_machine", previous.get("machine"))
    else:
        speed = speed_configs(args.configs, args.rounds)
        speed_machine = machine
    lenet = previous.get("lenet") if args.skip_lenet else lenet_part(args)
    payload = {
        "machine": machine,
        "machine_after": facts(),
        "speed_machine": speed_machine,
        "args": vars(args),
        "rows": ROWS,
        "speed": speed,
        "lenet": lenet,
        "seconds": time.perf_counter() - started,
    }
    tables = []
    notes = [
        "DeBut (Lin et al., NeurIPS 2021) in tensorslim: fast multiply speed and LeNet-5 on "
        "Fashion-MNIST. Generated by `python bench/debut.py`.",
    ]
    if speed and speed_machine is not machine and speed_machine:
        notes.append(
            f"The speed tables are kept from the run of {speed_machine.get('date')} "
            f"(load average {speed_machine.get('loadavg')}); this run re-measured LeNet only."
        )
    if speed:
        rows = []
        for r in speed:
            fwd, tr = r["forward_ms"], r["train_ms"]
            rows.append(
                {
                    "case": r["case"],
                    "config": r["config"],
                    "FLOPs ↓": f"{r['flops_reduction']:.1f}×",
                    "dense fwd ms": f"{fwd['dense']:.2f}",
                    "DeBut fwd ms": f"{fwd['debut']:.2f}",
                    "per-factor fwd ms": f"{fwd['debut_per_factor']:.2f}",
                    "compiled fwd ms": f"{fwd['debut_compiled']:.2f}"
                    if "debut_compiled" in fwd
                    else "failed",
                    "masked fwd ms": f"{fwd['masked_dense']:.2f}" if "masked_dense" in fwd else "–",
                    "fwd speedup": f"{r['forward_speedup_vs_dense']:.2f}×",
                    "dense f+b ms": f"{tr['dense']:.2f}",
                    "DeBut f+b ms": f"{tr['debut']:.2f}",
                    "masked f+b ms": f"{tr['masked_dense']:.2f}" if "masked_dense" in tr else "–",
                    "f+b speedup": f"{r['train_speedup_vs_dense']:.2f}×",
                }
            )
        tables.append((f"Speed at {ROWS} rows (fp32, ms, lower is better)", list(rows[0]), rows))
        chains = [
            {
                "case": r["case"],
                "chain": r["chain"],
                "merged plan": " | ".join(f"{p['merged']} ({p['kernel']})" for p in r["plan"]),
                "compile s": f"{r['compile_seconds']:.1f}",
            }
            for r in speed
            if r["config"] == speed[0]["config"]
        ]
        tables.append(("Chains and how they run", list(chains[0]), chains))
        notes.append(
            "Timings: Timer.blocked_autorange median, smallest of the interleaved rounds. "
            "'DeBut' is the merged plan (exact neighbours multiplied into larger grids, chosen "
            "by the cost model), 'per-factor' runs each factor alone, 'masked' multiplies dense "
            "p×q factors times their 0/1 patterns (timed in the first configuration only; its "
            "4096² training step, ~10 s, is not run)."
        )
        notes.append(
            "Configurations: intra-op threads, and 'passive' = OMP_WAIT_POLICY=PASSIVE. This "
            "2-core machine is shared with other jobs (load average below): with OpenMP's "
            "default spin-wait every parallel op can stall for a scheduler slice when the other "
            "core is busy, which hurts code made of many short ops (eager DeBut: one or a few "
            "ops per merged factor) far more than one long GEMM. Passive waiting or one thread "
            "removes the stall; torch.compile reduces the op count."
        )
    if lenet:
        rows = []
        for r in lenet["runs"]:
            rows.append(
                {
                    "target": f"{r['target_ratio']:g}×",
                    "init": r["init"],
                    "preset": r.get("preset", "default")
                    + (" + als_balance" if r.get("als_balance_override") else ""),
                    "conv order": r.get("order", "channel"),
                    "fine-tune lr": r.get("finetune_lr", args.ft_lr),
                    "acc after init": f"{r['accuracy_after_init']:.4f}",
                    "acc after fine-tune": "diverged (NaN loss)"
                    if r["accuracy_after_finetune"] is None
                    else f"{r['accuracy_after_finetune']:.4f}",
                    "params": r["params"],
                    "model compression": f"{r['model_compression']:.2f}×",
                    "FLOPs": r["flops"],
                    "layers (compression, ALS error)": "; ".join(
                        f"{ly['layer']} {ly['layer_compression']:.2f}×"
                        + (f" e={ly['init_error']:.3f}" if ly["init_error"] is not None else "")
                        for ly in r["layers"]
                    ),
                }
            )
        base = lenet["base"]
        notes.append(
            f"Dense LeNet-5: accuracy {base['accuracy']:.4f}, {base['params']} params, "
            f"{base['flops']} FLOPs, trained {base['train_epochs']} epochs. DeBut runs: same "
            f"fine-tuning ({args.ft_epochs} epochs, SGD lr {args.ft_lr}, cosine) for every init "
            "and conv order (only conv2 depends on the order; same seed, chains and batch "
            "order: a fresh loader per arm). 'paper': "
            "preset='paper', the official initialisation (ALS from U[0, 1) factors, 10 sweeps "
            "starting at the output side, no rescaling), position-major, fine-tuned at the "
            "common rate and at the preset's own (0.01, the official train_lenet.sh; its "
            "150-epoch step schedule is not run); 'paper + als_balance': the same with the "
            "factors rescaled after ALS, per feature and per factor (tensorslim's default). "
            "A 'diverged' run "
            "hit a NaN loss in fine-tuning at its learning rate. Accuracies come from one seed "
            "on a machine shared with other jobs (load average in the JSON; it affects time, "
            "not accuracy)."
        )
        tables.append(("LeNet-5 on Fashion-MNIST, conv2/fc1/fc2 as DeBut", list(rows[0]), rows))
        chain_rows = [
            {"target": f"{r['target_ratio']:g}×", "layer": ly["layer"], "chain": ly["chain"]}
            for r in lenet["runs"]
            if r["init"] == "als"
            and r.get("order", "channel") == lenet["runs"][0].get("order")
            and r.get("preset", "default") == "default"
            for ly in r["layers"]
        ]
        tables.append(("LeNet chains", list(chain_rows[0]), chain_rows))
    name = "debut" if (speed and lenet) else ("debut_speed" if speed else "debut_lenet")
    write_results(name, payload, tables, notes)
    plot(speed, lenet, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json/.md/.png in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
