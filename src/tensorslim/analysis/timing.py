"""Honest, stable latency: interleaved repeated timing, and a latency cache.

Timing a variant once, alone, on a shared machine measures the machine as much as the variant.
:func:`time_interleaved` runs the variants of one comparison in rounds — every round runs each
variant once (enough iterations to last ``round_time``) in a rotated order, so no variant always
follows the same other one and pays for its cache misses — until no variant's best round has
improved for ``patience`` rounds. Decisions use the best round's process CPU time (see
:class:`Timing`): on this project's shared 2-core machine at load 13-16 a conv's wall-clock
median was 3-10× its best round, and a 90 ms whole ResNet-18 rarely ran one round untouched,
while its best CPU-time round was stable within a few per cent.

:func:`time_against_reference` times structured variants of one layer interleaved with the
layer's dense form; a variant's latency is its ratio to the dense layer in that run times
the dense layer's reference latency (its first measurement), so variants timed in different runs,
under a different machine load, stay comparable (:func:`time_models_against_reference` does the
same for whole models). A layer's comparison uses short rounds (:data:`LAYER_ROUNDS`), a whole
model's a few more (:data:`MODEL_ROUNDS`). :class:`LatencyCache` keeps those numbers keyed
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.analysis.deployment import (
    Deployment,
    Runner,
    at_batch,
    make_runner,
    torch_threads,
)
from tensorslim.errors import TensorslimError
from tensorslim.inputs import ForwardFn, Inputs, first_tensor_shape

REFERENCE = "dense"
# the fewest rounds the agreement rule (time_interleaved's ``stable``) stops at: 4, so each
# model of a two-layout run (dense and planned in each) runs once in every position
AGREE_ROUNDS = 4


@dataclass(frozen=True)
class Timing:
    """ms per forward pass over ``rounds`` interleaved rounds.

    ``cpu_ms``: the best round's process CPU time per pass divided by the thread count — the
    estimate decisions use (:attr:`ms`). Other processes on a shared CPU add wall time to a run
    whenever they take its core; CPU time only counts the time the run was on one, and the best
    round is the one least slowed by a neighbour sharing the core's caches. With one thread it
    is the latency of an idle machine; with more, it assumes the threads stay busy (OpenMP
    threads spin while they wait, so they do). ``wall_ms`` / ``wall_median_ms``: the best and
    median round by the wall clock, recorded beside it (on a quiet machine all three agree).
    ``setup_s``: the wall seconds the runner's one-off set-up took before timing (a
    ``torch.compile`` d module's compilation; 0 for eager and ONNX Runtime), never part of ``ms``.
    """

    cpu_ms: float
    wall_ms: float
    wall_median_ms: float
    rounds: int
    setup_s: float = 0.0

    @property
    def ms(self) -> float:
        return self.cpu_ms


def time_interleaved(
    runners: dict[str, Runner],
    threads: int,
    *,
    min_rounds: int = 8,
    max_rounds: int = 40,
    patience: int = 6,
    tolerance: float = 0.01,
    round_time: float = 0.001,
    stable: float | None = None,
) -> dict[str, Timing]:
    """Per-runner latency, the runners timed in interleaved, rotated rounds.

    A round runs every runner once (``number`` iterations lasting about ``round_time``). After
    ``min_rounds`` it stops once no runner's best round improved by more than ``tolerance`` in
    the last ``patience`` rounds (at most ``max_rounds``) — or, with ``stable``, after
    :data:`AGREE_ROUNDS` rounds as soon as every runner's median round is within ``stable`` of
    its best (the rounds agree: on a quiet machine more of them would not move the best). Our
    own loop rather than ``torch.utils.benchmark.Timer``: each round is read on two clocks (CPU
    and wall) at once.
    """
    if not runners:
        return {}
    names = list(runners)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    with torch_threads(threads):
        numbers = {n: _iterations(runners[n], round_time) for n in names}
        settled = 0
        for r in range(max_rounds):
            best_before = {n: min(cpu[n], default=math.inf) for n in names}
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                c, w = _one_round(runners[n], numbers[n])
                cpu[n].append(c / threads)
                wall[n].append(w)
            improved = any(min(cpu[n]) < (1 - tolerance) * best_before[n] for n in names)
            settled = 0 if improved else settled + 1
            if r + 1 >= min_rounds and settled >= patience:
                break
            if r + 1 >= min(min_rounds, AGREE_ROUNDS) and _agree(cpu, stable):
                break
    return {
        n: Timing(
            min(cpu[n]) * 1e3,
            min(wall[n]) * 1e3,
            statistics.median(wall[n]) * 1e3,
            len(cpu[n]),
            float(getattr(runners[n], "setup_s", 0.0)),
        )
        for n in names
    }


def _agree(rounds: dict[str, list[float]], stable: float | None) -> bool:
    """Every runner's median round within ``stable`` (relative) of its best one."""
    if stable is None:
        return False
    return all(statistics.median(v) <= (1 + stable) * min(v) for v in rounds.values())


