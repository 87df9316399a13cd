"""Export a (compressed) model: ONNX (checked in onnxruntime), TorchScript, safetensors."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tensorslim.analysis.deployment import Deployment, layer_deployment, make_runner
from tensorslim.analysis.timing import LatencyCache, time_against_reference, time_interleaved
from tensorslim.errors import TensorslimError
from tensorslim.inputs import Inputs, as_inputs, call_model, map_tensors, tensors_in
from tensorslim.layers.base import StructuredLayer
from tensorslim.layout import planned_layout, to_layout
from tensorslim.plan import plans_of, refresh_plan, set_plans
from tensorslim.surgery import replace_module

FORMATS = ("onnx", "torchscript", "safetensors")


class _FlatCall(nn.Module):
    """``model`` called with the example's tensors as flat positional arguments, returning every
    output tensor as a tuple: the form ONNX and TorchScript take (tensors in, tensors out).

    ``example`` (any structure :mod:`tensorslim.inputs` accepts) fixes where each flat tensor
    goes; its non-tensor leaves (a ``return_dict=False``, a ``None``) stay constants.
    """

    def __init__(self, model: nn.Module, example: Any) -> None:
        super().__init__()
        self.model = model
        self.example = as_inputs(example)

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensors = iter(flat)
        inputs = map_tensors(self.example, lambda _: next(tensors))
        return tuple(tensors_in(inputs.call(self.model)))


def _input_names(example: Any) -> list[str]:
    """ONNX input names: ``input`` for a lone tensor, keyword names for mappings, else input_i."""
    inputs = as_inputs(example)
    if isinstance(example, torch.Tensor):
        return ["input"]
    names = [f"input_{i}" for i, _ in enumerate(tensors_in(inputs.args))]
    for key, value in inputs.kwargs.items():
        count = len(tensors_in(value))
        names += [key] if count == 1 else [f"{key}_{i}" for i in range(count)]
    return names


def _outputs(model: nn.Module, example: Any) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.detach().numpy() for t in tensors_in(call_model(model, example))]


def export_onnx(
    model: nn.Module,
    example: Any,
    path: str | Path,
    *,
    check: bool = True,
    atol: float = 1e-4,
) -> dict[str, float]:
    """Write ``model`` as ONNX and, with ``check``, compare onnxruntime's outputs with PyTorch's.

    ``example``: a tensor (ONNX input ``input``, output ``logits``) or any input structure
    :mod:`tensorslim.inputs` accepts — a tuple, keyword tensors (a tokenizer's encoding), whose
    tensors become the ONNX inputs in order (keyword names kept). Every output tensor of the model
    (a Hugging Face output's too) becomes an ONNX output; dimension 0 of all is dynamic.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise TensorslimError(
            "ONNX export needs the onnx extra: pip install 'tensorslim[onnx]'"
        ) from None
    path = Path(path)
    model = model.eval()
    # eval: the exporter restores the wrapper's mode afterwards, and a wrapper in train mode
    # would leave the model training (BatchNorm on batch statistics) after the export
    flat = _FlatCall(model, example).eval()
    inputs, outputs = _input_names(example), len(_outputs(model, example))
    names = ["logits", *(f"output_{i}" for i in range(1, outputs))]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            flat,
            tuple(tensors_in(example)),
            buffer,
            input_names=inputs,
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in (*inputs, *names)},
            dynamo=False,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    report = {"bytes": float(path.stat().st_size)}
    if check:
        report["max_abs_diff"] = check_onnx(model, example, path, atol)
    return report


