"""Honest, stable latency: interleaved repeated timing, and a latency cache.

Timing a variant once, alone, on a shared machine measures the machine as much as the variant.
:func:`time_interleaved` runs the variants of one comparison in rounds — every round runs each
variant once (a ``torch.utils.benchmark`` ``timeit`` of enough iterations to last
``round_time``) in a rotated order, so no variant always follows the same other one and pays for
its cache misses — until no variant's best round has improved for ``patience`` rounds. It
reports each variant's best round, median and IQR; decisions use the best round, because other
processes on a shared CPU only ever add time (on this project's 2-core machine at load 13 a
conv's median was 3-10× its best round, the best round stable within 5 %).

:func:`time_against_reference` times structured variants of one layer interleaved with the
layer's dense form; a variant's latency is its ratio to the dense layer in that run times
the dense layer's reference latency (its first measurement), so variants timed in different runs,
under a different machine load, stay comparable. :class:`LatencyCache` keeps those numbers keyed
by the module's structure, the input shape, the deployment, the machine and the library versions
— passed explicitly, never global — and can live in a JSON file so replanning is cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

from tensorslim.analysis.deployment import Deployment, Runner, at_batch, make_runner
from tensorslim.errors import TensorslimError
from tensorslim.inputs import ForwardFn

REFERENCE = "dense"


@dataclass(frozen=True)
class Timing:
    """ms per forward pass over ``rounds`` interleaved rounds: the best round (``min_ms``), the
    median and the interquartile range. ``ms`` is the estimate decisions use: ``min_ms``,
    because on a shared CPU other processes only ever add time to a run (the median of a loaded
    machine measures the load); on a quiet machine the two agree."""

    min_ms: float
    median_ms: float
    iqr_ms: float
    rounds: int

    @property
    def ms(self) -> float:
        return self.min_ms


def time_interleaved(
    runners: dict[str, Runner],
    threads: int,
    *,
    min_rounds: int = 15,
    max_rounds: int = 80,
    patience: int = 10,
    tolerance: float = 0.01,
    round_time: float = 0.001,
) -> dict[str, Timing]:
    """Per-runner latency, the runners timed in interleaved, rotated rounds.

    A round runs every runner once (``number`` iterations lasting about ``round_time``). After
    ``min_rounds`` it stops once no runner's best round improved by more than ``tolerance`` in
    the last ``patience`` rounds (at most ``max_rounds``).
    """
    if not runners:
        return {}
    timers = {
        name: benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads)
        for name, run in runners.items()
    }
    numbers = {name: _iterations(timer, round_time) for name, timer in timers.items()}
    samples: dict[str, list[float]] = {name: [] for name in runners}
    names, settled = list(runners), 0
    for r in range(max_rounds):
        best_before = {n: min(s, default=math.inf) for n, s in samples.items()}
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timers[name].timeit(numbers[name]).median)
        improved = any(min(samples[n]) < (1 - tolerance) * best_before[n] for n in names)
        settled = 0 if improved else settled + 1
        if r + 1 >= min_rounds and settled >= patience:
            break
    return {name: _summary(s) for name, s in samples.items()}


def _iterations(timer: benchmark.Timer, round_time: float) -> int:
    """Iterations per round so one round of this runner lasts about ``round_time`` seconds."""
    once = min(timer.timeit(1).median for _ in range(3))  # also a warm-up
    return max(1, min(1000, math.ceil(round_time / max(once, 1e-7))))


def _summary(seconds: list[float]) -> Timing:
    ordered = sorted(seconds)
    q1, q3 = ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]
    return Timing(ordered[0] * 1e3, statistics.median(ordered) * 1e3, (q3 - q1) * 1e3, len(ordered))


def machine_key() -> str:
    """The CPU and library versions a latency was measured with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), cpu)
    except OSError:
        pass
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = "none"
    return f"{cpu}|{os.cpu_count()}cpu|torch{torch.__version__}|ort{ort}"


class LatencyCache:
    """Latencies (ms) keyed by module structure, input shape, deployment and machine.

    In memory by default; with ``path`` it is read from and :meth:`save` d to a JSON file. One
    instance is passed explicitly to whatever measures (the planner, export's merge-back).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, float] = {}
        self._machine = machine_key()
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise TensorslimError(
                    f"latency cache {self.path} is not valid JSON ({exc}): delete it"
                ) from None
            self.entries = {str(k): float(v) for k, v in data.get("entries", {}).items()}

    def key(self, module: nn.Module, shape: tuple[int, ...], deployment: Deployment) -> str:
        """A digest of everything the latency depends on."""
        text = "|".join(
            (type(module).__qualname__, repr(module), str(tuple(shape)), deployment.key)
        )
        return hashlib.sha1(f"{text}|{self._machine}".encode()).hexdigest()

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def put(self, key: str, ms: float) -> None:
        self.entries[key] = float(ms)

    def save(self) -> None:
        if self.path is None:
            return
        from tensorslim.train.checkpoint import atomic_write_text

        atomic_write_text(
            self.path, json.dumps({"machine": self._machine, "entries": self.entries})
        )


def layer_input(shape: tuple[int, ...], deployment: Deployment) -> torch.Tensor:
    """A random input of a layer's recorded shape at the deployment's batch size."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn((deployment.batch, *shape[1:]), generator=generator)


def time_against_reference(
    dense: nn.Module,
    variants: dict[str, nn.Module],
    shape: tuple[int, ...],
    deployment: Deployment,
    cache: LatencyCache,
) -> tuple[float, dict[str, float]]:
    """(dense ms, variant name → ms) of one layer at input ``shape`` (batch replaced).

    Uncached variants are timed interleaved with ``dense``; each gets its ratio to dense in
    that run times dense's reference latency (the first one measured and cached).
    """
    dense_key = cache.key(dense, shape, deployment)
    keys = {name: cache.key(m, shape, deployment) for name, m in variants.items()}
    todo = {name: m for name, m in variants.items() if cache.get(keys[name]) is None}
    if todo or cache.get(dense_key) is None:
        x = layer_input(shape, deployment)
        runners = {REFERENCE: make_runner(dense, x, deployment)}
        runners.update({name: make_runner(m, x, deployment) for name, m in todo.items()})
        timed = time_interleaved(runners, deployment.threads)
        if cache.get(dense_key) is None:
            cache.put(dense_key, timed[REFERENCE].ms)
        reference = cache.get(dense_key)
        assert reference is not None
        for name in todo:
            ratio = timed[name].ms / timed[REFERENCE].ms
            cache.put(keys[name], ratio * reference)
    dense_ms = cache.get(dense_key)
    assert dense_ms is not None
    return dense_ms, {name: float(cache.get(k)) for name, k in keys.items()}  # type: ignore[arg-type]


def time_models(
    models: dict[str, nn.Module],
    example: Any,
    deployment: Deployment,
    forward_fn: ForwardFn | None = None,
) -> dict[str, Timing]:
    """Whole models on ``example`` (its first sample repeated to the deployment's batch),
    interleaved; never cached (a whole model is timed to check the per-layer prediction)."""
    x = at_batch(example, deployment.batch)
    runners = {name: make_runner(m, x, deployment, forward_fn) for name, m in models.items()}
    return time_interleaved(runners, deployment.threads, min_rounds=20)


def load_average() -> float:
    """The 1-minute load average (0 where the platform has none): a busy machine skews timing."""
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return 0.0