def _one_round(run: Runner, number: int) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) per call over ``number`` calls of ``run``."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(number):
        run()
    return (time.process_time() - c0) / number, (time.perf_counter() - w0) / number


def _iterations(run: Runner, round_time: float) -> int:
    """Calls per round so one round of this runner lasts about ``round_time`` seconds (a
    runner whose one call already lasts that long is not called again: a whole model).
    These calls are the runner's warm-up (runners are made without one)."""
    once = _one_round(run, 1)[1]
    if once < round_time:  # the first call may be cold: the fastest of three sizes the round
        once = min(once, *(_one_round(run, 1)[1] for _ in range(2)))
    return max(1, min(1000, math.ceil(round_time / max(once, 1e-7))))


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
    ``setup_s``: the wall seconds spent setting up the runners this instance's timings came
    from (compiling, for ``backend="compile"``), for reports; not saved.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, float] = {}
        self.setup_s = 0.0
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


# a layer's comparison: short rounds, stopped once the best round held for 2 rounds or the
# rounds agree within 2 % (a layer is timed once per signature and plan; its decisions need a
# few per cent, not a long benchmark). 0.2 ms rounds: resnet56 convs against 6 factorizations
# each, 3 repeats at load 6-8, gave variant/dense ratios spread 1.5-4 % (median) with 0.2 ms
# and with 0.3 ms rounds, the 0.2 ms ones for 20-35 % less CPU
LAYER_ROUNDS: dict[str, Any] = {
    "min_rounds": 4,
    "patience": 2,
    "round_time": 0.0002,
    "stable": 0.02,
}
# whole models: the prediction, a few more rounds (one forward is one round), or 4 that agree
MODEL_ROUNDS: dict[str, Any] = {"min_rounds": 6, "patience": 3, "stable": 0.02}


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

    def runners(todo: dict[str, tuple[nn.Module, Deployment]]) -> dict[str, Runner]:
        x = layer_arguments(dense, layer_input(shape, deployment))
        return {name: make_runner(m, x, deployment, warm_up=False) for name, (m, _) in todo.items()}

    groups = {REFERENCE: (dense, variants, deployment)}
    return _against_reference(groups, shape, cache, runners, LAYER_ROUNDS)[REFERENCE]


def layer_arguments(layer: nn.Module, x: torch.Tensor) -> Any:
    """What ``layer`` (and its structured variants, which share its call signature) is called
    with to time it on input ``x``: an ``nn.MultiheadAttention`` as self-attention, query = key
    = value = x without the weights (as ``nn.TransformerEncoderLayer`` calls it); every other
    layer on ``x`` alone."""
    if isinstance(layer, nn.MultiheadAttention):
        return Inputs((x, x, x), {"need_weights": False})
    return x


def time_models_against_reference(
    dense: nn.Module,
    variants: dict[str, nn.Module],
    example: Any,
    deployment: Deployment,
    cache: LatencyCache,
    forward_fn: ForwardFn | None = None,
) -> tuple[float, dict[str, float]]:
    """(dense ms, variant name → ms) of whole models on ``example`` (its first sample repeated
    to the deployment's batch), cached like :func:`time_against_reference`: a variant's ratio
    to ``dense`` comes from one interleaved run, so a loaded machine slows both alike."""
    groups = {REFERENCE: (dense, variants, deployment)}
    return time_models_in_deployments(groups, example, cache, forward_fn)[REFERENCE]


