"""Export a (compressed) model: ONNX (checked in onnxruntime), TorchScript, safetensors."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tensorslim.analysis.deployment import Deployment
from tensorslim.analysis.timing import LatencyCache, time_against_reference
from tensorslim.errors import TensorslimError
from tensorslim.layers.base import StructuredLayer
from tensorslim.plan import plans_of, refresh_plan, set_plans
from tensorslim.surgery import replace_module

FORMATS = ("onnx", "torchscript", "safetensors")


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    check: bool = True,
    atol: float = 1e-4,
) -> dict[str, float]:
    """Write ``model`` as ONNX and, with ``check``, compare onnxruntime's output with PyTorch's."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise TensorslimError(
            "ONNX export needs the onnx extra: pip install 'tensorslim[onnx]'"
        ) from None
    path = Path(path)
    model = model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    report = {"bytes": float(path.stat().st_size)}
    if check:
        report["max_abs_diff"] = check_onnx(model, example, path, atol)
    return report


def check_onnx(
    model: nn.Module, example: torch.Tensor, path: str | Path, atol: float = 1e-4
) -> float:
    """Run the ONNX file in onnxruntime; error if it differs from PyTorch by more than ``atol``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise TensorslimError(
            "checking ONNX needs onnxruntime: pip install 'tensorslim[onnx]'"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example.numpy()})[0]
    with torch.no_grad():
        want = model(example).numpy()
    diff = float(np.max(np.abs(got - want)))
    if diff > atol * max(1.0, float(np.max(np.abs(want)))):
        raise TensorslimError(
            f"ONNX output differs from PyTorch by {diff:.3g} (> {atol}) in {path}"
        )
    return diff


def export_torchscript(
    model: nn.Module, example: torch.Tensor, path: str | Path
) -> dict[str, float]:
    """Trace ``model`` to TorchScript and check the traced output equals the eager one."""
    model = model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, (example,), check_trace=False)
        diff = float((traced(example) - model(example)).abs().max())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
    return {"bytes": float(path.stat().st_size), "max_abs_diff": diff}


def merge_slow_layers(
    model: nn.Module,
    example: torch.Tensor,
    *,
    deployment: Deployment | str | dict | None = None,
    cache: LatencyCache | None = None,
) -> list[dict[str, Any]]:
    """Fold structured layers back to dense where the dense layer measures faster.

    Uses the measurements the plan recorded (each layer timed against its dense form at the
    plan's deployment, see :mod:`tensorslim.planner.latency`) when the plan was measured at
    ``deployment`` (default: the plan's own, else ``example``'s batch size); other layers are
    timed the same way now — interleaved with their ``to_dense()`` form at the input they see in
    ``model(example)``. Returns one decision row per layer; the model's plans are refreshed so
    ``save``/``load`` rebuild the merged structure.
    """
    planned, where = _planned_latencies(model, deployment, example)
    cache = cache if cache is not None else LatencyCache()
    shapes = _input_shapes(model, example)
    decisions = []
    for name, shape in shapes.items():
        module = model.get_submodule(name)
        dense = module.to_dense()
        if name in planned:
            (t_struct, t_dense), source = planned[name], "plan"
        else:
            t_dense, timed = time_against_reference(dense, {"s": module}, shape, where, cache)
            t_struct, source = timed["s"], "measured"
        merged = t_dense < t_struct
        if merged:
            replace_module(model, name, dense)
        decisions.append(
            {
                "layer": name,
                "structured_ms": t_struct,
                "dense_ms": t_dense,
                "merged": merged,
                "source": source,
            }
        )
    set_plans(model, [refresh_plan(model, p) for p in plans_of(model)])
    return decisions


def _planned_latencies(
    model: nn.Module, deployment: Deployment | str | dict | None, example: Any
) -> tuple[dict[str, tuple[float, float]], Deployment]:
    """(structured ms, dense ms) per layer the plans measured at the deployment, and it."""
    records = [p for p in plans_of(model) if p.latency is not None]
    if deployment is None and records:
        where = Deployment(**records[-1].latency["deployment"])  # type: ignore[index]
    else:
        where = Deployment.coerce(deployment, example)
    planned = {}
    for p in records:
        if Deployment(**p.latency["deployment"]) != where:  # type: ignore[index]
            continue
        for lp in p.compressed_layers:
            if "latency_ms" in lp.extra and "dense_latency_ms" in lp.extra:
                planned[lp.fqn] = (
                    float(lp.extra["latency_ms"]),
                    float(lp.extra["dense_latency_ms"]),
                )
    return planned, where


def _input_shapes(model: nn.Module, example: Any) -> dict[str, tuple[int, ...]]:
    """The input shape every structured layer sees in ``model(example)`` (layers that ran)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, StructuredLayer):

            def hook(module: nn.Module, args: tuple, output: Any, name: str = name) -> None:
                # a forward hook that returns a value would replace the output: return None
                shapes.setdefault(name, tuple(args[0].shape))

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes
