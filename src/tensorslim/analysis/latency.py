"""Measured CPU latency with ``torch.utils.benchmark`` (median of many runs, threads recorded)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import benchmark


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    threads: int | None = None,
    min_run_time: float = 0.3,
) -> dict[str, Any]:
    """Median / IQR forward latency in milliseconds of ``model(example_input)`` in eval mode.

    ``threads`` defaults to ``torch.get_num_threads()``; it is recorded with the result because
    latency depends on it more than on anything else on a CPU.
    """
    threads = threads or torch.get_num_threads()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(example_input)  # warm-up: allocator, lazy init
            timer = benchmark.Timer(
                stmt="model(x)",
                globals={"model": model, "x": example_input},
                num_threads=threads,
            )
            measurement = timer.blocked_autorange(min_run_time=min_run_time)
    finally:
        model.train(was_training)
    return {
        "median_ms": measurement.median * 1e3,
        "iqr_ms": measurement.iqr * 1e3,
        "runs": len(measurement.times),
        "threads": threads,
        "batch": int(example_input.shape[0]),
    }
