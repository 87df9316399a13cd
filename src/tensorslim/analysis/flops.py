"""FLOPs: counted by ``torch.utils.flop_counter`` for whole models, analytic for single layers.

Convention everywhere: 2 FLOPs per multiply-add (what ``FlopCounterMode`` counts for matmul,
conv, bmm and einsum). Bias additions, activations, pooling and normalisation are not counted.

Two blind spots of the counter are covered here: PyTorch's fused inference kernels for
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (counted as zero) are switched off
while counting, so the same matrix products run unfused and are seen; and the CPU LSTM kernel
(also zero) is replaced by the analytic count of its gate matrices.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from tensorslim.inputs import ForwardFn, call_model
from tensorslim.layers.attention import (
    LowRankMultiheadAttention,
    attention_projections,
    projection_rows,
)
from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.conv_geometry import conv_output_hw
from tensorslim.layers.linear_like import is_linear_like, linear_features
from tensorslim.layers.recurrent import dense_rnn_flops


@contextlib.contextmanager
def fused_paths_disabled() -> Iterator[None]:
    """Run the unfused ("slow") paths of torch's attention and encoder layers inside the block.

    The fused kernels read ``.weight`` of sub-layers directly, so their work is invisible to
    forward hooks and to the FLOP counter. torch offers only a process-wide switch; it is
    restored on exit.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _raw_dispatch() -> Any:
    """torch's FLOP-counting dispatch handler without its ``torch._dynamo.disable`` wrapper
    (``None`` where this torch has no such wrapper to remove)."""
    inner = getattr(flop_counter, "_FlopCounterMode", None)
    handler = inner.__dict__.get("__torch_dispatch__") if inner is not None else None
    return getattr(handler, "__wrapped__", None)


class _Counter(FlopCounterMode):
    """``FlopCounterMode`` that does not import ``torch._dynamo`` on its first operator.

    torch wraps every dispatch mode's handler so dynamo never traces it; the wrapper imports
    ``torch._dynamo`` on first use, which costs ~2 CPU-seconds in a fresh process (more than
    planning a resnet56). A count never runs under ``torch.compile``, so the unwrapped handler
    does the same thing (the same torch code counts). Falls back to torch's own where the
    private layout differs.
    """

    def __enter__(self) -> _Counter:
        raw = _raw_dispatch()
        if raw is None:
            return super().__enter__()  # type: ignore[return-value]

        class Mode(flop_counter._FlopCounterMode):  # type: ignore[name-defined,misc]
            @classmethod
            def _should_skip_dynamo(cls) -> bool:  # no wrapper for this subclass
                return False

            __torch_dispatch__ = raw

        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        self.mode = Mode(self)
        self.mode.__enter__()
        return self


def leading_shape(value: Any) -> tuple[int, ...] | None:
    """The shape of a layer's first input or output: a tensor's, a ``PackedSequence``'s data
    (rows × features), the first element of a tuple (attention and recurrent outputs)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, nn.utils.rnn.PackedSequence):
        return tuple(value.data.shape)
    if isinstance(value, tuple) and value:
        return leading_shape(value[0])
    return None


def count_flops(model: nn.Module, example_input: Any, forward_fn: ForwardFn | None = None) -> int:
    """Total FLOPs of one forward pass of ``model`` on ``example_input``, by FlopCounterMode.

    The input takes any structure :mod:`tensorslim.inputs` accepts (or ``forward_fn``).
    Recurrent modules the counter does not see are counted analytically (module docstring).
    """
    was_training = model.training
    model.eval()
    unseen: list[int] = []
    try:
        with torch.no_grad(), fused_paths_disabled(), _Counter(display=False) as counter:
            handles = _count_unseen_recurrent(model, counter, unseen)
            try:
                call_model(model, example_input, forward_fn)
            finally:
                for handle in handles:
                    handle.remove()
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) + sum(unseen)


def _count_unseen_recurrent(
    model: nn.Module, counter: FlopCounterMode, unseen: list[int]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks adding the analytic FLOPs of every torch recurrent call the counter saw as zero
    (a later torch that counts the LSTM kernel is then not counted twice)."""
    handles = []
    for module in model.modules():
        if not isinstance(module, nn.RNNBase):
            continue
        before: list[int] = []

        def pre(_: nn.Module, args: tuple, before: list[int] = before) -> None:
            before.append(counter.get_total_flops())

        def post(m: nn.Module, args: tuple, _: Any, before: list[int] = before) -> None:
            shape = leading_shape(args[0]) if args else None
            if counter.get_total_flops() == before.pop() and shape is not None:
                unseen.append(dense_rnn_flops(m, shape))  # type: ignore[arg-type]

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


def dense_layer_flops(
    module: nn.Module,
    input_shape: tuple[int, ...],
    other_shapes: tuple[tuple[int, ...], ...] = (),
) -> int:
    """Analytic FLOPs of a Linear(-like), Conv1d/2d or structured layer on an ``input_shape`` input.

    Linear (and Linear-like, e.g. transformers' Conv1D): 2·tokens·in·out.
    Conv1d/Conv2d: 2·B·(output positions)·n·(c/groups)·(kernel taps). RNN/LSTM/GRU: 2 per
    weight entry per input row (:func:`~tensorslim.layers.recurrent.dense_rnn_flops`).
    MultiheadAttention: its q/k/v/out projections, 2·rows·E·in each (key and value rows from
    ``other_shapes``; the attention products themselves are not included). Other modules: 0.
    """
    if isinstance(module, LowRankMultiheadAttention):
        return int(module.analytic_flops(tuple(input_shape), other_shapes))
    if isinstance(module, StructuredLayer):
        return int(module.analytic_flops(tuple(input_shape)))
    if isinstance(module, nn.MultiheadAttention):
        rows = projection_rows(tuple(input_shape), other_shapes)
        weights = [w for w, _ in attention_projections(module)]
        return 2 * sum(n * w.numel() for n, w in zip(rows, weights, strict=True))
    if is_linear_like(module):
        in_features, out_features = linear_features(module)
        return 2 * math.prod(input_shape[:-1]) * in_features * out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        dims = len(module.kernel_size)
        batch = math.prod(input_shape[: -(dims + 1)])
        positions = conv_output_hw(
            tuple(input_shape[-dims:]),  # type: ignore[arg-type]
            module.kernel_size,  # type: ignore[arg-type]
            module.stride,  # type: ignore[arg-type]
            module.padding,  # type: ignore[arg-type]
            module.dilation,  # type: ignore[arg-type]
        )
        taps = math.prod(module.kernel_size)
        per_position = module.out_channels * (module.in_channels // module.groups) * taps
        return 2 * batch * math.prod(positions) * per_position
    if isinstance(module, nn.RNNBase):
        return dense_rnn_flops(module, tuple(input_shape))
    return 0
