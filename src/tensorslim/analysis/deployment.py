"""The setting a latency is measured for, and how one module is run in it.

A latency means nothing without its setting: on a CPU it depends on the batch size, the number
of threads, the memory format (NCHW or channels_last), the dtype and the backend (PyTorch eager,
``torch.compile`` with its inductor backend, or ONNX Runtime). :class:`Deployment` names that
setting; :func:`make_runner` turns a module and an input into a zero-argument callable that
runs one forward pass there, which :mod:`tensorslim.analysis.timing` times.
"""

from __future__ import annotations

import copy
import io
import itertools
import time
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.inputs import ForwardFn, batch_size, call_model, map_tensors
from tensorslim.surgery import copy_structure

FORMATS = ("nchw", "channels_last")  # the layouts a model is run and timed in
AUTO = "auto"  # plan() times both and keeps the faster (tensorslim.planner.memory_format)
BACKENDS = ("eager", "compile", "onnxruntime")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

Runner = Callable[[], Any]


@dataclass(frozen=True)
class Deployment:
    """Where a model will run: ``batch`` size, ``threads``, ``memory_format`` ("nchw" or
    "channels_last", applied to 4-D inputs and conv weights; "auto", the default: ``plan()``
    times a convolutional model in both and plans in the faster, see
    :mod:`tensorslim.planner.memory_format`; a runner given "auto" runs the tensors as they
    are, NCHW), ``dtype`` ("float32", "bfloat16") and ``backend``: "eager", "compile"
    (``torch.compile``, inductor: C++ kernels built by a C++ compiler; a plan times single
    layers eagerly and whole models compiled, see :func:`layer_deployment`; inductor picks
    its own convolution layouts, so "auto" plans in NCHW only) or "onnxruntime" (which picks
    its own layouts, so the memory format does not apply there)."""

    batch: int = 1
    threads: int = 1
    memory_format: str = AUTO
    backend: str = "eager"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("batch", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TensorslimError(f"deployment {name}={value!r} must be a positive integer")
        checks = (
            ("memory_format", (*FORMATS, AUTO)),
            ("backend", BACKENDS),
            ("dtype", tuple(DTYPES)),
        )
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise TensorslimError(
                    f"deployment {name}={getattr(self, name)!r}: use one of {', '.join(allowed)}"
                )
        if self.backend == "onnxruntime" and self.dtype != "float32":
            raise TensorslimError("deployment backend=onnxruntime runs float32 only: drop dtype")

    @property
    def key(self) -> str:
        """A stable text naming the setting (part of every latency cache key)."""
        return f"b{self.batch}-t{self.threads}-{self.memory_format}-{self.backend}-{self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def in_format(self, memory_format: str) -> Deployment:
        """The same setting in another memory format."""
        return replace(self, memory_format=memory_format)

    @classmethod
    def parse(cls, text: str) -> Deployment:
        """``"batch=8,threads=1,format=channels_last,backend=onnxruntime"`` (any subset)."""
        fields: dict[str, Any] = {}
        aliases = {"format": "memory_format", "memory_format": "memory_format"}
        for part in (p for p in text.split(",") if p.strip()):
            key, sep, value = (s.strip() for s in part.partition("="))
            key = aliases.get(key, key)
            if not sep or key not in {"batch", "threads", "memory_format", "backend", "dtype"}:
                raise TensorslimError(
                    f"bad deployment '{text}': write e.g. batch=8,threads=1,"
                    "format=channels_last,backend=eager"
                )
            try:
                fields[key] = int(value) if key in {"batch", "threads"} else value
            except ValueError:
                raise TensorslimError(
                    f"bad deployment '{text}': {key} must be an integer"
                ) from None
        return cls(**fields)

    @classmethod
    def coerce(
        cls, value: Deployment | str | dict[str, Any] | None, example: Any = None
    ) -> Deployment:
        """A ``Deployment``, its text form, a mapping, or ``None``: the example's batch size
        (1 without one) at the current ``torch.get_num_threads()``, memory format "auto",
        eager."""
        if value is None:
            return cls(batch=_batch_or_one(example), threads=torch.get_num_threads())
        if isinstance(value, Deployment):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict):
            return cls(**value)
        raise TensorslimError(
            f"a deployment is Deployment(...) or 'batch=1,threads=1', not {value!r}"
        )


def _batch_or_one(example: Any) -> int:
    try:
        return batch_size(example) if example is not None else 1
    except TensorslimError:  # an input without a batched tensor (a forward_fn's own object)
        return 1


def at_batch(example: Any, batch: int) -> Any:
    """``example`` with its first sample repeated to ``batch`` samples (dimension 0)."""
    return map_tensors(
        example, lambda t: t[:1].expand(batch, *t.shape[1:]).contiguous() if t.dim() else t
    )


def prepare(module: nn.Module, example: Any, deployment: Deployment) -> tuple[nn.Module, Any]:
    """``module`` in eval mode and ``example``, in the deployment's dtype and layout: a copy,
    unless ``module`` is already in eval mode and needs no conversion (then itself).

    The copy is of the structure only (:func:`~tensorslim.surgery.copy_structure`): tensors
    already in the deployment's dtype and layout are ``module``'s own, so a whole model is
    not held twice (nor deep-copied, 0.1-0.3 CPU-s for a resnet56) to time it.
    """
    dtype = DTYPES[deployment.dtype]
    channels_last = deployment.memory_format == "channels_last"

    def convert(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype) if t.is_floating_point() else t
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    if _ready(module, dtype, channels_last):
        # nothing to convert and already in eval mode: timing reads the module, never writes
        # it, so the copy would only cost (the planner's ~200 layer variants per resnet56)
        return module, map_tensors(example, convert)
    return copy_structure(module, convert).eval(), map_tensors(example, convert)


