"""backend="compile": torch.compile runners, and plans that time layers eagerly and whole
models compiled. Most tests swap inductor for dynamo's own "eager" backend (a trace, no C++
build: fast); one compiles with inductor for real."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.deployment import (
    CompiledRunner,
    Deployment,
    compile_unavailable,
    layer_deployment,
    make_runner,
)
from tensorslim.errors import TensorslimError

COMPILE = Deployment(batch=2, threads=1, backend="compile")


@pytest.fixture
def traced_only(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """torch.compile with dynamo's "eager" backend (graphs captured, no kernels built); the
    compiled callables are recorded."""
    real = torch.compile
    made: list[Any] = []

    def compile_eagerly(fn: Any, **kwargs: Any) -> Any:
        made.append(fn)
        return real(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    return made


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1), nn.ReLU()
    ).eval()


def test_the_backend_parses_and_layers_of_a_compiled_deployment_are_timed_eagerly() -> None:
    where = Deployment.parse("batch=2,threads=1,backend=compile")
    assert where == COMPILE and "compile" in where.key
    assert layer_deployment(where) == Deployment(batch=2, threads=1, backend="eager")
    assert layer_deployment(Deployment(backend="onnxruntime")).backend == "onnxruntime"


@pytest.mark.slow
@pytest.mark.skipif(compile_unavailable() is not None, reason="torch.compile cannot run here")
def test_an_inductor_runner_computes_the_module_and_reports_its_compile_time() -> None:
    torch.manual_seed(0)
    layer, x = nn.Linear(16, 8).eval(), torch.randn(2, 16)
    run = make_runner(layer, x, COMPILE)
    assert isinstance(run, CompiledRunner) and run.setup_s > 0
    assert torch.allclose(run(), layer(x).detach(), atol=1e-5)
    timed = ts.time_models({"linear": layer}, x, COMPILE)["linear"]
    assert timed.setup_s > 0 and timed.ms > 0


def test_every_runner_stays_compiled_past_dynamos_recompile_limit(traced_only: list) -> None:
    """Dynamo runs a code object eagerly after 8 compiled graphs: the 9th+ structure of one
    model class would silently be timed uncompiled. Each runner has its own entry point."""
    from torch._dynamo.utils import counters

    x = torch.randn(2, 4, 6, 6)
    before = counters["stats"]["unique_graphs"]
    for width in range(4, 14):  # 10 structures of one class
        make_runner(nn.Sequential(nn.Conv2d(4, width, 3), nn.ReLU()), x, COMPILE)
    assert counters["stats"]["unique_graphs"] - before == 10
    assert len(traced_only) == 10


def test_a_compiled_plan_times_layers_eagerly_and_the_whole_models_compiled(
    traced_only: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorslim.analysis.timing as timing

    backends: list[set[str]] = []
    real = timing.make_runner

    def recorded(module: nn.Module, x: Any, where: Deployment, *args: Any, **kw: Any) -> Any:
        backends.append({where.backend, type(module).__name__})
        return real(module, x, where, *args, **kw)

    monkeypatch.setattr(timing, "make_runner", recorded)
    model, x = convnet(), torch.randn(1, 8, 16, 16)
    plan = ts.plan(model, "svd", "flops=0.5", x, deployment=COMPILE, allow_slower=False)
    record = plan.latency
    assert record["deployment"]["backend"] == "compile"
    assert record["deployment"]["memory_format"] == "nchw"  # inductor picks its own layouts
    assert record["layers_timed_at"]["backend"] == "eager" and record["compile_s"] > 0
    # the layers (Conv2d and their factorizations) eagerly, whole models (Sequential) compiled
    assert {"compile", "Sequential"} in backends
    assert all("eager" in b for b in backends if "Sequential" not in b)
    assert all("compile" in b for b in backends if "Sequential" in b)
    assert len(traced_only) == sum("compile" in b for b in backends)


def test_compile_without_a_cxx_compiler_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler() -> str:
        raise RuntimeError("InvalidCxxCompiler")

    monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", no_compiler)
    assert "no C++ compiler" in str(compile_unavailable())
    with pytest.raises(TensorslimError, match=r"backend=compile: .*apt-get install g\+\+"):
        ts.plan(convnet(), "svd", "flops=0.5", torch.randn(1, 8, 16, 16), deployment=COMPILE)
    with pytest.raises(TensorslimError, match=r"no C\+\+ compiler"):
        make_runner(nn.Linear(4, 4), torch.randn(2, 4), COMPILE)


def test_a_failing_compilation_is_one_line_naming_the_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(fn: Any, **kwargs: Any) -> Any:
        def run(*args: Any) -> Any:
            raise RuntimeError("C++ compile error: foo.cpp:1: bad\nmany more lines")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(TensorslimError) as caught:
        make_runner(nn.Linear(4, 4), torch.randn(2, 4), COMPILE)
    message = str(caught.value)
    assert "\n" not in message and "failed on Linear (C++ compile error: foo.cpp:1: bad)" in message
    assert "backend=eager" in message
