"""Export a (compressed) model: ONNX (checked in onnxruntime), TorchScript, safetensors."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tensorslim.errors import TensorslimError

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
