"""Measured CPU latency with ``torch.utils.benchmark`` (median of many runs, threads recorded)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

from tensorslim.inputs import ForwardFn, batch_size, call_model


def measure_latency(
    model: nn.Module,
    example_input: Any,
    *,
    threads: int | None = None,
    min_run_time: float = 0.3,
    forward_fn: ForwardFn | None = None,
) -> dict[str, Any]:
    """Median / IQR forward latency in milliseconds of ``model(example_input)`` in eval mode.

    The input takes any structure :mod:`tensorslim.inputs` accepts (or ``forward_fn``).

    ``threads`` defaults to ``torch.get_num_threads()``; it is recorded with the result because
    latency depends on it more than on anything else on a CPU.
    """
    threads = threads or torch.get_num_threads()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            call_model(model, example_input, forward_fn)  # warm-up: allocator, lazy init
            timer = benchmark.Timer(
                stmt="call_model(model, x, forward_fn)",
                globals={
                    "model": model,
                    "x": example_input,
                    "forward_fn": forward_fn,
                    "call_model": call_model,
                },
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
        "batch": batch_size(example_input),
    }
