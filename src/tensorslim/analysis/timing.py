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
same for whole models). A layer's comparison uses short rounds (:data:`LAYER_ROUNDS`), and a
variant measured ≥ 10 % slower than the dense layer over the first rounds is not run again (the
never-slower rule drops it whatever more rounds would say); a whole model's a few more
(:data:`MODEL_ROUNDS`), stopped once the models' bests hold relative to each other (a ratio is
all one run's comparison uses). :class:`LatencyCache` keeps those numbers keyed
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
from collections.abc import Mapping
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
    # a runner timed against a reference (time_interleaved's ``references``): the reference's
    # best CPU-time round (ms) over the same rounds as this runner's, the ratio's denominator
    reference_ms: float | None = None

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
    references: Mapping[str, str] | None = None,
    drop_slower: float | None = None,
    relative: bool = False,
) -> dict[str, Timing]:
    """Per-runner latency, the runners timed in interleaved, rotated rounds.

    A round runs every runner once (``number`` iterations lasting about ``round_time``). After
    ``min_rounds`` it stops once no runner's best round improved by more than ``tolerance`` in
    the last ``patience`` rounds (at most ``max_rounds``) — or, with ``stable``, after
    :data:`AGREE_ROUNDS` rounds as soon as every runner's median round is within ``stable`` of
    its best (the rounds agree: on a quiet machine more of them would not move the best).

    ``references`` (runner → the runner it is compared to, e.g. a variant → its dense layer):
    each such runner's :attr:`Timing.reference_ms` is its reference's best round over the same
    rounds as its own. With ``drop_slower`` too, a runner whose best is at least
    (1 + ``drop_slower``) × its reference's over the same rounds after min(``min_rounds``,
    :data:`AGREE_ROUNDS`) rounds is clearly slower than its reference: it is not run again, and
    the stopping rules above watch only the runners still running (at batch 1 about half of
    resnet56's layer variants are ≥ 10 % slower than dense and are dropped by the never-slower
    rule whatever more rounds would say). Our own loop rather than
    ``torch.utils.benchmark.Timer``: each round is read on two clocks (CPU and wall) at once.
    """
    if not runners:
        return {}
    names = list(runners)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    rule = _StopRule(min_rounds, patience, tolerance, stable, relative)
    pairs = {n: r for n, r in (references or {}).items() if n in runners and r in runners}
    with torch_threads(threads):
        numbers = {n: _iterations(runners[n], round_time) for n in names}
        active = list(names)
        for r in range(max_rounds):
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                if n in active:
                    c, w = _one_round(runners[n], numbers[n])
                    cpu[n].append(c / threads)
                    wall[n].append(w)
            if rule.all_settled({n: cpu[n] for n in active}):
                break
            if drop_slower is not None and r + 1 >= min(min_rounds, AGREE_ROUNDS):
                slower = 1 + drop_slower
                active = [n for n in active if n not in pairs or _best(cpu, n, pairs[n]) < slower]
    return {
        n: Timing(
            min(cpu[n]) * 1e3,
            min(wall[n]) * 1e3,
            statistics.median(wall[n]) * 1e3,
            len(cpu[n]),
            float(getattr(runners[n], "setup_s", 0.0)),
            _paired(cpu, n, pairs[n]) * 1e3 if n in pairs else None,
        )
        for n in names
    }


def _paired(cpu: dict[str, list[float]], name: str, reference: str) -> float:
    """The reference's best round over the rounds ``name`` ran (both run from round one)."""
    return min(cpu[reference][: len(cpu[name])])


def _best(cpu: dict[str, list[float]], name: str, reference: str) -> float:
    """``name``'s best round over its reference's best in the same rounds."""
    return min(cpu[name]) / _paired(cpu, name, reference)


@dataclass(frozen=True)
class _StopRule:
    """:func:`time_interleaved`'s stopping rules, on the rounds (CPU seconds) taken so far."""

    min_rounds: int
    patience: int
    tolerance: float
    stable: float | None
    relative: bool = False

    def all_settled(self, cpu: dict[str, list[float]]) -> bool:
        """Every runner at once (the rounds run together): no best improved in the last
        ``patience`` rounds after ``min_rounds`` (``relative``: none moved against the others,
        :meth:`_held_relative`), or every runner's rounds agree."""
        n = len(next(iter(cpu.values())))
        if n >= self.min_rounds:
            if self.relative and self._held_relative(cpu):
                return True
            if all(self._unimproved(v, self.patience) for v in cpu.values()):
                return True
        return n >= min(self.min_rounds, AGREE_ROUNDS) and _agree(cpu, self.stable)

    def _held_relative(self, cpu: dict[str, list[float]]) -> bool:
        """Over the last ``patience`` rounds the runners' bests moved together: each best's
        improvement factor b_then / b_now within ``tolerance`` of every other's (their ratios,
        which is all a comparison in one run uses, held)."""
        n = len(next(iter(cpu.values())))
        if n <= self.patience:
            return False
        factors = [min(v[: n - self.patience]) / min(v) for v in cpu.values()]
        return max(factors) <= (1 + self.tolerance) * min(factors)

    def _unimproved(self, rounds: list[float], last: int) -> bool:
        """No round among the ``last`` few improved the best before it by over ``tolerance``."""
        if len(rounds) <= last:
            return False
        best = min(rounds[:-last])
        for x in rounds[-last:]:
            if x < (1 - self.tolerance) * best:
                return False
            best = min(best, x)
        return True


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
# few per cent, not a long benchmark); a variant ≥ 10 % slower than dense after 4 rounds stops
# (resnet56 at batch 1: about half the variant rounds went to such variants). 0.2 ms rounds:
# resnet56 convs against 6 factorizations each, 3 repeats at load 6-8, gave variant/dense
# ratios spread 1.5-4 % (median) with 0.2 ms and with 0.3 ms rounds, the 0.2 ms ones for
# 20-35 % less CPU
LAYER_ROUNDS: dict[str, Any] = {
    "min_rounds": 4,
    "patience": 2,
    "round_time": 0.0002,
    "stable": 0.02,
    "drop_slower": 0.1,
}
# whole models: the prediction, a few more rounds (one forward is one round), or 4 that agree;
# "relative": the rounds also stop once every model's best improved alike for 3 rounds (a
# quieter machine speeds all of them; their ratios, the prediction, held). resnet56 at batch 1,
# 4 models in 2 layouts: up to 12 rounds → 4–6
MODEL_ROUNDS: dict[str, Any] = {"min_rounds": 6, "patience": 3, "stable": 0.02, "relative": True}


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
    references: dict[str, str] = {}  # run name → its group's dense run
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
            references.update({_run_name(g, n): _run_name(g, REFERENCE) for n in missing})
    if todo:
        threads = {where.threads for _, where in todo.values()}
        if len(threads) != 1:
            raise TensorslimError("models timed in one run need one thread count: give one")
        timed = time_interleaved(runners(todo), threads.pop(), **rounds, references=references)
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
                    t = timed[_run_name(g, n)]
                    cache.put(key, t.ms / (t.reference_ms or here) * reference)
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