# a group: a dense model, its variants (name → module), and the deployment all of them run in
Group = tuple[nn.Module, dict[str, nn.Module], Deployment]


def time_models_in_deployments(
    groups: dict[str, Group],
    example: Any,
    cache: LatencyCache,
    forward_fn: ForwardFn | None = None,
) -> dict[str, tuple[float, dict[str, float]]]:
    """:func:`time_models_against_reference` for several groups at once (e.g. the dense model
    and its planned structure in NCHW and in channels_last): every group's uncached models run
    in **one** interleaved run, so each group's dense model is timed once and a load change
    during the run slows every group alike. Group name → (dense ms, variant name → ms)."""
    shape = tuple(first_tensor_shape(example))

    def runners(todo: dict[str, tuple[nn.Module, Deployment]]) -> dict[str, Runner]:
        out: dict[str, Runner] = {}
        for name, (m, where) in todo.items():
            x = at_batch(example, where.batch)
            out[name] = make_runner(m, x, where, forward_fn, warm_up=False)
        return out

    return _against_reference(groups, shape, cache, runners, MODEL_ROUNDS)


def _against_reference(
    groups: dict[str, Group],
    shape: tuple[int, ...],
    cache: LatencyCache,
    runners: Any,
    rounds: dict[str, Any],
) -> dict[str, tuple[float, dict[str, float]]]:
    """The cached ratio-to-reference timing behind the public functions above.

    ``runners(todo)`` turns ``{run name: (module, deployment)}`` into runners. Every group
    with an uncached variant or dense reference joins one interleaved run (with its dense
    model); a variant's ms is its ratio to its group's dense model in that run times the dense
    model's reference (its first measurement, cached).
    """
    todo: dict[str, tuple[nn.Module, Deployment]] = {}
    keys: dict[str, tuple[str, dict[str, str]]] = {}
    for g, (dense, variants, where) in groups.items():
        keys[g] = (
            cache.key(dense, shape, where),
            {n: cache.key(m, shape, where) for n, m in variants.items()},
        )
        missing = {n: m for n, m in variants.items() if cache.get(keys[g][1][n]) is None}
        if missing or cache.get(keys[g][0]) is None:
            todo[_run_name(g, REFERENCE)] = (dense, where)
            todo.update({_run_name(g, n): (m, where) for n, m in missing.items()})
    if todo:
        threads = {where.threads for _, where in todo.values()}
        if len(threads) != 1:
            raise TensorslimError("models timed in one run need one thread count: give one")
        timed = time_interleaved(runners(todo), threads.pop(), **rounds)
        cache.setup_s += sum(t.setup_s for t in timed.values())
        for g, (dense_key, variant_keys) in keys.items():
            if _run_name(g, REFERENCE) not in timed:
                continue
            here = timed[_run_name(g, REFERENCE)].ms
            if cache.get(dense_key) is None:
                cache.put(dense_key, here)
            reference = float(cache.get(dense_key))  # type: ignore[arg-type]
            for n, key in variant_keys.items():
                if _run_name(g, n) in timed:
                    cache.put(key, timed[_run_name(g, n)].ms / here * reference)
    return {
        g: (float(cache.get(d)), {n: float(cache.get(k)) for n, k in v.items()})  # type: ignore[arg-type]
        for g, (d, v) in keys.items()
    }


def _run_name(group: str, name: str) -> str:
    return f"{group}/{name}"


def time_models(
    models: dict[str, nn.Module],
    example: Any,
    deployment: Deployment,
    forward_fn: ForwardFn | None = None,
) -> dict[str, Timing]:
    """Whole models on ``example`` (its first sample repeated to the deployment's batch),
    interleaved; never cached (a whole model is timed to check the per-layer prediction)."""
    x = at_batch(example, deployment.batch)
    runners = {
        name: make_runner(m, x, deployment, forward_fn, warm_up=False) for name, m in models.items()
    }
    return time_interleaved(runners, deployment.threads, min_rounds=12)


def load_average() -> float:
    """The 1-minute load average (0 where the platform has none): a busy machine skews timing."""
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return 0.0
