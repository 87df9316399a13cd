"""Export a (compressed) model: ONNX (checked in onnxruntime), TorchScript, safetensors."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tensorslim.analysis.latency import measure_latency
from tensorslim.errors import TensorslimError
from tensorslim.inputs import Inputs
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


def merge_slow_layers(model: nn.Module, example: torch.Tensor) -> list[dict[str, Any]]:
    """Fold structured layers back to dense where the dense layer measures faster.

    Each structured layer is timed on the input it sees in ``model(example)`` against its
    ``to_dense()`` form; the slower form loses. Returns one decision row per layer. The model's
    plans are refreshed so ``save``/``load`` rebuild the merged structure.
    """
    inputs: dict[str, Inputs] = {}
    handles = []
    structured = {n: m for n, m in model.named_modules() if isinstance(m, StructuredLayer)}
    # a composite layer (attention, recurrent) holds structured parts: it is merged as a whole
    layers = {
        n: m for n, m in structured.items() if not any(n.startswith(f"{o}.") for o in structured)
    }

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            # every positional input (attention takes query, key, value; a recurrent layer may
            # take a PackedSequence and a state); a hook returning a value would replace the
            # output: return None
            kept = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            inputs.setdefault(name, Inputs(kept, {}))

        return hook

    for name, module in layers.items():
        handles.append(module.register_forward_hook(recorder(name)))
    with torch.no_grad():
        model.eval()(example)
    for handle in handles:
        handle.remove()
    decisions = []
    for name, module in layers.items():
        if name not in inputs:
            continue
        dense = module.to_dense()
        t_struct = measure_latency(module, inputs[name], min_run_time=0.1)["median_ms"]
        t_dense = measure_latency(dense, inputs[name], min_run_time=0.1)["median_ms"]
        merged = t_dense < t_struct
        if merged:
            replace_module(model, name, dense)
        decisions.append(
            {"layer": name, "structured_ms": t_struct, "dense_ms": t_dense, "merged": merged}
        )
    set_plans(model, [refresh_plan(model, p) for p in plans_of(model)])
    return decisions
