"""Composite and 1-D layers under svd (issue 15, parts 3 and 4): cost and measured CPU latency.

For one LSTM (256 → 512), one multi-head attention (E = 512, 8 heads) and one Conv1d
(128 → 256, k = 5), each at several ranks: the FLOPs and parameters of the factorized layer as
fractions of the dense one, the weight error ‖W − Ŵ‖/‖W‖ over its matrices (random weights: a
flat spectrum, the worst case), and the median latency of the torch layer and of the tensorslim
layer, measured interleaved (dense, factorized, dense, … for ``--rounds`` rounds; the median of
the rounds' medians). One thread. The machine is shared: its load average is recorded.

    python bench/composite_layers.py [--rounds 3] [--min-run-time 0.3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import facts, write_results
from tensorslim.analysis.flops import dense_layer_flops
from tensorslim.analysis.latency import measure_latency
from tensorslim.layers.attention import LowRankMultiheadAttention
from tensorslim.layers.composite import composite_matrices
from tensorslim.layers.lowrank_conv1d import LowRankConv1d
from tensorslim.layers.recurrent import LowRankRNN

RANKS = (64, 128, 192, 255)


def cases() -> list[dict]:
    """(name, dense module, input, builder(rank) → factorized module, weight matrices)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(256, 512, batch_first=True).eval()
    attention = nn.MultiheadAttention(512, 8, batch_first=True).eval()
    conv = nn.Conv1d(128, 256, 5, padding=2).eval()
    q = torch.randn(16, 64, 512)
    return [
        {
            "layer": "LSTM 256→512, 16×32 tokens",
            "dense": lstm,
            "input": torch.randn(16, 32, 256),
            "build": lambda r: LowRankRNN.from_dense(lstm, r),
        },
        {
            "layer": "MultiheadAttention 512/8 heads, 16×64 tokens",
            "dense": attention,
            "input": (q, q, q),
            "build": lambda r: LowRankMultiheadAttention.from_dense(attention, r),
        },
        {
            "layer": "Conv1d 128→256 k5, 16×256",
            "dense": conv,
            "input": torch.randn(16, 128, 256),
            "build": lambda r: LowRankConv1d.from_dense(conv, min(r, 256)),
        },
    ]


def weight_error(dense: nn.Module, small: nn.Module) -> float:
    if isinstance(dense, nn.Conv1d):
        before, after = [dense.weight.detach()], [small.dense_weight().detach()]
    else:
        before, after = composite_matrices(dense), composite_matrices(small.to_dense())
    lost = sum(float((a - b).pow(2).sum()) for a, b in zip(after, before, strict=True))
    return (lost / sum(float(b.pow(2).sum()) for b in before)) ** 0.5


def interleaved(dense: nn.Module, small: nn.Module, x, rounds: int, min_time: float) -> tuple:
    """Median over rounds of each module's median latency (ms), measured alternately."""
    times: dict[str, list[float]] = {"dense": [], "small": []}
    for _ in range(rounds):
        for key, module in (("dense", dense), ("small", small)):
            result = measure_latency(module, x, threads=1, min_run_time=min_time)
            times[key].append(result["median_ms"])
    return statistics.median(times["dense"]), statistics.median(times["small"])


def flops_of(module: nn.Module, x) -> int:
    first = x[0] if isinstance(x, tuple) else x
    others = tuple(tuple(t.shape) for t in x[1:]) if isinstance(x, tuple) else ()
    return dense_layer_flops(module, tuple(first.shape), others)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = facts()
    rows = []
    for case in cases():
        dense, x = case["dense"], case["input"]
        dense_flops = flops_of(dense, x)
        dense_params = sum(p.numel() for p in dense.parameters())
        for rank in RANKS:
            small = case["build"](rank).eval()
            t_dense, t_small = interleaved(dense, small, x, args.rounds, args.min_run_time)
            rows.append(
                {
                    "layer": case["layer"],
                    "rank": rank,
                    "flops_fraction": round(flops_of(small, x) / dense_flops, 3),
                    "params_fraction": round(
                        sum(p.numel() for p in small.parameters()) / dense_params, 3
                    ),
                    "weight_error": round(weight_error(dense, small), 3),
                    "torch_ms": round(t_dense, 2),
                    "tensorslim_ms": round(t_small, 2),
                    "speedup": round(t_dense / t_small, 2),
                }
            )
            print(rows[-1], flush=True)
    machine = facts()
    machine["loadavg_start"] = start["loadavg"]
    columns = list(rows[0])
    notes = [
        "svd on composite and 1-D layers, one thread, random weights (flat spectra). "
        "Latency: torch's layer and tensorslim's, interleaved, median of "
        f"{args.rounds} rounds of medians.",
        "The LSTM step loop runs in Python with separate elementwise ops while torch's CPU "
        "LSTM is one fused kernel, so it needs a low rank to be faster; attention and Conv1d "
        "speed up roughly with their FLOPs. The machine is shared with other jobs (load "
        f"average {start['loadavg']} at the start, {machine['loadavg']} at the end): "
        "absolute times are noisy, re-run on a quiet machine for final numbers.",
    ]
    write_results(
        "composite_layers",
        {"machine": machine, "rows": rows, "ranks": list(RANKS)},
        [("per layer and rank", columns, rows)],
        notes,
    )


if __name__ == "__main__":
    main()