def _ready(module: nn.Module, dtype: torch.dtype, channels_last: bool) -> bool:
    """``module`` in eval mode with every floating tensor in ``dtype`` and NCHW (the default
    layout; channels_last always converts)."""
    if channels_last or any(m.training for m in module.modules()):
        return False
    tensors = itertools.chain(module.parameters(), module.buffers())
    return all(t.dtype == dtype for t in tensors if t.is_floating_point())


def layer_deployment(deployment: Deployment) -> Deployment:
    """The setting single layers are timed in for a plan at ``deployment``: itself, except
    that a "compile" deployment's layers are timed eagerly — compiling one candidate layer
    took 3-4 s of wall time here (resnet56's 18 layer timings hold ~160 variants), so the
    planner ranks options by their eager times and times whole models compiled."""
    return replace(deployment, backend="eager") if deployment.backend == "compile" else deployment


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block, the previous count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class CompiledRunner:
    """A runner of a ``torch.compile`` d module; ``setup_s``: the wall seconds its compilation
    (the first call) took, paid before any timing and never part of one."""

    run: Runner
    setup_s: float

    def __call__(self) -> Any:
        return self.run()


def make_runner(
    module: nn.Module,
    example: Any,
    deployment: Deployment,
    forward_fn: ForwardFn | None = None,
    warm_up: bool = True,
) -> Runner:
    """A callable running one forward pass of ``module`` on ``example`` in ``deployment``.

    ``example`` already has the deployment's batch size. Eager and compiled runners run under
    ``torch.inference_mode``; the caller sets the thread count (see ``torch_threads``; a
    compiled module is compiled here, at the deployment's threads: inductor's kernels keep
    the thread count they were built with). ``warm_up``: run it once first (oneDNN primitive
    creation, the allocator); :func:`~tensorslim.analysis.timing.time_interleaved` passes
    False, its first calls (sizing the rounds) are the warm-up.
    """
    if deployment.backend == "onnxruntime":
        return _onnx_runner(module, example, deployment)
    module, x = prepare(module, example, deployment)
    if deployment.backend == "compile":
        return _compiled_runner(module, x, deployment, forward_fn, warm_up)

    def run() -> Any:
        with torch.inference_mode():
            return call_model(module, x, forward_fn)

    if warm_up:
        run()
    return run


def compile_unavailable() -> str | None:
    """Why ``backend="compile"`` cannot run on this machine, or ``None`` when it can."""
    try:
        import torch._dynamo
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError as exc:
        return f"this torch build has no torch.compile/inductor ({exc})"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    try:
        get_cpp_compiler()
    except Exception:  # inductor raises its own InvalidCxxCompiler
        return (
            "torch.compile's inductor builds C++ kernels on CPU and found no C++ compiler "
            "(g++; or set CXX): install one (e.g. apt-get install g++)"
        )
    return None


def require_backend(deployment: Deployment) -> None:
    """Raise a one-line error when the deployment's backend cannot run here."""
    if deployment.backend == "compile":
        reason = compile_unavailable()
        if reason is not None:
            raise TensorslimError(f"deployment backend=compile: {reason}, or use backend=eager")


def _entry_point(module: nn.Module, forward_fn: ForwardFn | None) -> Callable[[Any], Any]:
    """``x ↦ module(x)`` as a function with a code object of its own.

    Dynamo keeps compiled graphs per code object and, past ``recompile_limit`` (8) graphs for
    one, silently runs it eagerly: ``torch.compile(module)`` of the 9th structure of one model
    class (planned structures, candidate layers) would be timed uncompiled. A fresh code object
    per runner keeps every runner's module compiled.
    """

    def call(x: Any) -> Any:
        return call_model(module, x, forward_fn)

    code = call.__code__.replace()  # a new code object with the same body
    return types.FunctionType(code, call.__globals__, call.__name__, None, call.__closure__)


def _compiled_runner(
    module: nn.Module,
    x: Any,
    deployment: Deployment,
    forward_fn: ForwardFn | None,
    warm_up: bool,
) -> CompiledRunner:
    """``torch.compile(module)`` (inductor, static shapes), compiled by a first call at the
    deployment's thread count (and, with ``warm_up``, run once more)."""
    require_backend(deployment)
    compiled = torch.compile(_entry_point(module, forward_fn), dynamic=False)

    def run() -> Any:
        with torch.inference_mode():
            return compiled(x)

    start = time.perf_counter()
    try:
        with torch_threads(deployment.threads):
            run()
    except Exception as exc:  # dynamo and inductor raise many types; one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TensorslimError(
            f"backend=compile: torch.compile failed on {type(module).__name__} ({first}): "
            "time it with backend=eager or backend=onnxruntime"
        ) from exc
    setup = time.perf_counter() - start
    if warm_up:
        with torch_threads(deployment.threads):
            run()
    return CompiledRunner(run, setup)


def _onnx_runner(module: nn.Module, example: Any, deployment: Deployment) -> Runner:
    """Export ``module`` to ONNX in memory and run it in an ONNX Runtime CPU session."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise TensorslimError(
            "backend=onnxruntime needs onnxruntime: pip install 'tensorslim[onnx]'"
        ) from None
    if not isinstance(example, torch.Tensor):
        raise TensorslimError("backend=onnxruntime times models with one tensor input only")
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            copy.deepcopy(module).eval(), (example,), buffer, input_names=["x"], dynamo=False
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = deployment.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": example.detach().numpy()}

    def run() -> Any:
        return session.run(None, feed)

    run()
    return run