def check_onnx(model: nn.Module, example: Any, path: str | Path, atol: float = 1e-4) -> float:
    """Run the ONNX file in onnxruntime; error if any output differs from PyTorch's by more
    than ``atol`` (relative to the output's largest magnitude, when that exceeds 1)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise TensorslimError(
            "checking ONNX needs onnxruntime: pip install 'tensorslim[onnx]'"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # an input the graph does not read (e.g. an all-ones attention mask folded away) is dropped
    wanted = {i.name for i in session.get_inputs()}
    feed = {
        name: tensor.numpy()
        for name, tensor in zip(_input_names(example), tensors_in(example), strict=True)
        if name in wanted
    }
    got = session.run(None, feed)
    want = _outputs(model, example)
    if len(got) != len(want):
        raise TensorslimError(f"{path} has {len(got)} outputs, the model {len(want)}")
    diff = 0.0
    for g, w in zip(got, want, strict=True):
        d = float(np.max(np.abs(g - w))) if w.size else 0.0
        if d > atol * max(1.0, float(np.max(np.abs(w))) if w.size else 1.0):
            raise TensorslimError(
                f"ONNX output differs from PyTorch by {d:.3g} (> {atol}) in {path}"
            )
        diff = max(diff, d)
    return diff


def export_torchscript(model: nn.Module, example: Any, path: str | Path) -> dict[str, float]:
    """Trace ``model`` to TorchScript and check the traced outputs equal the eager ones.

    A lone tensor example traces ``model`` itself; any other input structure traces it called
    with the example's tensors as flat positional arguments, returning every output tensor.
    """
    model = model.eval()
    target = model if isinstance(example, torch.Tensor) else _FlatCall(model, example).eval()
    flat = tuple(tensors_in(example))
    with torch.no_grad():
        traced = torch.jit.trace(target, flat, check_trace=False, strict=False)
        got, want = tensors_in(traced(*flat)), tensors_in(target(*flat))
        diffs = [float((g - w).abs().max()) for g, w in zip(got, want, strict=True) if g.numel()]
    diff = max(diffs, default=0.0)
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
    timed the same way now — interleaved with their ``to_dense()`` form, at the input shape they
    see in ``model(example)`` (a composite layer with several inputs, e.g. attention, on those
    inputs themselves). A composite layer holding structured parts is merged as a whole.
    Returns one decision row per layer; the model's plans are refreshed so ``save``/``load``
    rebuild the merged structure, and merged weights take the plans' memory layout.
    """
    planned, where = _planned_latencies(model, deployment, example)
    cache = cache if cache is not None else LatencyCache()
    decisions = []
    for name, inputs in _layer_inputs(model, example).items():
        module = model.get_submodule(name)
        dense = module.to_dense()
        if name in planned:
            (t_struct, t_dense), source = planned[name], "plan"
        else:
            t_struct, t_dense = _time_pair(module, dense, inputs, where, cache)
            source = "measured"
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
    for p in plans_of(model):  # a merged layer's dense weight in its chain's layout, as apply
        layout = planned_layout(p.latency)
        if layout is not None:
            to_layout(model, layout)
    set_plans(model, [refresh_plan(model, p) for p in plans_of(model)])
    return decisions


def _time_pair(
    module: nn.Module, dense: nn.Module, inputs: Inputs, where: Deployment, cache: LatencyCache
) -> tuple[float, float]:
    """(structured ms, dense ms), interleaved: by shape for one tensor input, else on it
    (single layers eagerly for a "compile" deployment, as the planner times them)."""
    where = layer_deployment(where)
    if len(inputs.args) == 1 and isinstance(inputs.args[0], torch.Tensor) and not inputs.kwargs:
        shape = tuple(inputs.args[0].shape)
        t_dense, timed = time_against_reference(dense, {"s": module}, shape, where, cache)
        return timed["s"], t_dense
    runners = {"s": make_runner(module, inputs, where), "d": make_runner(dense, inputs, where)}
    timed = time_interleaved(runners, where.threads)
    return timed["s"].ms, timed["d"].ms


def _layer_inputs(model: nn.Module, example: Any) -> dict[str, Inputs]:
    """The inputs every outermost structured layer sees in ``model(example)`` (those that ran)."""
    inputs: dict[str, Inputs] = {}
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

    handles = [m.register_forward_hook(recorder(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


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
